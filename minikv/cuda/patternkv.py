"""PatternKV's pattern mining and assignment as CUDA kernels (kernels_cu/patternkv.cu): the
functions of minikv.kv.patterns with the same names, signatures and results, bit for bit on
the same data (see the .cu for how). Inputs are C-contiguous CuPy float32 arrays; indices come
back int64 like numpy's argmin, the V test as a bool mask.

KMeans runs as: km_prep (|x|^2, column sums), km_limit (the convergence threshold), m + 1
km_seed rounds (the farthest-point init), then one km_step launch per Lloyd iteration
(assignment, cluster sums, and the update by each set's last block); a set whose centres stop
moving freezes on the device. A point's nearest centre (km_step, and km_assign for nearest_l2
and the flush) is found by tensor cores, re-decided in float64 where they cannot tell
(kernels_cu/nearest.cuh)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..kv.patterns import Z95
from ..kv import patterns
from .attention import KernelMethod
from .kivi import (CTYPE, UniformStorage, check_bits, check_v_storage, device_rows, launch_k_chunks, row_launch,
                   token_rows)
from .module import EXACT, check, f32, i32, kernel

_MOD = "patternkv"
_KM_DIMS = (64, 128)  # head dims the KMeans / nearest_l2 kernels are built for
_MAX_M = 256          # centres per set (lloyd_update's shared arrays; an index is one byte)
_MAX_P = 65536        # points per set (km_limit's list of pairwise-sum runs)
_KM_BLOCK = 256       # points per km_step block (KT * KP in kmeans.cuh)
_TT = 16              # tokens per minmax_assign block (TT in the .cu)


def _k(name: str):
    return kernel(_MOD, name, EXACT)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sms() -> int:
    import cupy

    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


def _tile(N: int, P: int, unit: int) -> int:
    """Points per km_seed block (a multiple of `unit`, at least 2 units) for about 8 blocks per
    SM over N sets: a round is a few dependent loads per point, so more blocks hide them (H100,
    m = 32: 112 sets x 1024 points 1.09 -> 0.75 ms, 8 x 8192 1.02 -> 0.65 ms)."""
    want = _cdiv(N * P, 8 * _sms())
    return min(_cdiv(P, unit) * unit, max(2 * unit, _cdiv(want, unit) * unit))


def _sets(what: str, a, D=None, rows16=False, fp16=False):
    """(N, rows, D) of a float32 (fp16: or float16) array; rows16: the kernel reads 16-byte rows."""
    check(what, a, np.float16 if fp16 and getattr(a, "dtype", None) == np.float16 else np.float32)
    if a.ndim != 3:
        raise ValueError(f"{what}: expected (sets, rows, D), got shape {a.shape}")
    if D is not None and a.shape[2] != D:
        raise ValueError(f"{what}: expected D = {D}, got shape {a.shape}")
    if rows16 and (a.shape[2] % 4 or a.data.ptr % 16):
        raise ValueError(f"{what}: rows must be 16-byte aligned (D % 4 == 0, aligned start)")
    return a.shape


def _km_dim(what: str, D: int) -> None:
    if D not in _KM_DIMS:
        raise ValueError(f"{what}: head dim {D} not supported (the kernels are built for {_KM_DIMS})")


def kmeans(xp, x, m: int, iters: int = 30, tol: float = 1e-4):
    """Batched Lloyd KMeans (see minikv.kv.patterns.kmeans): x (N, P, D) fp16, or float32 holding
    fp16 values -> centres (N, m, D) float32, m <= P. Shapes the kernels are not built for take
    the array-op oracle (same results)."""
    x = xp.ascontiguousarray(x)
    if x.ndim != 3 or x.shape[2] not in _KM_DIMS or x.shape[1] > _MAX_P or m > _MAX_M:
        return patterns.kmeans(xp, x, m, iters, tol)
    N, P, D = _sets("kmeans x", x, rows16=True, fp16=True)
    ct = CTYPE[np.dtype(x.dtype)]
    _km_dim("kmeans", D)
    m = int(m)
    if not 1 <= m <= min(P, _MAX_M):
        raise ValueError(f"kmeans: need 1 <= m <= min(P, {_MAX_M}), got m={m} with P={P}")
    if P > _MAX_P:
        raise ValueError(f"kmeans: at most {_MAX_P} points per set, got {P}")
    c = xp.empty((N, m, D), np.float64)
    if N == 0:
        return c.astype(np.float32)
    x2 = xp.empty((N, P), np.float64)
    colsum = xp.zeros((N, D), np.float64)
    _k(f"km_prep<{D}, {ct}>")((_cdiv(P, 256), N), (256,), (x, i32(P), x2, colsum))
    limit = xp.empty(N, np.float64)
    _k("km_limit")((N,), (256,), (x2, i32(P), np.float64(tol * tol), limit))

    tp = _tile(N, P, 32)  # farthest-point init: m + 1 rounds, candidates ping-pong per round
    B = _cdiv(P, tp)
    cand_v, cand_i = xp.empty((2, N, B), np.float64), xp.empty((2, N, B), np.int32)
    dmin = xp.empty((N, P), np.float64)
    seed = _k(f"km_seed<{D}, {ct}>")
    for r in range(m + 1):
        seed((B, N), (256,), (x, i32(P), i32(m), i32(r), i32(tp), x2, colsum, dmin, cand_v, cand_i, c))

    a = xp.empty((N, P), np.int32)
    far = xp.empty((N, P), np.float64)
    sums, counts = xp.zeros((N, m, D), np.float64), xp.zeros((N, m), np.int32)
    active, done = xp.ones(N, np.int32), xp.zeros(N, np.int32)
    step = _k(f"km_step<{D}, {ct}>")
    # Every step is launched: a frozen set's blocks return at once, so steps past the last freeze
    # cost a few microseconds each, less than reading the flags back (a sync that stalls the host).
    for _ in range(iters):
        step((_cdiv(P, _KM_BLOCK), N), (128,), (x, i32(P), i32(m), x2, limit, c, a, far, sums, counts, done, active))
    return c.astype(np.float32)


def nearest_l2(xp, x, c):
    """Index of the L2-nearest centre: x (N, T, D), c (N, M, D) float32 -> (N, T) int64."""
    x, c = xp.ascontiguousarray(x), xp.ascontiguousarray(c)
    if x.ndim != 3 or x.shape[2] not in _KM_DIMS or c.ndim != 3 or not 1 <= c.shape[1] <= _MAX_M:
        return patterns.nearest_l2(xp, x, c)
    N, T, D = _sets("nearest_l2 x", x, rows16=True)
    _, M, _ = _sets("nearest_l2 c", c, D)
    if c.shape[0] != N:
        raise ValueError(f"nearest_l2: centres {c.shape} do not fit points {x.shape}")
    out = xp.empty((N, 1, T), np.uint8)
    if N and T:
        _assign(x.reshape(N, 1, T, D), T, c.reshape(N, 1, M, D), M, out, np.arange(N), 0)
    return out.reshape(N, T).astype(np.int64)


def _assign(x, T: int, cen, m: int, out, rows, t0: int):
    """km_assign: tokens 0..T-1 of x (nb, H, w, D) against the first m of cen (B, H, Mc, D) float32
    or fp16 -> out (B, H, cap) uint8 at tokens t0.. of batch rows `rows`."""
    x, (xb, xh, xt), ct = token_rows("nearest x", x, T)
    nb, H, _, D = x.shape
    _km_dim("nearest", D)
    B, Mc = cen.shape[0], cen.shape[2]
    check("nearest centres", cen, cen.dtype, (B, H, Mc, D))
    cc = CTYPE.get(np.dtype(cen.dtype))
    if cc is None or not 1 <= m <= min(Mc, _MAX_M):
        raise ValueError(f"nearest: centres must be float32/fp16 with 1 <= m <= {_MAX_M} (got {cen.dtype}, m={m})")
    cap = check("nearest out", out, np.uint8, (B, H, None)).shape[2]
    if not 0 <= t0 <= cap - T:
        raise ValueError(f"nearest: tokens {t0}..{t0 + T} past the storage's {cap}")
    _k(f"km_assign<{D}, {ct}, {cc}>")((_cdiv(T, 128), nb * H), (128,),
                                      (x, xb, xh, xt, i32(H), device_rows(rows, B), cen, i32(Mc), i32(m), out, i32(cap),
                                       i32(t0), i32(T)))


def store_nearest(xp, x, T: int, pat, m: int, out, rows, t0: int):
    """Each token 0..T-1 of x (nb, H, w >= T, D) fp16/float32 (read in place)'s nearest (L2) of the
    first m patterns of its (sequence, head) in pat (B, H, M, D) fp16, stored as tokens t0.. of
    batch rows `rows` in out (B, H, cap) uint8 (see minikv.kv.patterns.store_nearest)."""
    if x.shape[3] not in _KM_DIMS or m > _MAX_M:
        return patterns.store_nearest(xp, x, T, pat, m, out, rows, t0)
    if T:
        _assign(x, T, pat, m, out, rows, t0)


def minmax_assign(xp, x, c):
    """Index of the pattern minimising the residual's range: x (N, T, D), c (N, M, D) float32
    -> (N, T) int64."""
    x, c = xp.ascontiguousarray(x), xp.ascontiguousarray(c)
    if x.ndim != 3 or x.shape[2] % 4 or x.shape[2] > 512:
        return patterns.minmax_assign(xp, x, c)
    N, T, D = _sets("minmax_assign x", x, rows16=True)
    _, M, _ = _sets("minmax_assign c", c, D, rows16=True)
    if c.shape[0] != N or M < 1:
        raise ValueError(f"minmax_assign: patterns {c.shape} do not fit tokens {x.shape}")
    if D > 512:
        raise ValueError(f"minmax_assign: D <= 512 (shared memory), got {D}")
    out = xp.empty((N, T), np.int64)
    if N and T:
        threads = min(256, _cdiv(M, 32) * 32)
        _k("minmax_assign")((_cdiv(T, _TT), N), (threads,), (x, c, i32(T), i32(M), i32(D), out),
                            shared_mem=_TT * D * 4)
    return out


def chebyshev_centre(x):
    """(max + min) / 2 per dim over each chunk: x (N, T, D) float32 -> (N, D) float32."""
    import cupy

    x = cupy.ascontiguousarray(x)
    N, T, D = _sets("chebyshev_centre x", x)
    if T < 1:
        raise ValueError("chebyshev_centre: needs at least one token")
    out = cupy.empty((N, D), np.float32)
    if N * D:
        _k("chebyshev_centre")((_cdiv(N * D, 256),), (256,), (x, i32(N), i32(T), i32(D), out))
    return out


def v_use_residual(xp, v, c):
    """PatternKV's V test per token (see minikv.kv.patterns.v_use_residual): v, c (..., T, D)
    float32 -> bool (..., T)."""
    lead = v.shape[:-1]
    v = xp.ascontiguousarray(v).reshape(-1, v.shape[-2], v.shape[-1])
    c = xp.ascontiguousarray(c).reshape(v.shape)
    return _v_use_residual(xp, v, c).reshape(lead)


def _v_use_residual(xp, v, c):
    N, T, D = _sets("v_use_residual v", v)
    check("v_use_residual c", c, np.float32, v.shape)
    k = np.float32(2.0 * Z95 / math.sqrt(5.0 * D))  # as the oracle computes it
    out = xp.empty((N, T), dtype=bool)
    if N * T:
        _k("v_use_residual")((_cdiv(N * T, 8),), (256,), (v, c, np.int64(N * T), i32(D), f32(k), out))
    return out


def _residual_args(what: str, x, T: int, pat, idx, rows, t0: int):
    """Check the pkv kernels' sources; -> (the PKV_SRC_ARGS tuple, nb, H, D, B, C type of x)."""
    x, (xb, xh, xt), ct = token_rows(f"{what} x", x, T)
    nb, H, _, D = x.shape
    B, M = pat.shape[0], pat.shape[2]
    check(f"{what} pat", pat, np.float16, (B, H, M, D))
    tcap = check(f"{what} idx", idx, np.uint8, (B, H, None)).shape[2]
    if pat.data.ptr % 16 or not 0 <= t0 <= tcap - T:
        raise ValueError(f"{what}: pat must be 16-byte aligned and tokens {t0}..{t0 + T} within {tcap}")
    return (x, xb, xh, xt, i32(H), device_rows(rows, B), pat, i32(M), idx, i32(tcap), i32(t0)), nb, H, D, B, ct


