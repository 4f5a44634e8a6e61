"""PatternKV's pattern mining and assignment (KVQUANT.md 3.1-3.3), as array-op oracles.

All functions work on N independent sets at once (one per (sequence, kv head)); x is
(N, tokens, D) fp16, or float32 holding fp16 values. KMeans sums and distances run in float64, where
sums of fp16-valued data are exact in practice, so any summation order (a GPU's) gives the
same centres and the result is deterministic.
"""
from __future__ import annotations

import math

import numpy as np

from .packing import row_index

Z95 = 1.6448536269514722  # Phi^-1(0.95)


def kmeans(xp, x, m: int, iters: int = 30, tol: float = 1e-4):
    """Batched Lloyd KMeans: x (N, P, D) -> centres (N, m, D) float32, m <= P.

    Init (deterministic): the point nearest the mean, then repeatedly the point farthest from
    the centres so far (outlier tokens, such as attention sinks, get patterns of their own).
    A set stops when no centre moves by more than tol * RMS norm of its points. An empty
    cluster is re-seeded with the point farthest from its centre.
    """
    N, P, D = x.shape
    x64 = x.astype(np.float64)
    x2 = (x64 * x64).sum(-1)  # (N, P)
    c = farthest_point_init(xp, x64, x2, m)  # (N, m, D)
    limit = (tol * tol) * x2.mean(-1)  # (N,) squared-move threshold
    active = xp.ones(N, dtype=bool)
    rows = xp.arange(N)[:, None]
    for _ in range(iters):
        d = x2[:, :, None] - 2.0 * xp.matmul(x64, c.transpose(0, 2, 1)) + (c * c).sum(-1)[:, None, :]  # (N, P, m)
        a = d.argmin(-1)  # (N, P)
        onehot = (a[:, :, None] == xp.arange(m)[None, None, :]).astype(np.float64)  # (N, P, m)
        counts = onehot.sum(1)  # (N, m)
        new = xp.matmul(onehot.transpose(0, 2, 1), x64) / xp.maximum(counts, 1.0)[..., None]
        if bool((counts == 0).any()):
            far = d[rows, xp.arange(P)[None, :], a]  # (N, P) distance to own centre
            order = xp.argsort(-far, axis=1, kind="stable")  # farthest first, ties by index
            empty_rank = xp.cumsum(counts == 0, axis=1) - 1  # k-th empty cluster takes the k-th farthest point
            pick = xp.take_along_axis(order, xp.clip(empty_rank, 0, P - 1).astype(np.int64), axis=1)
            new = xp.where((counts == 0)[..., None], x64[rows, pick], new)
        move = ((new - c) ** 2).sum(-1).max(-1)  # (N,)
        c = xp.where(active[:, None, None], new, c)
        active &= move > limit
        if not bool(active.any()):
            break
    return c.astype(np.float32)


def farthest_point_init(xp, x64, x2, m: int):
    """(N, P, D) float64 -> (N, m, D): nearest-to-mean point, then farthest-first traversal."""
    N, P, _ = x64.shape
    rows = xp.arange(N)
    mean = x64.mean(1)  # (N, D)
    first = ((x64 - mean[:, None]) ** 2).sum(-1).argmin(-1)  # (N,)
    idx = [first]
    dmin = xp.full((N, P), np.inf)
    for _ in range(1, m):
        last = x64[rows, idx[-1]]  # (N, D)
        d = x2 - 2.0 * (x64 @ last[:, :, None])[..., 0] + (last * last).sum(-1)[:, None]
        dmin = xp.minimum(dmin, d)
        idx.append(dmin.argmax(-1))  # ties: lowest index
    return x64[rows[:, None], xp.stack(idx, axis=1)].copy()


