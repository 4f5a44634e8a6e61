"""The model's CUDA hot ops against their ArrayOps oracle (same inputs, on the GPU)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ops():
    import cupy as cp

    from minikv.cuda.ops import CudaOps
    from minikv.ops import ArrayOps

    return cp, CudaOps(cp), ArrayOps(cp)


def ulp_close(a, b, ulps=2):
    """fp16 results within `ulps` units in the last place of each other."""
    a, b = (x.get().astype(np.float32) for x in (a, b))
    tol = ulps * np.maximum(np.abs(b), 6.1e-5) * 2.0 ** -10
    assert np.isfinite(a).all() and (np.abs(a - b) <= tol).all(), np.abs(a - b).max()


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 37, 576), (1, 5, 4096), (3, 2, 8)])
def test_norms(ops, shape):
    cp, cu, ref = ops
    rng = cp.random.RandomState(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 3
    w = (1 + 0.1 * rng.standard_normal(shape[-1:], dtype=np.float32)).astype(np.float16)
    ulp_close(cu.rms_norm(x, w, 1e-5, np.float16), ref.rms_norm(x, w, 1e-5, np.float16))
    y = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    x1, x2 = x.copy(), x.copy()
    h1, h2 = cu.add_rms_norm(x1, y, w, 1e-6, np.float16), ref.add_rms_norm(x2, y, w, 1e-6, np.float16)
    assert cp.array_equal(x1, x2)  # the residual update is exact
    ulp_close(h1, h2)


def test_embed_and_swiglu(ops):
    cp, cu, ref = ops
    rng = cp.random.RandomState(1)
    table = rng.standard_normal((1000, 96), dtype=np.float32).astype(np.float16)
    tokens = np.random.default_rng(0).integers(0, 1000, size=(3, 7))
    assert cp.array_equal(cu.embed(table, tokens), ref.embed(table, tokens))
    gu = (rng.standard_normal((2, 9, 2 * 1536), dtype=np.float32) * 4).astype(np.float16)
    ulp_close(cu.swiglu(gu), ref.swiglu(gu), ulps=1)


@pytest.mark.parametrize("H,Hkv,D,T", [(32, 8, 128, 5), (9, 3, 64, 1), (4, 4, 8, 17)])
def test_rope_in_place_on_qkv(ops, H, Hkv, D, T):
    cp, cu, ref = ops
    from minikv.config import RopeConfig
    from minikv.models.rope import Rope

    rng = cp.random.RandomState(2)
    qkv = rng.standard_normal((2, T, (H + 2 * Hkv) * D), dtype=np.float32).astype(np.float16)
    rope = Rope(RopeConfig(theta=500000.0, type="llama3", factor=8.0), D, cp)
    step = rope.step(cp.asarray([[100 + t for t in range(T)], [5000 + t for t in range(T)]], dtype=np.int32))
    want = ref.qkv_heads(qkv.copy(), step, H, Hkv, D)
    got = cu.qkv_heads(qkv.copy(), step, H, Hkv, D)
    for g, w in zip(got, want):
        ulp_close(g, w, ulps=4)  # sincosf vs cupy's cos/sin tables, then one fp16 rounding


def test_contiguous_copies_projection_views(ops):
    """The k/v heads of a projection (strided fp16 views) come out as exact contiguous copies;
    other layouts take CuPy's copy."""
    cp, cu, _ = ops
    qkv = cp.asarray(np.random.default_rng(0).standard_normal((2, 37, 6 * 128)).astype(np.float16))
    k = qkv[..., 4 * 128:5 * 128].reshape(2, 37, 1, 128).transpose(0, 2, 1, 3)[:, :, 3:]
    v = qkv[..., 4 * 128:].reshape(2, 37, 2, 128).transpose(0, 2, 1, 3)
    for x in (k, v, v[:, :, :, :64], v.astype(np.float32)):
        got = cu.contiguous(x)
        assert got.flags.c_contiguous and got.dtype == x.dtype
        np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(x))


def test_wrappers_check_their_arguments(ops):
    cp, cu, _ = ops
    x = cp.ones((2, 64), np.float32)
    with pytest.raises(TypeError):
        cu.rms_norm(x, cp.ones(64, np.float32), 1e-5, np.float16)  # weight must be fp16
    with pytest.raises(ValueError):
        cu.rms_norm(x, cp.ones(32, np.float16), 1e-5, np.float16)  # wrong length