def store_k_residuals(xp, x, n: int, G: int, bits: int, out, pat, idx, rows, c0: int, hat: bool = True):
    """PatternKV's K storage of n chunks in one kernel that reads x (fp16/float32) in place and writes
    the storage (see minikv.kv.patterns.store_k_residuals, whose results it gives bit for bit)."""
    bits = check_bits("store_k_residuals", bits, (2, 3, 4))
    args, nb, H, D, B, ct = _residual_args("store_k_residuals", x, n * G, pat, idx, rows, c0 * G)
    return launch_k_chunks("store_k_residuals", kernel(_MOD, f"pkv_k_chunks<{bits}, {ct}>", EXACT), args,
                           (nb, H, D, B), n, G, bits, out, c0, hat)


def _store_v(x, T: int, bits: int, group: int, out, pat, idx, rows, t0: int, hat: bool, use):
    """pkv_v_tokens into out = (codes, scale, min[, mask]) at tokens t0..; use: (nb, H, T) bool or None."""
    import cupy as cp

    bits = check_bits("store_v_residuals", bits, (2, 3, 4))
    args, nb, H, D, B, ct = _residual_args("store_v_residuals", x, T, pat, idx, rows, t0)
    codes, scale, mn = out[:3]
    mask = out[3] if len(out) > 3 else None
    cap = idx.shape[2]
    if codes.shape[2] != cap:
        raise ValueError(f"store_v_residuals: V storage of {codes.shape[2]} tokens, indices of {cap}")
    R = check_v_storage("store_v_residuals", out, (nb, H, D, B), T, bits, group, t0)
    grid, block, smem = row_launch(R, D)
    if mask is not None:
        check("store_v_residuals mask", mask, np.uint8, (B, H, cap // 8))
        if T % 8 or t0 % 8 or cap % 8 or block[0] // (D // 8) % 8:
            raise ValueError(f"store_v_residuals: the V mask needs T ({T}), t0 ({t0}), cap ({cap}) and the rows "
                             f"per block multiples of 8")
    x_hat = cp.empty((nb, H, T, D), np.float32) if hat else None
    if R:
        k = np.float32(2.0 * Z95 / math.sqrt(5.0 * D))  # as the oracle computes it
        null = np.uint64(0)
        kernel(_MOD, f"pkv_v_tokens<{bits}, {ct}>", EXACT)(
            grid, block, (*args, i32(T), codes, scale, mn, null if use is None else use, null if mask is None else mask,
                          null if x_hat is None else x_hat, i32(R), i32(D), i32(group), f32(k)), shared_mem=smem * 4)
    return x_hat


def store_v_residuals(xp, x, T: int, bits: int, group: int, out, pat, idx, rows, t0: int, hat: bool = True):
    """PatternKV's V storage of T tokens (codes, scale, min, V mask bits) in one kernel that reads x
    in place (see minikv.kv.patterns.store_v_residuals, whose results it gives bit for bit)."""
    return _store_v(x, T, bits, group, out, pat, idx, rows, t0, hat, None)


def _fresh(nb, H, cap, tails):
    import cupy as cp

    return tuple(cp.empty((nb, H, cap, *tail), dt) for dt, tail in tails)


def pack_k_residuals(xp, x, pat, idx, n: int, G: int, bits: int, hat: bool = True):
    """PatternKV's K storage of n chunks of G tokens (see minikv.kv.patterns.pack_k_residuals, whose
    results it gives bit for bit): x (nb, H, w, D) float16/float32, pat (nb, H, M, D) fp16, idx
    (nb, H, n*G) uint8."""
    nb, H, _, D = x.shape
    out = _fresh(nb, H, n, ((np.uint8, (G, D * bits // 8)), (np.float16, (D,)), (np.float16, (D,))))
    x_hat = store_k_residuals(xp, x, n, G, bits, out, pat, idx, np.arange(nb), 0, hat)
    return (*out, x_hat)


def pack_v_residuals(xp, x, pat, idx, T: int, bits: int, group: int, hat: bool = True):
    """PatternKV's V storage of T tokens: the V test, then kivi V of the residual or the raw value
    (see minikv.kv.patterns.pack_v_residuals, whose results it gives bit for bit): x (nb, H, w, D)
    float16/float32, pat (nb, H, M, D) fp16, idx (nb, H, T) uint8."""
    import cupy as cp

    nb, H, _, D = x.shape
    if group <= 0 or D % group:
        raise ValueError(f"pack_v_residuals: group={group} must be a multiple of 8 dividing D={D}")
    out = _fresh(nb, H, T, ((np.uint8, (D * bits // 8,)), (np.float16, (D // group,)), (np.float16, (D // group,))))
    use = cp.empty((nb, H, T), dtype=bool)
    x_hat = _store_v(x, T, bits, group, out, pat, idx, np.arange(nb), 0, hat, use)
    return (*out, use, x_hat)


# -- what the fused attention reads ------------------------------------------------------------
class _Patterns(KernelMethod):
    def groups(self, kb, vb):
        return 4 if kb + vb <= 4 else 2  # its pattern lookups spill registers sooner than kivi's


PATTERNKV = _Patterns("patternkv", 4, (2, 4), patterns=True)  # tiles.cuh's Method::PATTERN


@dataclass(frozen=True, kw_only=True)
class PatternStorage(UniformStorage):
    """kivi's arrays holding residuals, plus kidx, vidx (B, H, T) uint8 pattern indices, vmask
    (B, H, T/8) uint8 (bit t%8 of byte t//8: V stored as a residual), kpat, vpat (B, H, mmax, D)
    fp16 patterns."""
    kernel: ClassVar[KernelMethod] = PATTERNKV
    kidx: object
    vidx: object
    vmask: object
    kpat: object
    vpat: object
    mmax: int

    def __post_init__(self):
        super().__post_init__()
        B, H, T = self.kc.shape[0], self.kc.shape[1], self.n_chunks_cap * self.G
        D = self.ks.shape[3]
        for name in ("kidx", "vidx"):
            check(f"patternkv storage {name}", getattr(self, name), np.uint8, (B, H, T))
        check("patternkv storage vmask", self.vmask, np.uint8, (B, H, T // 8))
        for name in ("kpat", "vpat"):
            check(f"patternkv storage {name}", getattr(self, name), np.float16, (B, H, self.mmax, D))

    def extras(self, null):
        return (null.f, null.f, self.kidx, self.vidx, self.vmask, self.kpat, self.vpat, i32(self.mmax))

    def pattern_table(self, rowinfo):
        return -(-int(np.max(rowinfo[:, 5])) // 64) * 64  # as many as the fullest sequence holds