def nearest_l2(xp, x, c):
    """Index of the L2-nearest centre: x (N, T, D), c (N, M, D) -> (N, T) (ties: lowest)."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d = (c64 * c64).sum(-1)[:, None, :] - 2.0 * xp.matmul(x64, c64.transpose(0, 2, 1))  # ||x||^2 omitted
    return d.argmin(-1)


def minmax_assign(xp, x, c):
    """Index of the pattern minimising the residual's range max_i(x_i - c_i) - min_i(x_i - c_i)
    (what the quantizer pays for): x (N, T, D), c (N, M, D) float32 -> (N, T)."""
    diff = x[:, :, None, :] - c[:, None, :, :]  # (N, T, M, D)
    return (diff.max(-1) - diff.min(-1)).argmin(-1)


def chebyshev_centre(x):
    """The point minimising the worst-case distance to a chunk: (max + min) / 2 per dim.
    x (N, T, D) -> (N, D)."""
    return (x.max(1) + x.min(1)) * np.float32(0.5)


def token_patterns(xp, pat, idx):
    """Each token's pattern: pat (nb, H, M, D) fp16, idx (nb, H, T) -> (nb, H, T, D) float32.
    One row gather from the flattened table (take_along_axis would build (nb, H, T, D) indexes)."""
    nb, H, M, D = pat.shape
    rows = xp.arange(nb * H, dtype=np.int64).reshape(nb, H, 1) * M + idx.astype(np.int64)
    return pat.reshape(nb * H * M, D)[rows.reshape(-1)].reshape(nb, H, idx.shape[2], D).astype(np.float32)


def pack_k_residuals(xp, x, pat, idx, n: int, G: int, bits: int, hat: bool = True):
    """PatternKV's K storage of n chunks of G tokens: x (nb, H, w >= n*G, D) holding fp16 values,
    pat (nb, H, M, D) fp16, idx (nb, H, n*G) uint8 -> kivi K codes (nb, H, n, G, D*b/8), scale,
    min (nb, H, n, D) of the residuals x - pat[idx], and (if hat) each token rebuilt, pattern +
    decoded residual (nb, H, n*G, D) float32, else None."""
    from .kivi import quantize_k_chunks

    nb, H, _, D = x.shape
    c = token_patterns(xp, pat, idx)
    r = x[:, :, :n * G].astype(np.float32) - c
    kc, ks, km, r_hat = quantize_k_chunks(xp, r.reshape(nb, H, n, G, D), bits)
    return kc, ks, km, (c + r_hat.reshape(nb, H, n * G, D)) if hat else None


def pack_v_residuals(xp, x, pat, idx, T: int, bits: int, group: int, hat: bool = True):
    """PatternKV's V storage of T tokens: per token the V test, then kivi V of the residual
    x - pat[idx] where it passes, of x itself where not. x (nb, H, w >= T, D) holding fp16 values,
    pat (nb, H, M, D) fp16, idx (nb, H, T) uint8 -> codes (nb, H, T, D*b/8), scale, min (nb, H,
    T, D/group), use (nb, H, T) bool, and (if hat) chosen pattern + decoded value, else None."""
    from .kivi import quantize_v_tokens

    v, c = x[:, :, :T].astype(np.float32), token_patterns(xp, pat, idx)
    use = v_use_residual(xp, v, c)
    c = xp.where(use[..., None], c, np.float32(0.0))
    vc, vs, vm, r_hat = quantize_v_tokens(xp, v - c, bits, group)
    return vc, vs, vm, use, (c + r_hat) if hat else None


def store_nearest(xp, x, T: int, pat, m: int, out, rows, t0: int):
    """Each token 0..T-1 of x (nb, H, w >= T, D)'s nearest (L2) of the first m patterns of its
    (sequence, head) in pat (B, H, M, D) fp16, stored as tokens t0.. of batch rows `rows` in the
    index storage out (B, H, cap) uint8."""
    nb, H, _, D = x.shape
    r = row_index(xp, rows)
    p = pat[r, :, :m].astype(np.float32).reshape(nb * H, m, D)
    a = nearest_l2(xp, x[:, :, :T].astype(np.float32).reshape(nb * H, T, D), p)
    out[r, :, t0:t0 + T] = a.reshape(nb, H, T).astype(np.uint8)


def store_k_residuals(xp, x, n: int, G: int, bits: int, out, pat, idx, rows, c0: int, hat: bool = True):
    """pack_k_residuals of chunks 0..n-1 of x (nb, H, w >= n*G, D) against the method's pattern
    tables pat (B, H, M, D) fp16 and indices idx (B, H, cap) uint8 (already stored for tokens
    c0*G..), stored as chunks c0.. of batch rows `rows` in out = (codes, scale, min) (kivi K
    storage). Returns x_hat (nb, H, n*G, D) float32 if hat, else None."""
    r, t0 = row_index(xp, rows), c0 * G
    kc, ks, km, k_hat = pack_k_residuals(xp, x, pat[r], idx[r, :, t0:t0 + n * G], n, G, bits, hat)
    for dst, a in zip(out, (kc, ks, km)):
        dst[r, :, c0:c0 + n] = a
    return k_hat


def store_v_residuals(xp, x, T: int, bits: int, group: int, out, pat, idx, rows, t0: int, hat: bool = True):
    """pack_v_residuals of tokens 0..T-1 of x (nb, H, w >= T, D) against pat (B, H, M, D) fp16 and
    idx (B, H, cap) uint8 (already stored for tokens t0..), stored as tokens t0.. of batch rows
    `rows` in out = (codes, scale, min (kivi V storage), mask (B, H, cap/8) uint8: bit t%8 of byte
    t//8 is the V test's verdict); T and t0 multiples of 8. Returns x_hat if hat, else None."""
    r = row_index(xp, rows)
    nb, H = x.shape[:2]
    vc, vs, vm, use, v_hat = pack_v_residuals(xp, x, pat[r], idx[r, :, t0:t0 + T], T, bits, group, hat)
    for dst, a in zip(out, (vc, vs, vm)):
        dst[r, :, t0:t0 + T] = a
    bits8 = use.reshape(nb, H, T // 8, 8).astype(np.uint8) << xp.arange(8, dtype=np.uint8)
    out[3][r, :, t0 // 8:(t0 + T) // 8] = bits8.sum(-1, dtype=np.uint8)
    return v_hat


def v_use_residual(xp, v, c):
    """PatternKV's V test per token: with rho = range(v - c) / range(v), use the residual iff
    1 - rho^2 >= (2 z / sqrt(5 D)) sqrt(1 + rho^4), z = Phi^-1(0.95). v, c (N, T, D) -> bool (N, T)."""
    D = v.shape[-1]
    k = np.float32(2.0 * Z95 / math.sqrt(5.0 * D))
    r = v - c
    rv = v.max(-1) - v.min(-1)
    rho = (r.max(-1) - r.min(-1)) / xp.where(rv > 0, rv, np.float32(1.0))
    rho2 = rho * rho
    return (rv > 0) & (np.float32(1.0) - rho2 >= k * xp.sqrt(np.float32(1.0) + rho2 * rho2))
