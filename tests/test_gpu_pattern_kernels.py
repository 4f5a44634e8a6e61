"""PatternKV's CUDA mining and assignment kernels (minikv.cuda.patternkv) against their NumPy
oracles (minikv.kv.patterns) run on the same host data: every output must be bit-identical."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.kv import patterns as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    import cupy as cp

    from minikv.cuda import patternkv

    return cp, patternkv


def fp16(a) -> np.ndarray:
    """float32 holding fp16 values, as the caches hand the kernels."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32))


def make_points(kind: str, N: int, P: int, D: int, seed: int) -> np.ndarray:
    """(N, P, D) test sets. clustered: blobs; offset: blobs on a large per-channel constant (like
    Qwen2's key biases); tight: a small ball on a constant (near ties everywhere); outliers: a few huge tokens (attention sinks); dups: a handful of
    distinct points on a coarse grid, repeated, so that KMeans sees duplicate centres and empty
    clusters (coarse values keep every float64 dot product exact)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(N)[:, None]
    if kind == "normal":
        x = rng.standard_normal((N, P, D))
    elif kind in ("clustered", "offset"):
        k = max(1, min(12, P // 3))
        blobs = 3.0 * rng.standard_normal((N, k, D))
        x = blobs[rows, rng.integers(0, k, (N, P))] + 0.5 * rng.standard_normal((N, P, D))
        if kind == "offset":
            x += rng.uniform(-80.0, 80.0, D)
    elif kind == "tight":  # a small ball far from 0: every approximate distance ties, all decided in float64
        x = rng.uniform(-4.0, 4.0, D) + 0.01 * rng.standard_normal((N, P, D))
    elif kind == "outliers":
        x = rng.standard_normal((N, P, D))
        x[:, rng.integers(0, P, max(1, P // 100))] *= 40.0
    elif kind == "dups":
        k = max(1, min(P // 2, 6))
        base = rng.integers(-16, 17, (N, k, D)) / 4.0
        x = base[rows, rng.integers(0, k, (N, P))]
    else:
        raise ValueError(kind)
    return fp16(x)


# (N, P, D, m, kind): P in {1, 5, 31, 32, 33, 500, 2000}, m == P included; m up to 32 as the
# cache mines, and a few larger m (several centre chunks; cluster sums through global atomics).
KMEANS_CASES = [
    (1, 1, 64, 1, "normal"),
    (2, 5, 128, 5, "normal"),
    (3, 5, 64, 5, "dups"),
    (1, 31, 128, 31, "normal"),
    (4, 31, 64, 8, "clustered"),
    (5, 32, 128, 32, "clustered"),
    (6, 32, 64, 3, "dups"),
    (6, 33, 64, 32, "normal"),
    (7, 33, 128, 16, "dups"),
    (12, 500, 64, 32, "clustered"),
    (8, 500, 128, 10, "offset"),
    (9, 500, 128, 32, "dups"),
    (2, 500, 128, 32, "tight"),
    (3, 300, 64, 40, "tight"),
    (11, 500, 64, 32, "outliers"),
    (2, 2000, 128, 32, "clustered"),
    (3, 2000, 64, 24, "offset"),
    (10, 2000, 128, 7, "outliers"),
    (1, 2000, 64, 1, "normal"),
    (4, 2000, 128, 32, "dups"),
    (3, 500, 128, 48, "clustered"),
    (2, 300, 64, 100, "dups"),
    (1, 600, 64, 256, "normal"),
]


def assert_same(got, want):
    got = got.get()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("N,P,D,m,kind", KMEANS_CASES)
def test_kmeans_matches_oracle(gpu, N, P, D, m, kind):
    """The same centres from float32 points and from the same points in fp16 (what the cache
    hands over)."""
    cp, pk = gpu
    x = make_points(kind, N, P, D, seed=P * 131 + m)
    want = ref.kmeans(np, x, m)
    assert_same(pk.kmeans(cp, cp.asarray(x), m), want)
    if P >= 500:
        assert_same(pk.kmeans(cp, cp.asarray(x.astype(np.float16)), m), want)


@pytest.mark.parametrize("iters,tol", [(0, 1e-4), (1, 1e-4), (3, 1e-4), (30, 0.0), (50, 1e-2)])
def test_kmeans_iterations_and_tolerance(gpu, iters, tol):
    cp, pk = gpu
    for kind in ("normal", "clustered", "dups"):
        x = make_points(kind, 5, 700, 128, seed=iters)
        assert_same(pk.kmeans(cp, cp.asarray(x), 20, iters=iters, tol=tol), ref.kmeans(np, x, 20, iters=iters, tol=tol))


def test_kmeans_prefill_size(gpu):
    """The size the first flush mines: 8 sets (kv heads x sequences) of an 8192-token prefill."""
    cp, pk = gpu
    x = make_points("clustered", 8, 8192, 128, seed=7)
    assert_same(pk.kmeans(cp, cp.asarray(x), 32), ref.kmeans(np, x, 32))


def test_kmeans_speed(gpu):
    """Mining a prefill must cost milliseconds: 8 sets x 8192 points x 128 dims, m = 32, all 30
    Lloyd iterations (tol = 0). Prints the time (pytest -s); fails only if pathologically slow."""
    import time

    cp, pk = gpu
    x = cp.asarray(make_points("clustered", 8, 8192, 128, seed=11))
    pk.kmeans(cp, x, 32, iters=2)  # compile / load the kernels
    cp.cuda.Stream.null.synchronize()
    t = time.perf_counter()
    pk.kmeans(cp, x, 32, tol=0.0)
    cp.cuda.Stream.null.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    print(f"\nkmeans N=8 P=8192 D=128 m=32, 30 iterations: {ms:.2f} ms")
    assert ms < 200.0


def test_kmeans_sets_are_independent(gpu):
    """Each set freezes on its own: one set's result does not depend on its neighbours."""
    cp, pk = gpu
    x = np.concatenate([make_points("dups", 3, 500, 64, 1), make_points("normal", 3, 500, 64, 2)])
    both = pk.kmeans(cp, cp.asarray(x), 12).get()
    alone = pk.kmeans(cp, cp.asarray(x[3:].copy()), 12).get()
    np.testing.assert_array_equal(both[3:], alone)


