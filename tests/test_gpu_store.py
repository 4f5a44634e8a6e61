"""The flush kernels that read K/V rows in place (a strided view into the qkv projection, as the
model hands them over) and write the method's storage directly, at any batch rows and chunk
offset: every byte of the storage must equal what the NumPy oracle's store_* functions leave,
including the bytes they must not touch."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.kv import kivi as kivi_ref
from minikv.kv import patterns as pkv_ref

pytestmark = pytest.mark.gpu

B, H, D, NC, G, M = 4, 3, 128, 6, 64, 40


def projection(rng, nb, T, dtype):
    """A (nb, T, (Hq + 2H) D) projection buffer holding fp16 values."""
    qkv = rng.standard_normal((nb, T, 4 * H * D)) * rng.uniform(0.2, 3.0, (nb, T, 1))
    return qkv.astype(np.float16).astype(dtype)


def heads(qkv):
    """k, v (nb, H, T, D): views into the projection (host or device), as ops.qkv_heads returns them."""
    nb, T, _ = qkv.shape
    Hq = 2 * H
    k = qkv[..., Hq * D:(Hq + H) * D].reshape(nb, T, H, D).transpose(0, 2, 1, 3)
    v = qkv[..., (Hq + H) * D:].reshape(nb, T, H, D).transpose(0, 2, 1, 3)
    return k, v


def storage(rng, *shapes_dtypes):
    """Random-filled storage arrays (host), so that writes outside the flush's slots show."""
    out = []
    for shape, dt in shapes_dtypes:
        a = rng.integers(0, 255, shape).astype(np.uint8) if dt == np.uint8 else rng.standard_normal(shape).astype(dt)
        out.append(a)
    return out


def same(got, want, what):
    import cupy as cp

    assert (got is None) == (want is None), what
    if got is not None:
        np.testing.assert_array_equal(cp.asnumpy(got), want, err_msg=what)


CASES = [(np.array([1, 2]), 2, 3), (np.array([3, 0]), 0, 2), (np.array([2]), 5, 1)]  # rows, c0, n


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows,c0,n", CASES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kivi_store_matches_oracle(dtype, rows, c0, n, bits):
    import cupy as cp

    from minikv.cuda import kivi

    rng = np.random.default_rng(bits * 10 + c0)
    qkv = projection(rng, len(rows), n * G + 5, dtype)
    (k, v), (gk, gv) = heads(qkv), heads(cp.asarray(qkv))
    ko = storage(rng, ((B, H, NC, G, D * bits // 8), np.uint8), ((B, H, NC, D), np.float16), ((B, H, NC, D), np.float16))
    vo = storage(rng, ((B, H, NC * G, D * bits // 8), np.uint8), ((B, H, NC * G, 1), np.float16),
                 ((B, H, NC * G, 1), np.float16))
    assert not gk.flags.c_contiguous
    for hat in (True, False):
        gko, gvo = [cp.asarray(a) for a in ko], [cp.asarray(a) for a in vo]
        wk = kivi_ref.store_k_chunks(np, k, n, G, bits, ko, rows, c0, hat)
        wv = kivi_ref.store_v_tokens(np, v, n * G, bits, 128, vo, rows, c0 * G, hat)
        same(kivi.store_k_chunks(cp, gk, n, G, bits, gko, rows, c0, hat), wk, "k hat")
        same(kivi.store_v_tokens(cp, gv, n * G, bits, 128, gvo, rows, c0 * G, hat), wv, "v hat")
        for g, w, name in zip(gko + gvo, ko + vo, ("kc", "ks", "km", "vc", "vs", "vm")):
            same(g, w, name)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows,c0,n", CASES)
@pytest.mark.parametrize("bits", [2, 4])
def test_patternkv_store_matches_oracle(dtype, rows, c0, n, bits):
    """Indices by nearest_l2 against fp16 patterns in the storage, then the residual codes and the
    V mask bits, all written in place."""
    import cupy as cp

    from minikv.cuda import patternkv

    rng = np.random.default_rng(bits * 100 + c0)
    T, t0, m = n * G, c0 * G, 33
    qkv = projection(rng, len(rows), T + 3, dtype)
    (k, v), (gk, gv) = heads(qkv), heads(cp.asarray(qkv))
    pat = (2 * rng.standard_normal((B, H, M, D))).astype(np.float16)
    pat[rows, :, :8] = np.asarray(v[:, :, 7:15], np.float16)  # some V tokens sit on a pattern: the V test passes
    kidx, vidx = storage(rng, ((B, H, NC * G), np.uint8), ((B, H, NC * G), np.uint8))
    ko = storage(rng, ((B, H, NC, G, D * bits // 8), np.uint8), ((B, H, NC, D), np.float16), ((B, H, NC, D), np.float16))
    vo = storage(rng, ((B, H, NC * G, D * bits // 8), np.uint8), ((B, H, NC * G, 2), np.float16),
                 ((B, H, NC * G, 2), np.float16), ((B, H, NC * G // 8), np.uint8))
    gpat = cp.asarray(pat)
    gkidx, gvidx = cp.asarray(kidx), cp.asarray(vidx)
    pkv_ref.store_nearest(np, k, T, pat, m, kidx, rows, t0)
    pkv_ref.store_nearest(np, v, T, pat, m, vidx, rows, t0)
    patternkv.store_nearest(cp, gk, T, gpat, m, gkidx, rows, t0)
    patternkv.store_nearest(cp, gv, T, gpat, m, gvidx, rows, t0)
    same(gkidx, kidx, "kidx")
    same(gvidx, vidx, "vidx")
    for hat in (True, False):
        gko, gvo = [cp.asarray(a) for a in ko], [cp.asarray(a) for a in vo]
        wk = pkv_ref.store_k_residuals(np, k, n, G, bits, ko, pat, kidx, rows, c0, hat)
        wv = pkv_ref.store_v_residuals(np, v, T, bits, 64, vo, pat, vidx, rows, t0, hat)
        same(patternkv.store_k_residuals(cp, gk, n, G, bits, gko, gpat, gkidx, rows, c0, hat), wk, "k hat")
        same(patternkv.store_v_residuals(cp, gv, T, bits, 64, gvo, gpat, gvidx, rows, t0, hat), wv, "v hat")
        for g, w, name in zip(gko + gvo, ko + vo, ("kc", "ks", "km", "vc", "vs", "vm", "vmask")):
            same(g, w, name)
    mask = np.unpackbits(vo[3][rows, :, t0 // 8:(t0 + T) // 8])
    assert mask.any() and not mask.all()  # both kinds of V token were stored
