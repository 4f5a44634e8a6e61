"""KIVI quantizers as CUDA kernels (kernels_cu/kivi.cu), bit for bit minikv.kv.kivi's
NumPy oracles: same signatures, shapes and dtypes; the codes, fp16 scales and mins, packed
bytes and x_hat all come from the kernels."""
from __future__ import annotations

import numpy as np

from .module import EXACT, check, i32, kernel

BITS = (2, 3, 4, 8, 16)
THREADS = 256  # per block of the per-chunk (column) kernels; the row kernels use about as many


def column_launch(sets: int, D: int):
    """(grid, block, shared bytes) of a kernel with one block per set of (L, D) values that
    reduces over L per channel (kivi_k_chunks, nqkv_channel_blocks), less its tables."""
    ns = max(1, THREADS // (D // 4))
    return (sets,), (THREADS,), ns * D * 4


def row_launch(rows: int, D: int):
    """(grid, block, partials per thread) of a kernel with one thread per (row, 8 values)
    that reduces over groups along a row (kivi_v_tokens, nqkv_token_blocks)."""
    octets = D // 8
    rb = max(1, THREADS // octets)  # whole rows per block
    return ((rows + rb - 1) // rb,), (rb * octets,), rb * octets * 4


def prepare(what: str, x, min_ndim: int):
    """Check a float32 C-contiguous cupy input; copy it if it is not 16-byte aligned (float4)."""
    check(what, x, np.float32)
    if x.ndim < min_ndim:
        raise ValueError(f"{what}: expected at least {min_ndim} dims, got shape {x.shape}")
    D = x.shape[-1]
    if D % 8 or not 0 < D <= 2048:
        raise ValueError(f"{what}: the last dim ({D}) must be a multiple of 8, at most 2048")
    if x.size // D >= 2**31:
        raise ValueError(f"{what}: {x.size // D} rows, more than int32 indexes")
    return x.copy() if x.data.ptr % 16 else x


def check_bits(what: str, bits: int, allowed) -> int:
    if bits not in allowed:
        raise ValueError(f"{what}: bits={bits} not in {allowed}")
    return int(bits)


def quantize_k_chunks(xp, x, bits: int):
    """x (..., n, G, D) float32 -> packed codes (..., n, G, D*b/8) uint8, scale, min (..., n, D)
    fp16, and the dequantized values (..., n, G, D) float32."""
    import cupy as cp

    bits = check_bits("quantize_k_chunks", bits, BITS)
    x = prepare("quantize_k_chunks x", x, 3)
    *lead, n, G, D = x.shape
    codes = cp.empty((*lead, n, G, D * bits // 8), np.uint8)
    scale = cp.empty((*lead, n, D), np.float16)
    mn = cp.empty((*lead, n, D), np.float16)
    x_hat = cp.empty(x.shape, np.float32)
    if x.size:
        grid, block, smem = column_launch(x.size // (G * D), D)
        kernel("kivi", f"kivi_k_chunks<{bits}>", EXACT)(
            grid, block, (x, codes, scale, mn, x_hat, i32(G), i32(D)), shared_mem=smem * 2 + 3 * D * 4)
    return codes, scale, mn, x_hat


def quantize_v_tokens(xp, x, bits: int, group: int):
    """x (..., T, D) float32 -> packed codes (..., T, D*b/8) uint8, scale, min (..., T, D/group)
    fp16, and the dequantized values (..., T, D) float32."""
    import cupy as cp

    bits = check_bits("quantize_v_tokens", bits, BITS)
    x = prepare("quantize_v_tokens x", x, 2)
    *lead, T, D = x.shape
    if group <= 0 or group % 8 or D % group:
        raise ValueError(f"quantize_v_tokens: group={group} must be a multiple of 8 dividing D={D}")
    codes = cp.empty((*lead, T, D * bits // 8), np.uint8)
    scale = cp.empty((*lead, T, D // group), np.float16)
    mn = cp.empty((*lead, T, D // group), np.float16)
    x_hat = cp.empty(x.shape, np.float32)
    if x.size:
        grid, block, smem = row_launch(x.size // D, D)
        kernel("kivi", f"kivi_v_tokens<{bits}>", EXACT)(
            grid, block, (x, codes, scale, mn, x_hat, i32(x.size // D), i32(D), i32(group)), shared_mem=smem * 2)
    return codes, scale, mn, x_hat
