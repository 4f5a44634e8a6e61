"""NQKV quantizers as CUDA kernels (kernels_cu/nqkv.cu), bit for bit minikv.kv.nqkv's NumPy
oracles: same signatures, shapes and dtypes; the codes, fp16 absmax, packed bytes and x_hat
all come from the kernels (the float32 levels and midpoints are the oracle's own tables). Also
the method's storage as the fused attention reads it (NormalStorage)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..kv.packing import nf_levels, nf_midpoints
from .attention import KernelMethod, KernelStorage
from .kivi import check_bits, column_launch, prepare, row_launch
from .module import EXACT, check, i32, kernel

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


# -- what the fused attention reads ------------------------------------------------------------
class _TokenBlocks(KernelMethod):
    def groups(self, kb, vb):
        return 2  # its lookups spill registers at 4 groups

    def decodes(self, st, D, trial=False):
        # a lane's run of a key's channels (D/4 of K, D/8 of V) must lie in one absmax block
        return super().decodes(st, D, trial) and min(st.bs, D) % (D // 4) == 0

    def lookup_tables(self, st):
        return 1 + (st.kbits != st.vbits)


NQ_TOKEN = _TokenBlocks("nqkv_token", 2, (2, 4))  # tiles.cuh's Method::NQKV_TOKEN
NQ_CHANNEL = KernelMethod("nqkv_channel", 3)  # Method::NQKV_CHANNEL: K blocks along tokens, attention.cu only


@dataclass(frozen=True, kw_only=True)
class NormalStorage(KernelStorage):
    """One layer of minikv.kv.nqkv's chunks as the fused kernels read them: kc (B, H, T, D*kb/8)
    uint8, ka (B, H, T, D/bs) fp16, or (B, H, NC, G/bs, D) with K blocks along tokens (channel);
    vc (B, H, T, D*vb/8) uint8, va (B, H, T, D/bs) fp16; levels_k, levels_v float32 (2^b,)."""
    kbits: int
    vbits: int
    kc: object
    ka: object
    vc: object
    va: object
    n_chunks_cap: int
    G: int
    bs: int
    levels_k: object
    levels_v: object
    channel: bool

    @property
    def kernel(self):
        return NQ_CHANNEL if self.channel else NQ_TOKEN

    def __post_init__(self):
        B, H, T, kw = check("nqkv storage kc", self.kc, np.uint8).shape
        D = kw * 8 // self.kbits
        ka = (B, H, T // self.G, self.G // self.bs, D) if self.channel else (B, H, T, D // min(self.bs, D))
        check("nqkv storage ka", self.ka, np.float16, ka)
        check("nqkv storage vc", self.vc, np.uint8, (B, H, T, D * self.vbits // 8))
        check("nqkv storage va", self.va, np.float16, (B, H, T, D // min(self.bs, D)))
        check("nqkv levels_k", self.levels_k, np.float32, (1 << self.kbits,))
        check("nqkv levels_v", self.levels_v, np.float32, (1 << self.vbits,))

    def codes(self, null):
        return (self.kc, self.ka, null.h, self.vc, self.va, null.h, i32(self.n_chunks_cap), i32(self.G), i32(self.bs))

    def extras(self, null):
        return (self.levels_k, self.levels_v, null.b, null.b, null.b, null.h, null.h, i32(0))
