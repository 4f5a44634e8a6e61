"""Reference attention with array ops (NumPy or CuPy), shared by the caches.

Keys and values come in segments (e.g. sinks | dequantized chunks | window | this step's
tokens), each with a mask of which of its keys each query sees; scores of all segments are
softmaxed together, so no segment is ever copied into one big buffer. Queries are processed
in blocks so the score matrix stays bounded for long prompts.
"""
from __future__ import annotations

import numpy as np

MAX_SCORES = 1 << 26  # score-matrix elements per query block (256 MiB of float32)


def prefix_mask(xp, limit: np.ndarray, S: int):
    """(B, 1, 1, T, S) bool: query t of row b sees keys j < limit[b, t] of a segment."""
    return (xp.arange(S)[None, None, :] < xp.asarray(limit)[:, :, None])[:, None, None]


def causal_limits(start: np.ndarray, n_new: np.ndarray, T: int) -> np.ndarray:
    """(B, T) keys visible to each query in a buffer holding positions 0.. in order: query t
    (position start[b] + t) sees keys j <= start[b] + t. Padded queries (t >= n_new[b]) repeat
    the last valid row so they never see an empty set (no NaN); their outputs are ignored."""
    t = np.minimum(np.arange(T)[None, :], np.maximum(n_new[:, None] - 1, 0))
    return start[:, None] + t + 1


def attention(xp, q, segments, scale: float):
    """q (B, H, T, D); segments: [(k, v, limit)] with k, v (B, Hkv, S, D) and limit (B, T)
    host ints (keys of that segment each query sees). -> (B, H, T, D) in q's dtype.

    Scores and softmax in float32; q is scaled before the product so fp16 scores stay in range.
    """
    B, H, T, D = q.shape
    Hkv = segments[0][0].shape[1]
    g = H // Hkv  # query heads per kv head (HF repeat_kv order: head h uses kv head h // g)
    qg = (q * q.dtype.type(scale)).reshape(B, Hkv, g, T, D)
    segs = [(k.transpose(0, 1, 3, 2)[:, :, None], v[:, :, None], limit) for k, v, limit in segments if k.shape[2]]
    S = sum(k.shape[-1] for k, _, _ in segs)
    out = xp.empty((B, Hkv, g, T, D), dtype=q.dtype)
    step = max(1, MAX_SCORES // max(1, B * H * S))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        scores = []
        for kT, _, limit in segs:  # (B, Hkv, g, tb, S_seg) each, masked
            s = xp.matmul(qg[:, :, :, t0:t1], kT).astype(np.float32)
            scores.append(xp.where(prefix_mask(xp, limit[:, t0:t1], kT.shape[-1]), s, np.float32(-np.inf)))
        s = xp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]
        s -= s.max(axis=-1, keepdims=True)
        p = xp.exp(s, out=s)
        p /= p.sum(axis=-1, keepdims=True)
        o, lo = 0, 0
        for kT, vv, _ in segs:
            n = kT.shape[-1]
            o = o + xp.matmul(p[..., lo:lo + n].astype(vv.dtype), vv)
            lo += n
        out[:, :, :, t0:t1] = o
    return out.reshape(B, H, T, D)
