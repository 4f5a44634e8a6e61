"""The CUDA quantizer kernels (kernels_cu/kivi.cu, nqkv.cu) against their NumPy oracles
(minikv.kv.kivi, minikv.kv.nqkv): the same input gives the same bytes, fp16 params and x_hat.

The one freedom left is the sign of a zero min/max: NumPy's reduction order decides whether
min(+0, -0) is +0 or -0, and assert_array_equal (== on floats) treats the two as equal."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.kv import kivi as kivi_ref
from minikv.kv import nqkv as nqkv_ref
from minikv.kv.packing import nf_levels, nf_midpoints

pytestmark = pytest.mark.gpu

KINDS = ("normal", "outliers", "offset", "const", "zeros", "tiny", "huge", "ints", "levels", "fp16")


def make_data(shape, kind: str, seed: int = 0) -> np.ndarray:
    """float32 test data of `shape` (..., rows, D) with the features that break quantizers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    D = shape[-1]
    if kind == "outliers":  # a few loud channels and rare spikes
        x[..., rng.choice(D, size=max(1, D // 16), replace=False)] *= 40
        spikes = rng.random(shape) < 0.002
        x[spikes] = rng.choice([-1.0, 1.0], spikes.sum()) * rng.uniform(200, 3000, spikes.sum())
    elif kind == "offset":  # Qwen2-like key biases: values ~300 (or -300) with a small spread
        bias = rng.choice([300.0, -300.0, 0.5, 17.0], size=D) + rng.uniform(-4, 4, size=D)
        x = (bias + x * 0.05).astype(np.float32)
    elif kind == "const":  # zero ranges: every 3rd token row and every 5th channel constant
        x[..., ::3, :] = -2.5
        x[..., ::5] = -2.5
        x[..., 1::7, 2::5] = 0.75  # (rows 1::7 stay non-constant; channels 2::5 too)
    elif kind == "zeros":  # exact zeros of both signs, and all-zero rows (whole sets for K)
        r = rng.random(shape)
        x[r < 0.4] = 0.0
        x[(r >= 0.4) & (r < 0.6)] = -0.0
        flat = x.reshape(-1, D)
        flat[: max(1, flat.shape[0] // 4)] = -0.0
        flat[: max(1, flat.shape[0] // 8)] = 0.0
        # some rows of zeros and of values that fp16 rounds to +-0 (the nudge must step them to
        # the smallest subnormal of their side)
        z = flat[flat.shape[0] // 8: max(1, flat.shape[0] // 4)]
        hit = rng.random(z.shape) < 0.02
        z[hit] = rng.choice(np.float32([1e-30, -1e-30, 2e-8, -2e-8]), hit.sum())
        x = flat.reshape(shape)
    elif kind == "tiny":  # fp16 subnormal ranges and float32 subnormals
        x *= np.float32(3e-6)
        x[rng.random(shape) < 0.05] = np.float32(1e-40)
        x[rng.random(shape) < 0.05] = np.float32(-7e-39)
    elif kind == "huge":  # near the top of fp16
        x = np.clip(x * 6000, -30000, 30000).astype(np.float32)
    elif kind == "ints":  # small integers: exact rint ties (x.5) with 2-bit scales of 2
        x = rng.integers(0, 7, size=shape).astype(np.float32)
    elif kind == "levels":  # values exactly on NF levels and midpoints, absmax exactly 1
        pool = np.concatenate([np.float32([0.0, -0.0, 1.0, -1.0])]
                              + [nf_levels(b) for b in (2, 3, 4)] + [nf_midpoints(b) for b in (2, 3, 4)])
        x = rng.choice(pool, size=shape).astype(np.float32)
        x[..., ::8] = 1.0  # every 8-channel run along a row holds one |x| = 1 ...
        x[..., ::8, :] = -1.0  # ... and so does every 8-token run along a channel
    elif kind == "fp16":  # fp16-valued, as the caches get them
        x = (x * 3).astype(np.float16).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def same(got, want, what: str):
    got = got.get()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_array_equal(got, want, err_msg=what)


def compare(gpu_fn, ref_fn, x: np.ndarray, *args, what: str = ""):
    import cupy as cp

    got = gpu_fn(cp, cp.asarray(x), *args)
    want = ref_fn(np, x, *args)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        same(g, w, f"{what} output {i}")


@pytest.fixture(scope="module")
def cuda_kivi():
    from minikv.cuda import kivi

    return kivi


@pytest.fixture(scope="module")
def cuda_nqkv():
    from minikv.cuda import nqkv

    return nqkv


# (leading dims, n chunks, G, D)
K_SHAPES = [((1, 8), 1, 128, 128), ((3, 2), 3, 64, 64), ((), 5, 128, 64), ((2,), 2, 64, 128),
            ((1, 8), 4, 128, 64)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("shape", K_SHAPES, ids=str)
def test_kivi_k_chunks(cuda_kivi, bits, shape):
    lead, n, G, D = shape
    for i, kind in enumerate(KINDS):
        x = make_data((*lead, n, G, D), kind, seed=i)
        compare(cuda_kivi.quantize_k_chunks, kivi_ref.quantize_k_chunks, x, bits, what=f"k {kind}")


# (leading dims, T tokens, D, group)
V_SHAPES = [((1, 8), 136, 128, 128), ((3, 2), 37, 128, 64), ((), 1, 64, 64), ((2,), 1000, 64, 64),
            ((1, 8), 8, 128, 64), ((3, 2), 520, 128, 128), ((1, 2), 7, 128, 32)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("shape", V_SHAPES, ids=str)
def test_kivi_v_tokens(cuda_kivi, bits, shape):
    lead, T, D, group = shape
    for i, kind in enumerate(KINDS):
        x = make_data((*lead, T, D), kind, seed=100 + i)
        compare(cuda_kivi.quantize_v_tokens, kivi_ref.quantize_v_tokens, x, bits, group, what=f"v {kind}")


FITS = [(16, "mse"), (8, "minmax"), (8, "mse")]  # (sc, fit): kernels_cu/kivi_fit.cu


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sc,fit", FITS)
@pytest.mark.parametrize("shape", K_SHAPES[:4], ids=str)
def test_kivi_fit_k_chunks(cuda_kivi, bits, sc, fit, shape):
    lead, n, G, D = shape
    for i, kind in enumerate(KINDS):
        x = make_data((*lead, n, G, D), kind, seed=i)
        compare(cuda_kivi.quantize_k_chunks, kivi_ref.quantize_k_chunks, x, bits, sc, fit, what=f"k {kind} {sc} {fit}")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sc,fit", FITS)
@pytest.mark.parametrize("shape", V_SHAPES[:5] + V_SHAPES[6:], ids=str)
def test_kivi_fit_v_tokens(cuda_kivi, bits, sc, fit, shape):
    lead, T, D, group = shape
    for i, kind in enumerate(KINDS):
        x = make_data((*lead, T, D), kind, seed=100 + i)
        compare(cuda_kivi.quantize_v_tokens, kivi_ref.quantize_v_tokens, x, bits, group, sc, fit,
                what=f"v {kind} {sc} {fit}")


# (leading dims, T tokens, D, bs)
T_SHAPES = [((1, 8), 136, 128, 64), ((3, 2), 37, 128, 32), ((), 1, 64, 64), ((2,), 1000, 64, 32),
            ((1, 8), 8, 128, 32), ((1, 2), 257, 128, 128), ((3, 2), 24, 64, 8)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", T_SHAPES, ids=str)
def test_nqkv_token_blocks(cuda_nqkv, bits, shape):
    lead, T, D, bs = shape
    for i, kind in enumerate(KINDS):
        x = make_data((*lead, T, D), kind, seed=200 + i)
        compare(cuda_nqkv.quantize_token_blocks, nqkv_ref.quantize_token_blocks, x, bits, bs,
                what=f"token {kind}")


# (leading dims, n chunks, G, D, bs)
C_SHAPES = [((1, 8), 1, 128, 128, 64), ((3, 2), 3, 64, 64, 32), ((), 5, 128, 64, 32),
            ((2,), 2, 64, 128, 64), ((1, 8), 4, 128, 64, 128), ((1, 3), 2, 64, 128, 8)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", C_SHAPES, ids=str)
def test_nqkv_channel_blocks(cuda_nqkv, bits, shape):
    lead, n, G, D, bs = shape
    for i, kind in enumerate(KINDS):
        x = make_data((*lead, n, G, D), kind, seed=300 + i)
        compare(cuda_nqkv.quantize_channel_blocks, nqkv_ref.quantize_channel_blocks, x, bits, bs,
                what=f"channel {kind}")


def test_prefill_sized(cuda_kivi, cuda_nqkv):
    """A whole 2048-token prompt of 8 kv heads at once, as at prefill."""
    k = make_data((1, 8, 16, 128, 128), "outliers", seed=7)
    v = make_data((1, 8, 2048, 128), "normal", seed=8)
    compare(cuda_kivi.quantize_k_chunks, kivi_ref.quantize_k_chunks, k, 2, what="k")
    compare(cuda_kivi.quantize_v_tokens, kivi_ref.quantize_v_tokens, v, 2, 128, what="v")
    compare(cuda_nqkv.quantize_token_blocks, nqkv_ref.quantize_token_blocks, v, 3, 64, what="token")
    compare(cuda_nqkv.quantize_channel_blocks, nqkv_ref.quantize_channel_blocks, k, 4, 64, what="channel")


def test_empty_and_unaligned_inputs(cuda_kivi, cuda_nqkv):
    import cupy as cp

    x = make_data((2, 0, 64), "normal")
    compare(cuda_kivi.quantize_v_tokens, kivi_ref.quantize_v_tokens, x, 4, 64, what="empty v")
    compare(cuda_nqkv.quantize_token_blocks, nqkv_ref.quantize_token_blocks, x, 2, 32, what="empty token")
    # A contiguous view 4 bytes into its allocation (not float4-aligned) is copied, not misread.
    x = make_data((2, 3, 64, 64), "offset", seed=3)
    flat = cp.zeros(x.size + 1, np.float32)
    flat[1:] = cp.asarray(x.ravel())
    xv = flat[1:].reshape(x.shape)
    assert xv.flags.c_contiguous and xv.data.ptr % 16
    for g, w in zip(cuda_kivi.quantize_k_chunks(cp, xv, 3), kivi_ref.quantize_k_chunks(np, x, 3)):
        same(g, w, "unaligned k")
    for g, w in zip(cuda_nqkv.quantize_channel_blocks(cp, xv, 2, 32), nqkv_ref.quantize_channel_blocks(np, x, 2, 32)):
        same(g, w, "unaligned channel")


def test_wrappers_check_their_arguments(cuda_kivi, cuda_nqkv):
    import cupy as cp

    k = cp.ones((1, 2, 1, 64, 64), np.float32)
    v = cp.ones((1, 2, 16, 64), np.float32)
    calls = [lambda a: cuda_kivi.quantize_k_chunks(cp, a, 2), lambda a: cuda_kivi.quantize_v_tokens(cp, a, 2, 64),
             lambda a: cuda_nqkv.quantize_token_blocks(cp, a, 2, 32),
             lambda a: cuda_nqkv.quantize_channel_blocks(cp, a, 2, 32)]
    for call, x in zip(calls, (k, v, v, k)):
        call(x)  # the right input works
        with pytest.raises(TypeError):
            call(x.astype(np.float16))  # wrong dtype
        with pytest.raises(TypeError):
            call(x.astype(np.float64))
        with pytest.raises(TypeError):
            call(x.get())  # a NumPy array
        with pytest.raises(ValueError):
            call(cp.swapaxes(x, -1, -2))  # not C-contiguous
        with pytest.raises(ValueError):
            call(x[..., ::2])  # not C-contiguous
        with pytest.raises(ValueError):
            call(x[..., :60].copy())  # rows not a multiple of 8 values
    with pytest.raises(ValueError):
        cuda_kivi.quantize_k_chunks(cp, k, 5)  # unsupported bits
    with pytest.raises(ValueError):
        cuda_nqkv.quantize_token_blocks(cp, v, 8, 32)
    with pytest.raises(ValueError):
        cuda_kivi.quantize_v_tokens(cp, v, 2, 48)  # group does not divide D
    with pytest.raises(ValueError):
        cuda_nqkv.quantize_token_blocks(cp, v, 2, 12)  # bs not a multiple of 8
    with pytest.raises(ValueError):
        cuda_nqkv.quantize_channel_blocks(cp, k, 2, 48)  # bs does not divide G
