"""Reference causal attention with array ops (NumPy or CuPy), shared by the caches.

Attention of a step's queries over the keys/values a cache holds in dense form. Queries are
processed in blocks so the score matrix stays bounded for long prompts.
"""
from __future__ import annotations

import numpy as np

_MAX_SCORES = 1 << 26  # score-matrix elements per block (256 MiB of float32)


def causal_mask(xp, start: np.ndarray, n_new: np.ndarray, T: int, S: int):
    """(B, 1, 1, T, S) bool: query t of row b (position start[b]+t) sees key j iff
    j <= start[b] + min(t, n_new[b]-1). Padded queries (t >= n_new) repeat the last valid
    row so they never see an empty set (no NaN); their outputs are ignored."""
    t = np.minimum(np.arange(T)[None, :], np.maximum(n_new[:, None] - 1, 0))  # (B, T)
    last = xp.asarray(start[:, None] + t)  # (B, T) last visible key per query
    return (xp.arange(S)[None, None, :] <= last[:, :, None])[:, None, None]


def causal_attention(xp, q, k, v, mask, scale: float):
    """q (B, H, T, D); k, v (B, Hkv, S, D); mask (B, 1, 1, T, S) -> (B, H, T, D) in q's dtype.

    Scores and softmax in float32; q is scaled before the product so fp16 scores stay in range.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv  # query heads per kv head (HF repeat_kv order: head h uses kv head h // g)
    qg = (q * q.dtype.type(scale)).reshape(B, Hkv, g, T, D)
    kT = k.transpose(0, 1, 3, 2)[:, :, None]  # (B, Hkv, 1, D, S)
    vv = v[:, :, None]  # (B, Hkv, 1, S, D)
    out = xp.empty((B, Hkv, g, T, D), dtype=q.dtype)
    step = max(1, _MAX_SCORES // max(1, B * H * S))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        s = xp.matmul(qg[:, :, :, t0:t1], kT).astype(np.float32)  # (B, Hkv, g, tb, S)
        s = xp.where(mask[..., t0:t1, :S], s, np.float32(-np.inf))
        s -= s.max(axis=-1, keepdims=True)
        p = xp.exp(s, out=s)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, :, :, t0:t1] = xp.matmul(p.astype(v.dtype), vv)
    return out.reshape(B, H, T, D)
