"""The quantizer oracles: bit packing, uniform and normal-quantile codes, pattern mining."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.kv.kivi import quantize_k_chunks, quantize_v_tokens
from minikv.kv.nqkv import quantize_channel_blocks, quantize_token_blocks
from minikv.kv.packing import (CLIP, compact_params, compact_scale_min, f16_round, log_scales, nf_codes, nf_levels, nf_params,
                               pack, sum_sq_in_order, uniform_codes, uniform_dequant, uniform_params,
                               uniform_params_fit, unpack)
from minikv.kv.patterns import chebyshev_centre, kmeans, minmax_assign, nearest_l2, v_use_residual

RNG = np.random.default_rng(0)


def kvlike(*shape, outliers=True):
    """fp16-valued float32 data with per-channel offsets and a few large outlier channels."""
    x = RNG.normal(size=shape) * RNG.uniform(0.1, 3, size=shape[-1])
    if outliers:
        x[..., :: max(1, shape[-1] // 5)] += RNG.normal(size=shape[-1] // max(1, shape[-1] // 5) + 1)[
            : len(range(0, shape[-1], max(1, shape[-1] // 5)))] * 20
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_pack_roundtrip(bits):
    codes = RNG.integers(0, 1 << bits, size=(3, 7, 64)).astype(np.uint16)
    packed = pack(np, codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, 7, 64 * bits // 8)
    np.testing.assert_array_equal(unpack(np, packed, bits, 64), codes)


def test_pack_layout_is_a_little_endian_bit_stream():
    c = np.array([[1, 2, 3, 0, 3, 3, 0, 1]], dtype=np.uint16)
    assert pack(np, c, 2).tolist() == [[0b00111001, 0b01001111]]  # code j at bits 2j..
    c3 = np.arange(8, dtype=np.uint16)[None]  # 8 codes -> 3 bytes: 0b111_110_101_100_011_010_001_000
    assert pack(np, c3, 3).tolist() == [[0b10001000, 0b11000110, 0b11111010]]
    assert pack(np, np.array([[0x1234] + [0] * 7], dtype=np.uint16), 16)[0, :2].tolist() == [0x34, 0x12]


def test_f16_round_bounds_from_the_requested_side():
    x = RNG.normal(size=10000).astype(np.float32) * 10.0 ** RNG.integers(-6, 4, size=10000)
    up, down = f16_round(np, x, +1).astype(np.float32), f16_round(np, x, -1).astype(np.float32)
    assert (up >= x).all() and (down <= x).all()
    near = x.astype(np.float16).astype(np.float32)
    assert ((up == near) | (x > near)).all() and ((down == near) | (x < near)).all()  # at most one step


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_uniform_error_within_half_a_step(bits):
    k = kvlike(2, 3, 4, 32, 64)  # (..., n chunks, G, D)
    _, ks, km, k_hat = quantize_k_chunks(np, k, bits)
    slack = np.abs(k) * 2.0 ** -22  # float32 arithmetic in x^ = code * scale + min
    rel = 1 + 2.0 ** (bits - 22)  # float32 rounding of (x - min) / scale, up to 2^b - 1
    assert (np.abs(k_hat - k) <= ks[..., None, :].astype(np.float32) / 2 * rel + slack).all()
    v = kvlike(2, 3, 100, 128)
    _, vs, vm, v_hat = quantize_v_tokens(np, v, bits, group=64)
    step = np.repeat(vs.astype(np.float32), 64, axis=-1)  # each group's scale over its channels
    assert (np.abs(v_hat - v) <= step / 2 * rel + np.abs(v) * 2.0 ** -22).all()
    if bits <= 4:  # and the error is really that of b bits, not better by accident
        assert np.abs(v_hat - v).max() > step.max() / 2 / 4


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compact_params_pick_the_least_error(bits):
    """sc=8: an 8-bit log scale and an int8 zero point, on rows with large offsets (K's biased
    channels), tiny ranges and constant rows. The scale is the covering one (error <= scale / 2)
    or one of CLIP smaller ones where clipping the extremes costs less squared error."""
    spread = RNG.uniform(0.001, 30, size=(4, 50, 1)).astype(np.float32)
    x = kvlike(4, 50, 64) * spread + spread * RNG.uniform(-30, 30, size=(4, 50, 1)).astype(np.float32)
    x[0, 0] = 7.0  # a constant row
    x[0, 1] = np.linspace(-1e-3, 1e-3, 64)  # below the table's smallest scale
    x = x.astype(np.float16).astype(np.float32)
    e, z = compact_params(np, x, -1, bits)
    assert e.dtype == np.uint8 and z.dtype == np.int8 and e.shape == z.shape == (4, 50, 1)
    mn, mx, n = x.min(-1, keepdims=True), x.max(-1, keepdims=True), (1 << bits) - 1
    table = log_scales()
    e0 = np.minimum(np.searchsorted(table, np.maximum((mx - mn) / n, np.abs(mx + mn) / 238)), 255)
    assert ((e <= e0) & (e >= e0 - CLIP)).all() and (e < e0).any() and (e == e0).any()

    def sq_err(e, z):
        s, m = compact_scale_min(np, e, z)
        return ((uniform_dequant(uniform_codes(np, x, s, m, bits), s, m) - x) ** 2).sum(-1)

    s0 = table[e0]
    z0 = np.clip(np.rint(n / 2 - (mx + mn) / (2 * s0)), -128, 127).astype(np.int8)
    assert (sq_err(e, z) <= sq_err(e0, z0) * (1 + 1e-5)).all()  # never worse than the covering scale
    s, m = compact_scale_min(np, e0, z0)
    x_hat0 = uniform_dequant(uniform_codes(np, x, s, m, bits), s, m)
    assert (np.abs(x_hat0 - x) <= s / 2 * (1 + 2.0 ** -18) + np.abs(x) * 2.0 ** -21).all()
    # and the choice is near fp16 min/max parameters' error on average, far better at 2 bits
    s16, m16 = uniform_params(np, x, -1, bits)
    ref = ((uniform_dequant(uniform_codes(np, x, s16, m16, bits), s16, m16) - x) ** 2).sum(-1)[1:]
    assert np.mean(sq_err(e, z)[1:] / ref) < (0.8 if bits == 2 else 1.1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fitted_fp16_params_never_lose_to_min_max(bits):
    """fit=mse with fp16 parameters: per set, the squared error is at most min/max parameters'
    (they are candidate 0), the grids are fp16, and at 2 bits clipping wins on most sets."""
    x = kvlike(6, 40, 64)
    s, m = uniform_params_fit(np, x, -1, bits)
    assert s.dtype == m.dtype == np.float16 and s.shape == (6, 40, 1)
    s0, m0 = uniform_params(np, x, -1, bits)

    def sq_err(s, m):
        s, m = s.astype(np.float32), m.astype(np.float32)
        return ((uniform_dequant(uniform_codes(np, x, s, m, bits), s, m) - x) ** 2).sum(-1)

    fitted, plain = sq_err(s, m), sq_err(s0, m0)
    assert (fitted <= plain).all()
    assert ((fitted < plain).mean() > 0.5) if bits == 2 else (fitted < plain).any()
    np.testing.assert_array_equal(uniform_params_fit(np, x, -1, bits, clip=0)[0], s0)  # clip=0: min/max


def test_sum_sq_in_order_is_a_sequential_sum():
    d = (RNG.normal(size=(3, 64, 5)) * 10.0 ** RNG.integers(-3, 3, size=(3, 64, 5))).astype(np.float32)
    acc = np.zeros((3, 5), np.float32)
    for i in range(64):
        acc = (acc + d[:, i] * d[:, i]).astype(np.float32)
    np.testing.assert_array_equal(sum_sq_in_order(np, d, 1)[:, 0], acc)


def test_nf_levels():
    nf4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    np.testing.assert_allclose(nf_levels(4), nf4, atol=1e-6)  # bitsandbytes' NF4 table
    for b in (2, 3, 4):
        lv = nf_levels(b)
        assert len(lv) == 2 ** b and (np.diff(lv) > 0).all() and 0.0 in lv and lv[0] == -1 and lv[-1] == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codes_pick_the_nearest_level(bits):
    x = RNG.normal(size=(500, 64)).astype(np.float32)
    a = nf_params(np, x, axis=-1)
    codes = nf_codes(np, x, a, bits)
    xn = x / a.astype(np.float32)
    dist = np.abs(xn[..., None] - nf_levels(bits))
    assert (dist[np.arange(500)[:, None], np.arange(64), codes] <= dist.min(-1) + 1e-7).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_error_within_half_the_largest_gap(bits):
    gap = np.diff(nf_levels(bits)).max()
    x = kvlike(2, 256, 128)
    _, a, x_hat = quantize_token_blocks(np, x, bits, 64)
    bound = np.repeat(a.astype(np.float32), 64, axis=-1) * gap / 2 * (1 + 1e-5)
    assert (np.abs(x_hat - x) <= bound).all()
    xc = x.reshape(2, 2, 128, 128)
    _, ac, xc_hat = quantize_channel_blocks(np, xc, bits, 32)  # blocks of 32 tokens per channel
    bound = np.repeat(ac.astype(np.float32), 32, axis=-2) * gap / 2 * (1 + 1e-5)
    assert (np.abs(xc_hat - xc) <= bound).all()


def test_kmeans_finds_separated_clusters_deterministically():
    centres = RNG.normal(size=(5, 16)) * 10
    x = (centres[RNG.integers(0, 5, 400)] + RNG.normal(size=(400, 16)) * 0.1).astype(np.float32)[None]
    c1, c2 = kmeans(np, x, 5), kmeans(np, x, 5)
    np.testing.assert_array_equal(c1, c2)
    assert np.abs(np.sort(c1[0, :, 0]) - np.sort(centres[:, 0])).max() < 0.1


def test_kmeans_reseeds_empty_clusters():
    x = np.repeat(RNG.normal(size=(3, 8)), [50, 2, 2], axis=0).astype(np.float32)[None]  # 3 distinct points
    c = kmeans(np, x, 3)
    assert len({tuple(r) for r in c[0].round(5)}) == 3  # every distinct point became a centre


def test_assignments():
    x = RNG.normal(size=(2, 20, 8)).astype(np.float32)
    c = RNG.normal(size=(2, 6, 8)).astype(np.float32)
    brute_l2 = ((x[:, :, None] - c[:, None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(nearest_l2(np, x, c), brute_l2)
    r = x[:, :, None] - c[:, None]
    np.testing.assert_array_equal(minmax_assign(np, x, c), (r.max(-1) - r.min(-1)).argmin(-1))
    cheb = chebyshev_centre(x)
    worst = lambda p: np.abs(x - p[:, None]).max(axis=(1, 2))  # noqa: E731
    assert (worst(cheb) <= worst(x.mean(1))).all()  # no worse than the mean in the max norm


def test_v_threshold():
    D = 64
    patterns = RNG.normal(size=(4, D)) * 3
    clustered = (patterns[RNG.integers(0, 4, 300)] + RNG.normal(size=(300, D)) * 0.2).astype(np.float32)
    own = patterns[RNG.integers(0, 4, 300)].astype(np.float32)
    near = clustered - RNG.normal(size=(300, D)).astype(np.float32) * 0.05  # patterns close to each token
    assert v_use_residual(np, clustered[None], near[None]).mean() > 0.95
    # tokens with no structure, "patterns" unrelated to them: the residual is wider than v
    noise = RNG.normal(size=(300, D)).astype(np.float32)
    assert v_use_residual(np, noise[None], own[None]).mean() < 0.05
    # a pattern equal to v exactly at the threshold's edge: zero-range v never uses residuals
    flat = np.ones((1, 5, D), np.float32)
    assert not v_use_residual(np, flat, flat * 0.5).any()