# (N, T, D, M): M beyond one 32-centre chunk included.
L2_CASES = [(1, 1, 64, 1), (3, 33, 128, 5), (5, 500, 64, 32), (12, 2000, 128, 33), (2, 31, 128, 70)]


@pytest.mark.parametrize("N,T,D,M", L2_CASES)
def test_nearest_l2_matches_oracle(gpu, N, T, D, M):
    cp, pk = gpu
    rng = np.random.default_rng(T + M)
    x = make_points("clustered", N, T, D, seed=M)
    picks = x[np.arange(N)[:, None], rng.integers(0, T, (N, M))]
    for c in (fp16(picks + 0.3 * rng.standard_normal(picks.shape)),  # fp16 patterns, as stored
              np.ascontiguousarray(picks + 0.3 * rng.standard_normal(picks.shape), dtype=np.float32),
              np.ascontiguousarray(picks[:, rng.integers(0, M, M)])):  # duplicate rows: ties
        assert_same(pk.nearest_l2(cp, cp.asarray(x), cp.asarray(c)), ref.nearest_l2(np, x, c))


def test_nearest_l2_near_ties_and_float32_points(gpu):
    """Points the tensor-core filter cannot settle: near ties (a tight ball), float32 values that
    fp16 rounds, and values past fp16's range (every centre then goes to float64)."""
    cp, pk = gpu
    rng = np.random.default_rng(5)
    for kind in ("tight", "normal"):
        x = make_points(kind, 4, 300, 128, seed=9)
        c = np.ascontiguousarray(x[:, rng.integers(0, 300, 40)] + 1e-3 * rng.standard_normal((4, 40, 128)),
                                 dtype=np.float32)
        assert_same(pk.nearest_l2(cp, cp.asarray(x), cp.asarray(c)), ref.nearest_l2(np, x, c))
    x = rng.standard_normal((3, 257, 64)).astype(np.float32)  # not fp16 values
    x[0, :5] *= 1e5  # past fp16's largest value
    c = np.ascontiguousarray(x[:, rng.integers(0, 257, 33)] + 0.1 * rng.standard_normal((3, 33, 64)), dtype=np.float32)
    assert_same(pk.nearest_l2(cp, cp.asarray(x), cp.asarray(c)), ref.nearest_l2(np, x, c))


