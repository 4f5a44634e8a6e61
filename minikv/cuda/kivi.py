"""KIVI quantizers as CUDA kernels (kernels_cu/kivi.cu; kivi_fit.cu for sc=8 and fit=mse), bit for
bit minikv.kv.kivi's NumPy oracles: same signatures, shapes and dtypes; the codes, parameters,
packed bytes and x_hat all come from the kernels. Also the method's storage as the fused
attention reads it (UniformStorage)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .attention import KernelMethod, KernelStorage
from .module import EXACT, check, i32, kernel

BITS = (2, 3, 4, 8, 16)
THREADS = 256  # per block of the per-chunk (column) kernels; the row kernels use about as many


def column_launch(sets: int, D: int):
    """(grid, block, shared bytes) of a kernel with one block per set of (L, D) values that
    reduces over L per channel (kivi_k_chunks, nqkv_channel_blocks), less its tables."""
    ns = max(1, THREADS // (D // 4))
    return (sets,), (THREADS,), ns * D * 4


def row_launch(rows: int, D: int):
    """(grid, block, partials per thread) of a kernel with one thread per (row, 8 values)
    that reduces over groups along a row (kivi_v_tokens, nqkv_token_blocks)."""
    octets = D // 8
    rb = max(1, THREADS // octets)  # whole rows per block
    return ((rows + rb - 1) // rb,), (rb * octets,), rb * octets * 4


def prepare(what: str, x, min_ndim: int):
    """Check a float32 C-contiguous cupy input; copy it if it is not 16-byte aligned (float4)."""
    check(what, x, np.float32)
    if x.ndim < min_ndim:
        raise ValueError(f"{what}: expected at least {min_ndim} dims, got shape {x.shape}")
    D = x.shape[-1]
    if D % 8 or not 0 < D <= 2048:
        raise ValueError(f"{what}: the last dim ({D}) must be a multiple of 8, at most 2048")
    if x.size // D >= 2**31:
        raise ValueError(f"{what}: {x.size // D} rows, more than int32 indexes")
    return x.copy() if x.data.ptr % 16 else x


def check_bits(what: str, bits: int, allowed) -> int:
    if bits not in allowed:
        raise ValueError(f"{what}: bits={bits} not in {allowed}")
    return int(bits)


CTYPE = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float"}


def token_rows(what: str, x, tokens: int):
    """A flush's token rows as kivi::Rows reads them in place: x (nb, H, w >= tokens, D) fp16 or
    float32, any strides with contiguous, 16-byte aligned rows (else a contiguous copy) ->
    (x, (xb, xh, xt) element strides, C type)."""
    import cupy as cp

    if not isinstance(x, cp.ndarray) or x.ndim != 4 or np.dtype(x.dtype) not in CTYPE:
        raise TypeError(f"{what}: expected a (nb, H, w, D) float16/float32 cupy array, got "
                        f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}")
    nb, H, w, D = x.shape
    if D % 8 or not 0 < D <= 2048 or not 0 < tokens <= w:
        raise ValueError(f"{what}: D ({D}) must be a multiple of 8 up to 2048 and 0 < tokens ({tokens}) <= w ({w})")
    e = x.itemsize
    if x.strides[3] != e or x.data.ptr % 16 or any(st % 16 for st in x.strides[:3]):
        x = cp.ascontiguousarray(x)
    return x, tuple(np.int64(st // e) for st in x.strides[:3]), CTYPE[np.dtype(x.dtype)]


_ROWS: dict = {}


def device_rows(rows, B: int):
    """The flush's batch rows (host ints, each < B) as a device int32 array (kivi::Slots)."""
    import cupy as cp

    rows = np.asarray(rows, dtype=np.int32)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= B:
        raise ValueError(f"rows {rows.tolist()} must be batch rows in [0, {B})")
    key = (rows.tobytes(), cp.cuda.Device().id)
    if key not in _ROWS:  # a handful of distinct row sets per run
        if len(_ROWS) > 64:
            _ROWS.clear()
        _ROWS[key] = cp.asarray(rows)
    return _ROWS[key]


