"""KV diagnostics: why a method works or fails on a model, layer by layer.

The keys and values of one fp16 forward are captured, then fed to each method's real cache
(on the schedule a session uses: one prefill, then flush-aligned chunks), so every method
quantizes the same numbers and the errors are comparable layer by layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MinikvError
from .kv import make_cache


@dataclass
class LayerStats:
    layer: int
    head: int | None  # None: averaged over heads
    k_range: float  # mean per-channel range of K over G-token chunks (what kivi K pays)
    k_range_aligned: float  # the same for K minus its pattern
    v_range: float  # mean per-token range of V (what kivi V pays)
    v_range_aligned: float  # the same for what patternkv quantizes (residual or raw)
    v_resid: float  # fraction of V tokens stored as residuals
    patterns: int
    k_err: dict = field(default_factory=dict)  # spec -> ||K^ - K|| / ||K|| over quantized tokens
    v_err: dict = field(default_factory=dict)


def capture(model, ids):
    """Post-RoPE K and V of every layer: lists of (Hkv, T, D) float32 host arrays."""
    cache = make_cache("fp16", model.kv_geometry, 1, len(ids), model.backend)
    model.forward(np.asarray(ids)[None], cache)
    T, to_host = len(ids), model.backend.to_host
    return ([to_host(cache.k[L][0, :, :T]).astype(np.float32) for L in range(model.kv_geometry.n_layers)],
            [to_host(cache.v[L][0, :, :T]).astype(np.float32) for L in range(model.kv_geometry.n_layers)])


def replay(spec: str, K, V, geom, backend, prefill: int):
    """A cache of method `spec` that has stored K, V as a session would have."""
    xp, T = backend.xp, K[0].shape[1]
    cache = make_cache(spec, geom, 1, T, backend)
    t = 0
    while t < T:
        n = min(prefill, T) if t == 0 else min(cache.tokens_until_flush(), T - t)
        cache.begin_step([n])
        for L in range(geom.n_layers):
            k = xp.asarray(K[L][None, :, t:t + n]).astype(backend.dtype)
            cache.update(L, k, xp.asarray(V[L][None, :, t:t + n]).astype(backend.dtype))
            cache.commit(L)
        cache.end_step()
        t += n
    return cache


def _chunk_range(x, G):
    """x (H, n*G, D) -> (H,) mean over chunks and channels of max - min over each chunk's tokens."""
    H, T, D = x.shape
    c = x.reshape(H, T // G, G, D)
    return (c.max(2) - c.min(2)).mean(axis=(1, 2))


def layer_stats(model, ids, specs: list[str], pattern_spec: str = "patternkv:2", prefill: int = 512,
                per_head: bool = False, progress=lambda: None) -> list[LayerStats]:
    """`progress()` is called after each method's replay and each layer's statistics."""
    be, geom = model.backend, model.kv_geometry
    K, V = capture(model, ids)
    caches = {}
    for s in dict.fromkeys([pattern_spec, *specs]):
        caches[s] = c = replay(s, K, V, geom, be, prefill)
        if int(c.n_chunks[0]) == 0:
            raise MinikvError(f"--kv {s} quantized none of the {len(ids)} tokens (it keeps the first {c.S} as "
                              f"sinks and the newest {c.flush_at} in fp16, then quantizes {c.G} at a time); "
                              "use a longer text or a larger --max-tokens")
        progress()
    pk = caches[pattern_spec]
    out = []
    for L in range(geom.n_layers):
        q0, n = pk.S, int(pk.n_chunks[0]) * pk.G  # the quantized span of the pattern cache
        k, v = K[L][:, q0:q0 + n], V[L][:, q0:q0 + n]  # (H, n, D)
        kp = be.to_host(pk.kpat[L][0]).astype(np.float32)
        vp = be.to_host(pk.vpat[L][0]).astype(np.float32)
        ki = be.to_host(pk.kidx[L][0, :, :n]).astype(np.int64)
        vi = be.to_host(pk.vidx[L][0, :, :n]).astype(np.int64)
        mask = np.unpackbits(be.to_host(pk.vmask[L][0, :, :n // 8]), axis=-1, bitorder="little").astype(bool)
        kr = k - np.take_along_axis(kp, ki[..., None], 1)
        vr = np.where(mask[..., None], v - np.take_along_axis(vp, vi[..., None], 1), v)
        per = dict(k_range=_chunk_range(k, pk.G), k_range_aligned=_chunk_range(kr, pk.G),
                   v_range=np.ptp(v, axis=-1).mean(-1), v_range_aligned=np.ptp(vr, axis=-1).mean(-1),
                   v_resid=mask.mean(-1))
        errs = {}
        for s, c in caches.items():
            q0, n = c.S, int(c.n_chunks[0]) * c.G
            kh, vh = (be.to_host(a[0, :, q0:q0 + n]) for a in c.reconstruct(L))
            rel = lambda a, b: np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(  # noqa: E731
                b.reshape(len(b), -1), axis=1)
            errs[s] = (rel(kh, K[L][:, q0:q0 + n]), rel(vh, V[L][:, q0:q0 + n]))
        heads = range(geom.n_kv_heads) if per_head else [None]
        for h in heads:
            pick = (lambda a: float(a[h])) if h is not None else (lambda a: float(np.mean(a)))
            out.append(LayerStats(L, h, *(pick(per[key]) for key in per), patterns=int(pk.count[L, 0]),
                                  k_err={s: pick(e[0]) for s, e in errs.items() if s in specs},
                                  v_err={s: pick(e[1]) for s, e in errs.items() if s in specs}))
        progress()
    return out


def plot(stats: list[LayerStats], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in stats if s.head is None] or stats
    x = [s.layer for s in rows]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    ax[0, 0].plot(x, [s.k_range for s in rows], "o-", label="K raw")
    ax[0, 0].plot(x, [s.k_range_aligned for s in rows], "s-", label="K - pattern")
    ax[0, 0].set_title("K: mean per-channel range over a chunk")
    ax[0, 1].plot(x, [s.v_range for s in rows], "o-", label="V raw")
    ax[0, 1].plot(x, [s.v_range_aligned for s in rows], "s-", label="V as patternkv stores it")
    ax[0, 1].set_title("V: mean per-token range; dashed: residual use (right axis)")
    tw = ax[0, 1].twinx()
    tw.plot(x, [s.v_resid for s in rows], "k--", alpha=0.5)
    tw.set_ylim(0, 1)
    for spec in rows[0].k_err:
        ax[1, 0].plot(x, [s.k_err[spec] for s in rows], "o-", label=spec)
        ax[1, 1].plot(x, [s.v_err[spec] for s in rows], "o-", label=spec)
    ax[1, 0].set_title("K relative quantization error")
    ax[1, 1].set_title("V relative quantization error")
    for a in ax.flat:
        a.set_xlabel("layer")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")  # the suffix names the format
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)  # never a half-written figure
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MinikvError(f"--plot {path}: cannot write ({e.strerror})") from None
    finally:
        plt.close(fig)
