"""NQKV quantizers as CUDA kernels (kernels_cu/nqkv.cu), bit for bit minikv.kv.nqkv's NumPy
oracles: same signatures, shapes and dtypes; the codes, fp16 absmax, packed bytes and x_hat
all come from the kernels (the float32 levels and midpoints are the oracle's own tables)."""
from __future__ import annotations

import functools

import numpy as np

from ..kv.packing import nf_levels, nf_midpoints
from .kivi import check_bits, column_launch, prepare, row_launch
from .module import EXACT, i32, kernel

BITS = (2, 3, 4)
TABLES = 32 * 4  # shared bytes for the tables: 15 midpoints (padded to 16), then 16 levels


@functools.cache
def _tables(bits: int, device: int):
    import cupy as cp

    return cp.asarray(nf_midpoints(bits)), cp.asarray(nf_levels(bits))


def tables(bits: int):
    """(midpoints, levels) float32 on the current device."""
    import cupy as cp

    return _tables(bits, cp.cuda.Device().id)


def quantize_token_blocks(xp, x, bits: int, bs: int):
    """x (..., T, D) float32 -> packed codes (..., T, D*b/8) uint8, absmax (..., T, D/bs) fp16,
    and the dequantized values (..., T, D) float32."""
    import cupy as cp

    bits = check_bits("quantize_token_blocks", bits, BITS)
    x = prepare("quantize_token_blocks x", x, 2)
    *lead, T, D = x.shape
    if bs <= 0 or bs % 8 or D % bs:
        raise ValueError(f"quantize_token_blocks: bs={bs} must be a multiple of 8 dividing D={D}")
    codes = cp.empty((*lead, T, D * bits // 8), np.uint8)
    absmax = cp.empty((*lead, T, D // bs), np.float16)
    x_hat = cp.empty(x.shape, np.float32)
    if x.size:
        mids, levels = tables(bits)
        grid, block, smem = row_launch(x.size // D, D)
        kernel("nqkv", f"nqkv_token_blocks<{bits}>", EXACT)(
            grid, block, (x, mids, levels, codes, absmax, x_hat, i32(x.size // D), i32(D), i32(bs)),
            shared_mem=TABLES + smem)
    return codes, absmax, x_hat


def quantize_channel_blocks(xp, x, bits: int, bs: int):
    """x (..., n, G, D) float32 -> packed codes (..., n, G, D*b/8) uint8, absmax (..., n, G/bs, D)
    fp16, and the dequantized values (..., n, G, D) float32."""
    import cupy as cp

    bits = check_bits("quantize_channel_blocks", bits, BITS)
    x = prepare("quantize_channel_blocks x", x, 3)
    *lead, n, G, D = x.shape
    if bs <= 0 or G % bs:
        raise ValueError(f"quantize_channel_blocks: bs={bs} must divide G={G}")
    codes = cp.empty((*lead, n, G, D * bits // 8), np.uint8)
    absmax = cp.empty((*lead, n, G // bs, D), np.float16)
    x_hat = cp.empty(x.shape, np.float32)
    if x.size:
        mids, levels = tables(bits)
        grid, block, smem = column_launch(x.size // (bs * D), D)
        kernel("nqkv", f"nqkv_channel_blocks<{bits}>", EXACT)(
            grid, block, (x, mids, levels, codes, absmax, x_hat, i32(bs), i32(D)),
            shared_mem=TABLES + smem + D * 4)
    return codes, absmax, x_hat