def test_nearest_l2_on_mined_patterns(gpu):
    cp, pk = gpu
    x = make_points("offset", 6, 1000, 128, seed=3)
    c = fp16(ref.kmeans(np, x, 32))
    assert_same(pk.nearest_l2(cp, cp.asarray(x), cp.asarray(c)), ref.nearest_l2(np, x, c))


# (N, T, D, M): T = 128 tokens per chunk and M up to 256 patterns as in the cache; odd sizes too.
MINMAX_CASES = [(1, 1, 64, 1), (2, 37, 128, 5), (6, 128, 128, 256), (3, 128, 64, 300), (4, 17, 8, 33),
                (12, 128, 64, 40)]


@pytest.mark.parametrize("N,T,D,M", MINMAX_CASES)
def test_minmax_assign_matches_oracle(gpu, N, T, D, M):
    cp, pk = gpu
    rng = np.random.default_rng(T * 7 + M)
    x = make_points("outliers", N, T, D, seed=M)
    c = fp16(rng.standard_normal((N, M, D)))
    c[:, M // 2:] = c[:, rng.integers(0, max(1, M // 2), M - M // 2)]  # duplicate patterns: ties
    c[:, 0] = ref.chebyshev_centre(x)  # the chunk's own Chebyshev centre, as the cache adds
    c = fp16(c)
    for xs in (x, fp16(np.round(x))):  # coarse tokens: many equal ranges
        assert_same(pk.minmax_assign(cp, cp.asarray(xs), cp.asarray(c)), ref.minmax_assign(np, xs, c))


@pytest.mark.parametrize("N,T,D", [(1, 1, 64), (3, 7, 128), (12, 128, 128), (5, 33, 3), (64, 128, 64)])
def test_chebyshev_centre_matches_oracle(gpu, N, T, D):
    cp, pk = gpu
    x = make_points("outliers", N, T, D, seed=T + D)
    assert_same(pk.chebyshev_centre(cp.asarray(x)), ref.chebyshev_centre(x))


@pytest.mark.parametrize("N,T,D", [(1, 1, 64), (4, 128, 128), (12, 300, 64), (3, 9, 96), (2, 5, 20)])
def test_v_use_residual_matches_oracle(gpu, N, T, D):
    cp, pk = gpu
    rng = np.random.default_rng(N * T + D)
    v = fp16(rng.standard_normal((N, T, D)) * rng.uniform(0.01, 10.0, (N, T, 1)))
    c = fp16(v + rng.uniform(0.0, 1.5, (N, T, 1)) * rng.standard_normal((N, T, D)) * np.abs(v).max(-1, keepdims=True))
    v[:, ::5] = v[:, ::5, :1]  # constant tokens: range 0, never residualised
    c[:, 1::7] = v[:, 1::7]  # exact patterns: residual range 0
    want = ref.v_use_residual(np, v, c)
    assert_same(pk.v_use_residual(cp, cp.asarray(v), cp.asarray(c)), want)
    if T >= 100:
        assert want.any() and not want.all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("nb,H,n,G,extra,D,M,bits,group", [(1, 8, 3, 64, 0, 128, 40, 2, 128), (2, 3, 2, 32, 17, 64, 7, 3, 64),
                                                           (1, 2, 1, 16, 5, 128, 256, 4, 32)])
def test_pack_residuals_match_oracle(gpu, dtype, nb, H, n, G, extra, D, M, bits, group):
    """The fused PatternKV packing (pattern gather, residual, V test, kivi codes) reads fp16 or
    float32 K/V rows in place, past-the-chunks window tokens included, and gives the oracle's
    codes, scales, mins, V verdicts and rebuilt tokens bit for bit."""
    cp, pk = gpu
    rng = np.random.default_rng(nb * n * D + M + bits)
    w, T = n * G + extra, n * G
    pat = (rng.standard_normal((nb, H, M, D)) * 2).astype(np.float16)
    idx = rng.integers(0, M, (nb, H, T)).astype(np.uint8)
    near = np.take_along_axis(pat, idx[..., None].astype(np.int64), 2).astype(np.float32)
    x = rng.standard_normal((nb, H, w, D)) * rng.uniform(0.1, 3.0, (nb, H, w, 1))
    x[:, :, :T:2] = near[:, :, ::2] + 0.05 * rng.standard_normal(near[:, :, ::2].shape)  # residual passes the V test
    x[:, :, 3:T:11] = x[:, :, 3:T:11, :1]  # constant tokens (range 0: stored raw)
    x = x.astype(np.float16).astype(dtype)
    gx, gpat, gidx = cp.asarray(x), cp.asarray(pat), cp.asarray(idx)
    for hat in (True, False):
        got = pk.pack_k_residuals(cp, gx, gpat, gidx, n, G, bits, hat)
        want = ref.pack_k_residuals(np, x, pat, idx, n, G, bits, hat)
        for g, r in zip(got, want):
            assert (g is None) == (r is None) and (g is None or np.array_equal(cp.asnumpy(g), r))
        got = pk.pack_v_residuals(cp, gx, gpat, gidx, T, bits, group, hat)
        want = ref.pack_v_residuals(np, x, pat, idx, T, bits, group, hat)
        for g, r in zip(got, want):
            assert (g is None) == (r is None) and (g is None or np.array_equal(cp.asnumpy(g), r))
    assert want[3].any() and not want[3].all()


def test_wrappers_check_arguments(gpu):
    cp, pk = gpu
    x = cp.zeros((2, 8, 64), np.float32)
    with pytest.raises(TypeError):
        pk.kmeans(cp, x.astype(np.float64), 2)
    with pytest.raises(ValueError):
        pk.kmeans(cp, x[:, :4], 6)  # m > P
    with pytest.raises(ValueError):
        pk.minmax_assign(cp, x, cp.zeros((3, 4, 64), np.float32))  # sets differ
    with pytest.raises(ValueError):
        pk.v_use_residual(cp, x, x[:, :4].copy())
    with pytest.raises(TypeError):
        pk.chebyshev_centre(np.zeros((2, 8, 64), np.float32))  # host array


def test_unsupported_shapes_take_the_oracle(gpu):
    """Strided inputs are made contiguous and head dims the kernels are not built for (e.g.
    stories260K's 8) run the array-op oracle: same results, not an error."""
    cp, pk = gpu
    from minikv.kv import patterns

    rng = np.random.default_rng(3)
    x = cp.asarray(rng.normal(size=(2, 40, 16)).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(pk.kmeans(cp, x, 4).get(), patterns.kmeans(np, x.get(), 4))
    big = cp.asarray(rng.normal(size=(2, 80, 64)).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(pk.kmeans(cp, big[:, ::2], 5).get(), patterns.kmeans(np, big.get()[:, ::2], 5))
    c = cp.asarray(rng.normal(size=(2, 3, 16)).astype(np.float32))
    np.testing.assert_array_equal(pk.nearest_l2(cp, x, c).get(), patterns.nearest_l2(np, x.get(), c.get()))