def k_launch(sets: int, D: int):
    """(grid, block, shared bytes) of kivi::k_chunks: a block per chunk, NS slices of D/8 threads."""
    O = D // 8
    ns = max(1, THREADS // O)
    return (sets,), (ns * O,), (2 * ns + 3) * D * 4


def param_types(sc: int):
    """dtypes of the stored (scale, min): fp16 pairs, or sc=8's scale index and zero point."""
    return (np.float16, np.float16) if sc == 16 else (np.uint8, np.int8)


def fitted(sc: int, fit: str, bits: int) -> bool:
    """Whether kivi_fit.cu quantizes (else kivi.cu's min/max fp16 kernels)."""
    if sc not in (16, 8) or fit not in ("minmax", "mse") or (sc == 8 and bits > 4):
        raise ValueError(f"sc={sc}, fit={fit!r} with {bits}-bit codes: sc is 16 or 8 (codes of <= 4 bits), "
                         "fit minmax or mse")
    return sc == 8 or fit == "mse"


_TABLES: dict = {}


def log_table():
    """packing.log_scales() on the current device (kivi_fit.cu's scale table)."""
    import cupy as cp

    from ..kv.packing import log_scales

    dev = cp.cuda.Device().id
    if dev not in _TABLES:
        _TABLES[dev] = cp.asarray(log_scales())
    return _TABLES[dev]


def check_storage(what: str, arrays, B: int, H: int, cap: int, tails):
    """Check a method's storage arrays: C-contiguous (B, H, cap, *tail) of the given dtypes."""
    for name, a, (dtype, tail) in zip(what.split(), arrays, tails):
        check(f"storage {name}", a, dtype, (B, H, cap, *tail))


def check_v_storage(what: str, out, shape, T: int, bits: int, group: int, t0: int, sc: int = 16) -> int:
    """Check the V storage out = (codes, scale, min, ...) for tokens t0..t0+T of the (nb, H, D) sets
    of `shape` in groups of `group` channels; -> the rows R = nb * H * T."""
    nb, H, D, B = shape
    if group <= 0 or group % 8 or D % group:
        raise ValueError(f"{what}: group={group} must be a multiple of 8 dividing D={D}")
    cap, tail = out[0].shape[2], (D // group,)
    st, mt = param_types(sc)
    check_storage("codes scale min", out[:3], B, H, cap, ((np.uint8, (D * bits // 8,)), (st, tail), (mt, tail)))
    if not 0 <= t0 <= cap - T:
        raise ValueError(f"{what}: tokens {t0}..{t0 + T} past the storage's {cap}")
    if nb * H * T >= 2**31:
        raise ValueError(f"{what}: {nb * H * T} rows, more than int32 indexes")
    return nb * H * T


def launch_k_chunks(what: str, kern, src: tuple, shape, n: int, G: int, bits: int, out, c0: int, hat: bool,
                    sc: int = 16, fit: bool = False):
    """Check the K storage out = (codes, scale, min) and run a kivi::k_chunks kernel (fit: kivi_fit.cu's
    kfit_k_chunks) over n chunks of the (nb, H, D) sets of `shape` from the source arguments src;
    -> x_hat or None."""
    import cupy as cp

    nb, H, D, B = shape
    codes, scale, mn = out
    NC = codes.shape[2]
    st, mt = param_types(sc)
    check_storage("codes scale min", out, B, H, NC, ((np.uint8, (G, D * bits // 8)), (st, (D,)), (mt, (D,))))
    if not 0 <= c0 <= NC - n:
        raise ValueError(f"{what}: chunks {c0}..{c0 + n} past the storage's {NC}")
    x_hat = cp.empty((nb, H, n * G, D), np.float32) if hat else None
    if n and fit:
        kern((nb * H * n,), (min(256, max(D, 64)),), (*src, i32(NC), i32(c0), i32(n), codes, scale, mn,
                                                      x_hat if hat else np.uint64(0), i32(G), i32(D), log_table()),
             shared_mem=3 * D * 4)
    elif n:
        grid, block, smem = k_launch(nb * H * n, D)
        kern(grid, block, (*src, i32(NC), i32(c0), i32(n), codes, scale, mn, x_hat if hat else np.uint64(0), i32(G),
                           i32(D)), shared_mem=smem)
    return x_hat


def store_k_chunks(xp, x, n: int, G: int, bits: int, out, rows, c0: int, hat: bool = True, sc: int = 16,
                   fit: str = "minmax"):
    """Quantize chunks 0..n-1 (G tokens each) of x (nb, H, w >= n*G, D) fp16/float32 (read in place)
    and store them as chunks c0.. of batch rows `rows` in out = (codes (B, H, NC, G, D*b/8) uint8,
    scale, min (B, H, NC, D) fp16, or uint8 / int8 for sc=8). Returns x_hat (nb, H, n*G, D) float32
    if hat, else None."""
    bits = check_bits("store_k_chunks", bits, BITS)
    fitting = fitted(sc, fit, bits)
    x, (xb, xh, xt), ct = token_rows("store_k_chunks x", x, n * G)
    nb, H, _, D = x.shape
    B = out[0].shape[0]
    kern = (kernel("kivi_fit", f"kfit_k_chunks<{bits}, {sc}, {str(fit == 'mse').lower()}, {ct}>", EXACT) if fitting
            else kernel("kivi", f"kivi_k_chunks<{bits}, {ct}>", EXACT))
    return launch_k_chunks("store_k_chunks", kern, (x, xb, xh, xt, i32(H), device_rows(rows, B)), (nb, H, D, B), n, G,
                           bits, out, c0, hat, sc, fitting)


def store_v_tokens(xp, x, T: int, bits: int, group: int, out, rows, t0: int, hat: bool = True, sc: int = 16,
                   fit: str = "minmax"):
    """Quantize tokens 0..T-1 of x (nb, H, w >= T, D) fp16/float32 (read in place) per token in
    groups of `group` channels and store them as tokens t0.. of batch rows `rows` in out = (codes
    (B, H, cap, D*b/8) uint8, scale, min (B, H, cap, D/group) fp16, or uint8 / int8 for sc=8).
    Returns x_hat (nb, H, T, D) float32 if hat, else None."""
    import cupy as cp

    bits = check_bits("store_v_tokens", bits, BITS)
    fitting = fitted(sc, fit, bits)
    x, (xb, xh, xt), ct = token_rows("store_v_tokens x", x, T)
    nb, H, _, D = x.shape
    codes, scale, mn = out
    B, cap = codes.shape[0], codes.shape[2]
    R = check_v_storage("store_v_tokens", out, (nb, H, D, B), T, bits, group, t0, sc)
    x_hat = cp.empty((nb, H, T, D), np.float32) if hat else None
    if R and fitting:
        items = R * (D // group)
        kernel("kivi_fit", f"kfit_v_tokens<{bits}, {sc}, {str(fit == 'mse').lower()}, {ct}>", EXACT)(
            (-(-items // 128),), (128,), (x, xb, xh, xt, i32(H), device_rows(rows, B), i32(cap), i32(t0), i32(T), codes,
                                          scale, mn, x_hat if hat else np.uint64(0), i32(R), i32(D), i32(group),
                                          log_table()))
    elif R:
        grid, block, smem = row_launch(R, D)
        kernel("kivi", f"kivi_v_tokens<{bits}, {ct}>", EXACT)(
            grid, block, (x, xb, xh, xt, i32(H), device_rows(rows, B), i32(cap), i32(t0), i32(T), codes, scale, mn,
                          x_hat if hat else np.uint64(0), i32(R), i32(D), i32(group)), shared_mem=smem * 2)
    return x_hat


def quantize_k_chunks(xp, x, bits: int, sc: int = 16, fit: str = "minmax"):
    """x (..., n, G, D) float32 -> packed codes (..., n, G, D*b/8) uint8, scale, min (..., n, D)
    (fp16, or uint8 / int8 for sc=8), and the dequantized values (..., n, G, D) float32."""
    import cupy as cp

    bits = check_bits("quantize_k_chunks", bits, BITS)
    x = prepare("quantize_k_chunks x", x, 3)
    *lead, n, G, D = x.shape
    S = int(np.prod(lead, dtype=np.int64))
    st, mt = param_types(sc)
    codes = cp.empty((S, 1, n, G, D * bits // 8), np.uint8)
    scale, mn = cp.empty((S, 1, n, D), st), cp.empty((S, 1, n, D), mt)
    x_hat = cp.empty(x.shape, np.float32)
    if x.size:
        x_hat = store_k_chunks(xp, x.reshape(S, 1, n * G, D), n, G, bits, (codes, scale, mn), np.arange(S), 0, True,
                               sc, fit)
    return (codes.reshape(*lead, n, G, D * bits // 8), scale.reshape(*lead, n, D), mn.reshape(*lead, n, D),
            x_hat.reshape(x.shape))


def quantize_v_tokens(xp, x, bits: int, group: int, sc: int = 16, fit: str = "minmax"):
    """x (..., T, D) float32 -> packed codes (..., T, D*b/8) uint8, scale, min (..., T, D/group)
    (fp16, or uint8 / int8 for sc=8), and the dequantized values (..., T, D) float32."""
    import cupy as cp

    bits = check_bits("quantize_v_tokens", bits, BITS)
    x = prepare("quantize_v_tokens x", x, 2)
    *lead, T, D = x.shape
    if group <= 0 or group % 8 or D % group:
        raise ValueError(f"quantize_v_tokens: group={group} must be a multiple of 8 dividing D={D}")
    S = int(np.prod(lead, dtype=np.int64))
    st, mt = param_types(sc)
    codes = cp.empty((S, 1, T, D * bits // 8), np.uint8)
    scale, mn = cp.empty((S, 1, T, D // group), st), cp.empty((S, 1, T, D // group), mt)
    x_hat = cp.empty(x.shape, np.float32)
    if x.size:
        x_hat = store_v_tokens(xp, x.reshape(S, 1, T, D), T, bits, group, (codes, scale, mn), np.arange(S), 0, True,
                               sc, fit)
    g = D // group
    return codes.reshape(*lead, T, D * bits // 8), scale.reshape(*lead, T, g), mn.reshape(*lead, T, g), x_hat.reshape(x.shape)


# -- what the fused attention reads ------------------------------------------------------------
KIVI = KernelMethod("kivi", 1, (2, 4, 8), trial_bits=(3,))  # tiles.cuh's Method::KIVI


@dataclass(frozen=True, kw_only=True)
class UniformStorage(KernelStorage):
    """One layer of minikv.kv.kivi's chunks (sc=16) as the fused kernels read them:
    kc (B, H, NC, G, D*kb/8) uint8, ks, km (B, H, NC, D) fp16; vc (B, H, NC*G, D*vb/8) uint8,
    vs, vm (B, H, NC*G, D/gs) fp16."""
    kernel: ClassVar[KernelMethod] = KIVI
    kbits: int
    vbits: int
    kc: object
    ks: object
    km: object
    vc: object
    vs: object
    vm: object
    n_chunks_cap: int
    G: int

    def __post_init__(self):
        B, H, NC, G, kw = check("kivi storage kc", self.kc, np.uint8).shape
        D = kw * 8 // self.kbits
        for name in ("ks", "km"):
            check(f"kivi storage {name}", getattr(self, name), np.float16, (B, H, NC, D))
        check("kivi storage vc", self.vc, np.uint8, (B, H, NC * G, D * self.vbits // 8))
        gs = check("kivi storage vs", self.vs, np.float16, (B, H, NC * G, None)).shape[3]
        check("kivi storage vm", self.vm, np.float16, (B, H, NC * G, gs))
        if (NC, G) != (self.n_chunks_cap, self.G):
            raise ValueError(f"kivi storage: {NC} chunks of {G} tokens, said {self.n_chunks_cap} of {self.G}")

    def codes(self, null):
        return (self.kc, self.ks, self.km, self.vc, self.vs, self.vm, i32(self.n_chunks_cap), i32(self.G), i32(64))