def _matmul_case(cp, M, K, N, bias, seed=3):
    rng = cp.random.RandomState(seed)
    x = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    w = (rng.standard_normal((N, K), dtype=np.float32) / np.sqrt(K)).astype(np.float16)
    b = rng.standard_normal(N, dtype=np.float32).astype(np.float16) if bias else None
    return x, w, b


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K,N", [(8, 1), (64, 17), (576, 1536), (1000, 3), (4104, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_against_float64(ops, M, K, N, bias):
    """gemv.cu rounds its float32 sum once to fp16 (then adds the fp16 bias, rounding again), as
    cuBLAS does: within one fp16 rounding of each step of the exact result."""
    cp, cu, _ = ops
    x, w, b = _matmul_case(cp, M, K, N, bias)
    got = cu.gemv(x, w, b).get().astype(np.float64)
    prod = x.get().astype(np.float64) @ w.get().astype(np.float64).T
    want = prod + (b.get().astype(np.float64) if bias else 0.0)
    tol = 2.0 ** -11 * (np.abs(prod) + np.abs(want)) * 1.01 + 1e-6 * np.sqrt(K)  # two half-ulp roundings + float32 sums
    assert got.shape == (M, N) and (np.abs(got - want) <= tol).all(), np.abs(got - want).max()


def test_linear_takes_gemv_for_decode_rows_and_cublas_beyond(ops):
    """CudaOps.linear runs gemv for up to GEMV_ROWS rows (any leading shape) and cuBLAS otherwise
    (up to 64 rows through cuda/gemm.py); all agree with ArrayOps.linear within fp16 rounding."""
    cp, cu, ref = ops
    from minikv.cuda.ops import GEMV_ROWS

    calls = []
    gemv = cu.gemv
    cu.gemv = lambda *a: calls.append(a[0].shape) or gemv(*a)
    try:
        for shape, K, bias in [((1, 1), 576, True), ((2, 4), 64, False), ((GEMV_ROWS + 1, 1), 64, False), ((1, 3), 60, False)]:
            x, w, b = _matmul_case(cp, int(np.prod(shape)), K, 40, bias)
            x = x.reshape(*shape, K)
            ulp_close(cu.linear(x, w, b), ref.linear(x, w, b), ulps=2)
    finally:
        cu.gemv = gemv
    assert calls == [(1, 576), (8, 64)]  # 9 rows and K = 60 went to cuBLAS


def test_gemv_checks_its_arguments(ops):
    cp, cu, _ = ops
    x, w, _ = _matmul_case(cp, 2, 64, 8, False)
    with pytest.raises(ValueError):
        cu.gemv(cp.ones((9, 64), np.float16), w)  # too many rows
    with pytest.raises(ValueError):
        cu.gemv(x, cp.ones((8, 32), np.float16))  # K differs
    with pytest.raises(TypeError):
        cu.gemv(x, w, cp.ones(8, np.float32))  # bias must be fp16
    with pytest.raises(ValueError):
        cu.gemv(x[:, 4:].copy()[:, :56], w[:, :56].copy())  # not C-contiguous (a column slice)


@pytest.mark.parametrize("D", [8, 64, 128, 256])
@pytest.mark.parametrize("back", [False, True])
def test_hadamard_equals_its_oracle_bit_for_bit(ops, D, back):
    """The cache's rotation (kv rot=) on strided head views of a projection, as the cache calls it."""
    cp, cu, ref = ops
    from minikv.kv.chunked import rotation_signs

    signs = cp.asarray(rotation_signs(D))
    qkv = (cp.random.RandomState(3).standard_normal((2, 5, 7 * D), dtype=np.float32) * 4).astype(np.float16)
    x = qkv[..., 2 * D:5 * D].reshape(2, 5, 3, D).transpose(0, 2, 1, 3)  # (B, H, T, D) view
    got, want = cu.hadamard(x, signs, back), ref.hadamard(x, signs, back)
    assert got.shape == want.shape == x.shape and cp.array_equal(got, want)
    assert got.transpose(0, 2, 1, 3).flags.c_contiguous  # the (B, T, H, D) layout the model reshapes for free


@pytest.mark.parametrize("M", [9, 32, 64])
def test_capturable_gemm_is_a_matmul(M):
    """cuda/gemm.py's cuBLAS call (a server batch's decode matmuls) against CuPy's matmul."""
    import cupy as cp

    from minikv.cuda.gemm import Gemm

    rng = np.random.default_rng(M)
    x = cp.asarray(rng.standard_normal((M, 576)).astype(np.float16))
    w = cp.asarray((rng.standard_normal((1536, 576)) * 0.05).astype(np.float16))
    got = Gemm(cp)(x, w)
    want = (x.astype(np.float32) @ w.astype(np.float32).T)
    np.testing.assert_allclose(got.get().astype(np.float32), want.get(), rtol=1e-2, atol=1e-2)
