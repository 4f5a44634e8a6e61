"""Quantizer building blocks shared by the cache methods, written against an array module
(NumPy or CuPy): dense bit packing, uniform (min/scale) and normal-quantile codes.

These are the oracles the CUDA kernels must reproduce bit for bit, so every float step is
spelled out in float32 in a fixed order (IEEE division, round-half-to-even).

Packing layout: the codes of one row (e.g. one token's D channels) form a little-endian bit
stream, code j occupying bits [j*b, (j+1)*b). So 2-bit packs 4 codes per byte (code j in
bits 2(j%4).. of byte j//4), 4-bit 2 per byte, 3-bit 8 codes per 3 bytes, 8-bit one per
byte, 16-bit one per two bytes. Rows must hold a multiple of 8 codes.
"""
from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist

import numpy as np


def row_index(xp, rows):
    """Host batch rows -> an index for device arrays (a slice when contiguous: a view, no gather)."""
    rows = np.asarray(rows)
    if rows[-1] - rows[0] + 1 == len(rows) and (np.diff(rows) == 1).all():
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return xp.asarray(rows)


def packed_bytes(n_codes: int, bits: int) -> int:
    return n_codes * bits // 8


def pack(xp, codes, bits: int):
    """codes (..., n) integers < 2**bits -> (..., n*bits/8) uint8."""
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"rows of {n} codes: a multiple of 8 is needed")
    if bits == 16:
        return codes.astype(np.uint16).view(np.uint8).reshape(*codes.shape[:-1], 2 * n)
    groups = codes.reshape(*codes.shape[:-1], n // 8, 8).astype(np.uint64)
    shifts = xp.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = (groups << shifts).sum(axis=-1, dtype=np.uint64)  # (..., n/8): 8 codes in 8*bits bits
    return words.view(np.uint8).reshape(*codes.shape[:-1], n // 8, 8)[..., :bits].reshape(
        *codes.shape[:-1], n * bits // 8)


def unpack(xp, packed, bits: int, n: int):
    """(..., n*bits/8) uint8 -> (..., n) uint16 codes (inverse of `pack`)."""
    lead = packed.shape[:-1]
    if bits == 16:
        return xp.ascontiguousarray(packed).view(np.uint16).reshape(*lead, n)
    g = packed.reshape(*lead, n // 8, bits)
    g8 = xp.zeros((*lead, n // 8, 8), dtype=np.uint8)
    g8[..., :bits] = g
    words = g8.view(np.uint64)  # (..., n/8, 1)
    shifts = xp.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (words >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint16).reshape(*lead, n)


# -- uniform (asymmetric min/scale) quantization ----------------------------------------------

def f16_round(xp, x, direction: int):
    """float32 -> fp16, rounded to nearest, then moved one fp16 step up (direction=+1) or down
    (-1) where the rounding went the wrong way, so the result bounds x from that side."""
    h = x.astype(np.float16)
    wrong = (h.astype(np.float32) < x) if direction > 0 else (h.astype(np.float32) > x)
    bits = h.view(np.uint16).astype(np.int32)
    neg = bits >= 0x8000
    stepped = bits + np.where(neg, -direction, direction)
    zero = (bits & 0x7FFF) == 0  # +-0: the next value is the smallest subnormal of that sign
    stepped = np.where(zero, 0x0001 if direction > 0 else 0x8001, stepped)
    return xp.where(wrong, stepped, bits).astype(np.uint16).view(np.float16)


def uniform_params(xp, x, axis: int, bits: int):
    """fp16 (scale, min) over `axis` of float32 x, kept dims. min is rounded down and scale
    up, so min + (2^b - 1) * scale covers the max: the error is at most scale / 2."""
    # + 0 turns -0 into +0: a min/max over +0 and -0 may return either, depending on order.
    mn = f16_round(xp, x.min(axis=axis, keepdims=True) + np.float32(0.0), -1)
    mx = x.max(axis=axis, keepdims=True) + np.float32(0.0)
    scale = f16_round(xp, (mx - mn.astype(np.float32)) / np.float32((1 << bits) - 1), +1)
    return scale, mn


def uniform_codes(xp, x, scale, mn, bits: int):
    """Codes of float32 x against fp16 (scale, min): rint((x - min) / scale) clipped."""
    s = scale.astype(np.float32)
    q = xp.rint((x - mn.astype(np.float32)) / xp.where(s > 0, s, np.float32(1.0)))
    return xp.clip(q, 0, (1 << bits) - 1).astype(np.uint16)


def uniform_dequant(codes, scale, mn):
    """codes * scale + min, in float32."""
    return codes.astype(np.float32) * scale.astype(np.float32) + mn.astype(np.float32)


# -- normal-quantile (NormalFloat-style) block quantization ------------------------------------

@lru_cache(maxsize=None)
def nf_levels(bits: int) -> np.ndarray:
    """2^b levels in [-1, 1], ascending, with 0 exact: quantiles of N(0,1) built as NF4 is
    (2^(b-1) from the positive half, 2^(b-1)-1 from the negative half, and 0), scaled by the
    largest. The outer quantile `offset` generalises NF4's 0.9677 to b bits."""
    n = 1 << bits
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    v = np.array(sorted(pos + [0.0] + neg), dtype=np.float64)
    return (v / np.abs(v).max()).astype(np.float32)


@lru_cache(maxsize=None)
def nf_midpoints(bits: int) -> np.ndarray:
    lv = nf_levels(bits)
    return ((lv[:-1] + lv[1:]) * np.float32(0.5)).astype(np.float32)  # (2^b - 1,) ascending


def nf_params(xp, x, axis: int):
    """fp16 absmax over `axis` (kept dims), rounded up so that |x / absmax| <= 1."""
    return f16_round(xp, xp.abs(x).max(axis=axis, keepdims=True), +1)


def nf_codes(xp, x, absmax, bits: int):
    """Index of the nearest level of x / absmax: the number of midpoints strictly below it
    (a tie goes to the lower level)."""
    a = absmax.astype(np.float32)
    xn = xp.where(a > 0, x / xp.where(a > 0, a, np.float32(1.0)), np.float32(0.0))
    mids = xp.asarray(nf_midpoints(bits))
    return (xn[..., None] > mids).sum(axis=-1).astype(np.uint16)


def nf_dequant(xp, codes, absmax, bits: int):
    return xp.asarray(nf_levels(bits))[codes.astype(np.int64)] * absmax.astype(np.float32)


def nf_max_gap(bits: int) -> float:
    return float(np.diff(nf_levels(bits)).max())
