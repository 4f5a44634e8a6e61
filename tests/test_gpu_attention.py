"""The fused attention kernel against float64 attention over what the cache holds (decoded
from its packed storage by the NumPy oracle), for every method and many shapes."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.backend import get_backend
from minikv.kv import make_cache
from minikv.kv.base import KVGeometry

pytestmark = pytest.mark.gpu

SPECS = ["fp16", "kivi:2", "kivi:3,vbits=4", "kivi:4,sink=3", "kivi:8", "nqkv:2", "nqkv:4,kaxis=channel,bs=32",
         "patternkv:2", "patternkv:3,sink=5,r=192", "patternkv:2,mmax=33,g=64,r=64", "patternkv:4,vbits=2,sink=2"]
# what decode.cu takes (steps of <= 8 query rows per kv head); the rest run attention.cu
DECODE_SPECS = ["fp16", "kivi:2", "kivi:4,sink=3", "kivi:8", "patternkv:2", "patternkv:2,mmax=33,g=64,r=64",
                "patternkv:4,vbits=2,sink=2", "nqkv:2", "nqkv:4", "nqkv:4,vbits=2,bs=32,sink=3",
                "kivi:3", "kivi:2,kbits=3", "kivi:4,vbits=3,sink=3", "kivi:2,vbits=3"]  # 3-bit: decode.cu's trial


def structured(rng, B, Hkv, T, D):
    """fp16-valued keys/values like real ones: clusters, drift, outlier channels."""
    centres = rng.normal(size=(B, Hkv, 8, D)) * 2
    x = np.take_along_axis(centres, rng.integers(0, 8, size=(B, Hkv, T))[..., None], 2)
    x = x + rng.normal(size=(B, Hkv, T, D)) * 0.5 + np.linspace(0, 1, T)[:, None] * rng.normal(size=D)
    x[..., ::16] += 8.0
    return x.astype(np.float16)


def build(spec, B, H, Hkv, D, lengths, step, seed, growth=1.0):
    """A cache (reference attention, so `reconstruct` is exact) holding `lengths` tokens per
    sequence, fed as a prefill then one decode step, then begun on a step of `step` tokens.
    growth: keys scaled from 1 up to this along the sequence (scores whose max keeps rising)."""
    import cupy as cp

    be = get_backend("cuda")
    rng = np.random.default_rng(seed)
    geom = KVGeometry(2, H, Hkv, D, D ** -0.5)
    cache = make_cache(spec, geom, B, max(lengths) + step + 8, be, attention="reference")
    total = max(lengths) + step
    K, V = structured(rng, B, Hkv, total, D), structured(rng, B, Hkv, total, D)[..., ::-1].copy()
    K = (K * np.linspace(1.0, growth, total)[:, None]).astype(np.float16)
    for n in ([min(l, 300) for l in lengths], [l - min(l, 300) for l in lengths]):
        T = max(max(n), 1)
        cache.begin_step(n)
        for L in range(2):
            ks = np.zeros((B, Hkv, T, D), np.float16)
            vs = np.zeros_like(ks)
            for b in range(B):
                lo = int(cache.lengths[b])
                ks[b, :, :n[b]], vs[b, :, :n[b]] = K[b, :, lo:lo + n[b]], V[b, :, lo:lo + n[b]]
            cache.update(L, cp.asarray(ks), cp.asarray(vs))
            cache.commit(L)
        cache.end_step()
    # the step under test: its keys/values as a strided view, as the model passes them
    qkv = np.zeros((B, step, (H + 2 * Hkv) * D), np.float16)
    qkv[..., :H * D] = rng.normal(size=(B, step, H * D))
    for b in range(B):
        lo = int(cache.lengths[b])
        qkv[b, :, H * D:(H + Hkv) * D] = K[b, :, lo:lo + step].transpose(1, 0, 2).reshape(step, -1)
        qkv[b, :, (H + Hkv) * D:] = V[b, :, lo:lo + step].transpose(1, 0, 2).reshape(step, -1)
    qkv = cp.asarray(qkv)
    q = qkv[..., :H * D].reshape(B, step, H, D).transpose(0, 2, 1, 3)
    k = qkv[..., H * D:(H + Hkv) * D].reshape(B, step, Hkv, D).transpose(0, 2, 1, 3)
    v = qkv[..., (H + Hkv) * D:].reshape(B, step, Hkv, D).transpose(0, 2, 1, 3)
    cache.begin_step([step] * B)
    cache.update(0, k, v)
    return cache, q, k, v


def use_kernel(cache, fused):
    """Hand a cache built for the reference attention a fused kernel (and, quantized, the storage
    views the kernel reads, which such a cache did not build)."""
    cache.fused = fused
    if hasattr(cache, "_kernel_storages"):
        cache.kernel_storages = cache._kernel_storages()


def exact(cache, q, k, v):
    """float64 causal attention over the cache's decoded history and the step's keys."""
    B, H, T, D = q.shape
    Hkv, g = k.shape[1], H // k.shape[1]
    if hasattr(cache, "reconstruct"):
        hk, hv = (x.get().astype(np.float64) for x in cache.reconstruct(0))
    else:
        n = int(cache.lengths.max())
        hk, hv = (x[0][:, :, :n].get().astype(np.float64) for x in (cache.k, cache.v))
    out = np.zeros((B, H, T, D))
    for b in range(B):
        n = int(cache.lengths[b])
        kk = np.concatenate([hk[b, :, :n], k[b].get().astype(np.float64)], axis=1)
        vv = np.concatenate([hv[b, :, :n], v[b].get().astype(np.float64)], axis=1)
        for h in range(H):
            s = q[b, h].get().astype(np.float64) @ kk[h // g].T * cache.geom.scale  # (T, n + T)
            s[np.triu(np.ones((T, n + T), bool), n + 1)] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (p / p.sum(-1, keepdims=True)) @ vv[h // g]
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("D,H,Hkv", [(128, 32, 8), (64, 9, 3), (128, 7, 1), (64, 8, 8)])
@pytest.mark.parametrize("step", [1, 5, 100])
def test_fused_attention_matches_exact(spec, D, H, Hkv, step):
    from minikv.cuda.attention import FusedAttention

    B = 1 if step == 100 else 3
    lengths = [700, 413, 1][:B] if step != 100 else [517]
    cache, q, k, v = build(spec, B, H, Hkv, D, lengths, step, seed=D + H + step)
    use_kernel(cache, FusedAttention(get_backend("cuda").xp, D))
    attend = getattr(cache, "_attend", cache.attend)  # the quantized caches' attention without the commit
    got = attend(0, q).get().astype(np.float64)
    want = exact(cache, q, k, v)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{spec} D={D} H={H}/{Hkv} step={step}: rel err {err:.1e}")
    assert np.isfinite(got).all() and err < 4e-3  # fp16 tiles and probabilities, fp32 accumulation


@pytest.mark.parametrize("spec", DECODE_SPECS)
@pytest.mark.parametrize("D,H,Hkv,step", [(128, 32, 8, 1), (64, 9, 3, 2), (128, 4, 4, 8), (64, 8, 1, 1)])
@pytest.mark.parametrize("decode,warps", [(True, 8), (True, 4), (False, None)])
def test_decode_steps_both_kernels(spec, D, H, Hkv, step, decode, warps):
    """Decode-shaped steps through decode.cu (blocks of 8 and of 4 warps) and, forced, through
    attention.cu; keys whose scores keep growing along the sequence make decode.cu's lazy
    softmax rescale mid-stream."""
    from minikv.cuda.attention import FusedAttention

    cache, q, k, v = build(spec, 2, H, Hkv, D, [1500, 611], step, seed=D + step, growth=4.0)
    use_kernel(cache, FusedAttention(get_backend("cuda").xp, D, decode=decode, warps=warps, trial=True))
    got = getattr(cache, "_attend", cache.attend)(0, q).get().astype(np.float64)
    assert {key[3] == 0 for key in cache.fused._kernels} == {decode}  # decode.cu ran (rows 0), or only attention.cu
    want = exact(cache, q, k, v)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{spec} D={D} H={H}/{Hkv} step={step} decode={decode} warps={warps}: rel err {err:.1e}")
    assert np.isfinite(got).all() and err < 4e-3


@pytest.mark.parametrize("spec,growth", [("kivi:2", 1.0), ("patternkv:2", 1.0), ("patternkv:2", 6.0)])
@pytest.mark.parametrize("warps", [None, 4])
def test_fused_attention_long_context_many_splits(spec, growth, warps):
    """20K keys in one sequence, split over many blocks, and the reduction of the splits;
    patternkv with ~190 patterns (one per decoded chunk) summed per pattern in fixed point, and
    (growth) scores that keep rising, so each warp rescales its histogram many times. Blocks of
    the runtime's choice of warps (8 where shared memory allows) and of 4."""
    from minikv.cuda.attention import FusedAttention

    cache, q, k, v = build(spec, 1, 32, 8, 128, [20000], 1, seed=7, growth=growth)
    if spec.startswith("patternkv"):
        assert int(cache.count[0].max()) > 150
    use_kernel(cache, FusedAttention(get_backend("cuda").xp, 128, warps=warps))
    got = cache._attend(0, q).get().astype(np.float64)
    want = exact(cache, q, k, v)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{spec} growth={growth} warps={warps}: rel err {err:.1e}")
    assert np.isfinite(got).all() and err < 4e-3


@pytest.mark.parametrize("spec", ["kivi:2", "patternkv:2"])
def test_decode_split_merge_and_unaligned_q(spec):
    """decode.cu merges a kv head's splits in whichever of its blocks finishes last, counting
    arrivals in per-kv-head counters that it leaves at zero: a repeated launch gives the same
    bits. A q view off 16-byte alignment (the kernel reads q 8 halves at a time) is copied
    first, not misread."""
    import cupy as cp

    from minikv.cuda.attention import FusedAttention

    cache, q, k, v = build(spec, 2, 32, 8, 128, [5000, 3000], 1, seed=11)
    use_kernel(cache, FusedAttention(cp, 128))
    first = cache._attend(0, q).get()
    assert not cache.fused._counters.get().any()
    np.testing.assert_array_equal(cache._attend(0, q).get(), first)
    shifted = cp.zeros(q.size + 1, np.float16)[1:].reshape(q.shape)  # 2 bytes past an aligned start
    shifted[...] = q
    assert shifted.data.ptr % 16
    np.testing.assert_array_equal(cache._attend(0, shifted).get(), first)
    want = exact(cache, q, k, v)
    assert np.abs(first - want).max() / np.abs(want).max() < 4e-3
