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


# -- compact parameters: an 8-bit log scale and an int8 zero point -------------------------------
# Half the bytes of fp16 (scale, min): at head_dim 64 a 2-bit code's parameters cost 0.25 bits
# per value instead of 0.5. The scale comes from a fixed table (10 steps per octave, 6e-5..2896),
# so a GPU kernel reproduces it by lookup. Of the covering scale and the CLIP smaller ones (which
# clip the extremes), the one with the least squared error is kept: at 2 bits on SmolLM2's
# rotated K and V that is ~40% less error than fp16 min/max parameters.
CLIP = 6
SHRINK = [np.float32(2.0 ** (-k / 10)) for k in range(1, CLIP + 1)]  # fit=mse's narrower fp16 grids (kivi.cuh)


@lru_cache(maxsize=None)
def log_scales() -> np.ndarray:
    """(256,) float32 ascending: scale e is 2^((e - 140) / 10)."""
    return np.exp2((np.arange(256, dtype=np.float64) - 140) / 10).astype(np.float32)


def sum_sq_in_order(xp, d, axis: int):
    """Sum of d^2 over `axis` (kept dim), one float32 add at a time in index order: the order a
    CUDA thread follows, so the sums (and the choices made on them) are bit for bit the same."""
    d = xp.moveaxis(d, axis, 0)
    acc = xp.zeros(d.shape[1:], np.float32)
    for i in range(d.shape[0]):
        acc = acc + d[i] * d[i]
    return xp.expand_dims(acc, axis)


def least_error(xp, x, axis: int, bits: int, candidates):
    """Of the (scale, min) float32 candidates (each kept dims over `axis`, with its stored form),
    the stored form whose codes give x the least sum of squared errors (the earlier on a tie)."""
    best = best_err = None
    for stored, (s, m) in candidates:
        err = sum_sq_in_order(xp, uniform_dequant(uniform_codes(xp, x, s, m, bits), s, m) - x, axis)
        if best is None:
            best, best_err = stored, err
        else:
            better = err < best_err
            best = tuple(xp.where(better, a, b) for a, b in zip(stored, best))
            best_err = xp.where(better, err, best_err)
    return best


def uniform_params_fit(xp, x, axis: int, bits: int, clip: int = CLIP):
    """fp16 (scale, min) as uniform_params (candidate 0, error <= scale / 2), or one of `clip`
    narrower grids centred on the data (scale 2^(-k/10) times as large, k = 1..clip) where
    clipping the extremes costs less squared error."""
    scale, mn = uniform_params(xp, x, axis, bits)
    cands = [((scale, mn), (scale.astype(np.float32), mn.astype(np.float32)))]
    # + 0 turns -0 into +0 (see uniform_params)
    mid = ((x.max(axis=axis, keepdims=True) + np.float32(0.0)) + (x.min(axis=axis, keepdims=True) + np.float32(0.0))) \
        * np.float32(0.5)
    half = np.float32(((1 << bits) - 1) * 0.5)
    for k in range(1, clip + 1):
        s = f16_round(xp, scale.astype(np.float32) * SHRINK[k - 1], +1)
        m = (mid - half * s.astype(np.float32)).astype(np.float16)
        cands.append(((s, m), (s.astype(np.float32), m.astype(np.float32))))
    return least_error(xp, x, axis, bits, cands)


def compact_params(xp, x, axis: int, bits: int, clip: int = CLIP):
    """(e uint8, z int8) over `axis` of float32 x, kept dims, for codes of at most 4 bits.
    Candidates: e0, the smallest table entry >= max((max - min) / n, |max + min| / 238) (n = 2^b - 1;
    the second term keeps z in int8), which bounds the error by scale / 2, and e0 - 1 .. e0 - CLIP;
    each with z = rint(n/2 - (max + min) / (2 scale)), which centres the grid (c - z) * scale on the
    data. Kept: the least sum of squared errors (the earlier candidate on a tie); clip=0: e0."""
    mn = x.min(axis=axis, keepdims=True) + np.float32(0.0)
    mx = x.max(axis=axis, keepdims=True) + np.float32(0.0)
    n = np.float32((1 << bits) - 1)
    need = xp.maximum((mx - mn) / n, xp.abs(mx + mn) / np.float32(238))
    table = xp.asarray(log_scales())
    e0 = xp.minimum(xp.searchsorted(table, need.ravel(), side="left"), 255).reshape(need.shape)
    cands = []
    for back in range(clip + 1):
        e = xp.maximum(e0 - back, 0)
        s = table[e]
        z = xp.clip(xp.rint(n * np.float32(0.5) - (mx + mn) / (s + s)), -128, 127)
        cands.append(((e.astype(np.uint8), z.astype(np.int8)), (s, -z.astype(np.float32) * s)))
    return least_error(xp, x, axis, bits, cands)


def compact_scale_min(xp, e, z):
    """float32 (scale, min) of compact parameters."""
    s = xp.asarray(log_scales())[e.astype(np.int64)]
    return s, -z.astype(np.float32) * s


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
