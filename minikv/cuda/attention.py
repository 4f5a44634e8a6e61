"""The fused attention kernels: one launch over every segment of a cache (sinks | quantized
chunks | window | this step), split across thread blocks along the keys; the splits are merged
by a second launch (attend_reduce), or, in the decode kernel, by the last block of each kv head
to finish. Steps with at most 8 query rows per kv head (decode) whose codes are 2, 4
or 8 bits (nqkv: 2 or 4, token-axis blocks) run kernels_cu/decode.cu (register-resident tiles);
everything else (prefill, chunked scoring, 3-bit codes, nqkv with channel-axis K blocks) runs
kernels_cu/attention.cu (shared-memory tiles)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .module import check, f32, i32, kernel

TILE, THREADS = 64, 128
METHODS = {"fp16": 0, "kivi": 1, "nqkv_token": 2, "nqkv_channel": 3, "patternkv": 4}


def smem_bytes(D: int, rows: int, mmax: int = 0) -> int:
    """Shared memory of attend<D, ..., rows>: mirrors Smem<D, ROWS>::bytes in attention.cu
    (mmax > 0: patternkv's q.C table and histogram, mmax rounded up to 64 patterns)."""
    al = lambda x: (x + 127) // 128 * 128  # noqa: E731
    ldh, lds, ldp, mp = D + 8, TILE + 4, TILE + 8, -(-mmax // 64) * 64
    return (2 * al(rows * ldh * 2) + 2 * al(TILE * ldh * 2) + al(rows * lds * 4) + al(rows * ldp * 2)
            + al(rows * 5 * 4) + al((2 * D + 32) * 4) + al(TILE * 5 * 4) + 2 * al(rows * mp * 4))


DECODE_WARPS, DECODE_ROWS = (8, 4), 8  # warps per block of the decode kernel (preferred first), query rows
DECODE_BITS = {"fp16": (16,), "kivi": (2, 4, 8), "patternkv": (2, 4), "nqkv_token": (2, 4)}
NQ_TABLE = 256 * 128  # bytes of one nqkv lookup table in decode.cu (decode_nq.cuh)


def decode_variant(method: str, kb: int, vb: int) -> int:
    """16-key groups each warp of decode.cu's kernel loads a step ahead for a method: 4, unless
    its registers then spill (ptxas, head_dim 128: kivi with 4 + 4 bits or more, patternkv with
    more than 2 + 2, nqkv always), which get 2, and kivi with 8 + 8 bits 1.
    tests/test_kernels_compile.py checks that no variant picked here spills, with either block size."""
    if method == "nqkv_token":
        return 2
    if kb + vb <= (4 if method == "patternkv" else 6):
        return 4
    return 2 if kb + vb < 16 else 1


def decode_smem_bytes(D: int, patterns: bool, mp: int, warps: int, nq_tables: int = 0) -> int:
    """Shared memory of attend_decode<D, ..., warps>: mirrors DLayout<D, DW>::bytes in decode_tiles.cuh
    (nq_tables: nqkv's lookup tables, 1 or 2, at DLayout::NL)."""
    al = lambda x: (x + 127) // 128 * 128  # noqa: E731
    W, R, ldm = warps, DECODE_ROWS, D + 4
    qc = (2 * al(32 * (D // 8 + 4) * 4) + al(W * 4 * D * 2) + al(W * R * ldm * 4)
          + al((3 * W * R + W + R + 1) * 4))
    return qc + al(R * mp * 4) + al(W * mp * R * 4) if patterns else qc + nq_tables * NQ_TABLE


@dataclass
class Storage:
    """What the kernel reads of a method's packed chunks for one layer (None: unused)."""
    method: str
    kbits: int = 16
    vbits: int = 16
    kc: object = None
    ks: object = None
    km: object = None
    vc: object = None
    vs: object = None
    vm: object = None
    n_chunks_cap: int = 0
    G: int = TILE
    bs: int = 64
    levels_k: object = None
    levels_v: object = None
    kidx: object = None
    vidx: object = None
    vmask: object = None
    kpat: object = None
    vpat: object = None
    mmax: int = 0


class FusedAttention:
    """decode: route steps of <= 8 query rows per kv head to the register-tile kernel where the
    method allows (False: always the shared-memory-tile kernel; tests compare both).
    groups: 16-key groups each warp of the decode kernel loads a step ahead (None: as
    decode_variant picks), warps: its warps per block, 8 or 4 (None: 8 where the shared memory
    allows, which at batch 1 runs 6-15% faster on an H100). keys_per_pattern: the
    fewest keys a block takes per pattern of its tables (patternkv: every block reads both
    pattern tables from L2, so short splits would read more table than cache). min_keys: the
    fewest keys a block takes (a block's prologue and its share of the merge are fixed costs)."""

    KEYS_PER_PATTERN = 4  # bench: 4 and 8 equal, 16+ slower (fewer blocks than SMs)
    MIN_KEYS = 0

    def __init__(self, cp, head_dim: int, decode: bool = True, groups: int | None = None,
                 warps: int | None = None, keys_per_pattern: int | None = None, max_heads: int = 0):
        if head_dim not in (64, 128):
            raise ValueError(f"the fused attention kernel takes head_dim 64 or 128, not {head_dim}")
        self.cp, self.D = cp, head_dim
        dev = cp.cuda.Device()
        self.sms = dev.attributes["MultiProcessorCount"]
        self.smem_max = dev.attributes["MaxSharedMemoryPerBlockOptin"]
        self.smem_sm = dev.attributes["MaxSharedMemoryPerMultiprocessor"]
        self.regs_sm = dev.attributes["MaxRegistersPerMultiprocessor"]
        self._null_h = cp.zeros(8, np.float16)  # stand-in pointers for unused arguments
        self._null_b = cp.zeros(8, np.uint8)
        self._null_f = cp.zeros(16, np.float32)
        self._kernels: dict = {}
        if warps not in (None, *DECODE_WARPS):
            raise ValueError(f"the decode kernel takes {DECODE_WARPS} warps per block, not {warps}")
        self.decode, self.groups, self.warps = decode, groups, warps
        self.keys_per_pattern = self.KEYS_PER_PATTERN if keys_per_pattern is None else keys_per_pattern
        self.min_keys = self.MIN_KEYS
        self._reduce = kernel("attention", "attend_reduce")
        # decode: blocks finished per kv head (decode_merge.cuh); sized up front for a cache's
        # B * Hkv heads, so a captured step never sees them reallocated
        self._counters = cp.zeros(max_heads, np.int32)

    def _kernel(self, method: str, kb: int, vb: int, rows: int, smem: int, warps: int = 0):
        """rows: 16 or 64 (attention.cu's row tile), 0 for decode.cu's kernel (warps per block)."""
        key = (method, kb, vb, rows, self.groups, warps)
        if key not in self._kernels:
            m = METHODS[method]
            ng = self.groups or decode_variant(method, kb, vb)
            self._kernels[key] = (kernel("decode", f"attend_decode<{self.D}, {m}, {kb}, {vb}, {ng}, {warps}>") if rows == 0
                                  else kernel("attention", f"attend<{self.D}, {m}, {kb}, {vb}, {rows}>"))
        k = self._kernels[key]
        if k.max_dynamic_shared_size_bytes < smem:
            k.max_dynamic_shared_size_bytes = smem
        return k

    def __call__(self, q, rowinfo: np.ndarray, scale: float, sinks, window, step, storage: Storage,
                 tiles: int, rowinfo_dev=None):
        """q (B, H, T, D) fp16 (any strides, last dim contiguous); rowinfo host int (B, 6):
        sinks, chunks, window, step tokens, step offset, patterns per sequence, and rowinfo_dev the
        same as int32 on the device (None: uploaded here); the kernels read the device copy, the
        host one only picks the kernel and sizes its tables. sinks/window: (k, v) contiguous
        (B, Hkv, cap, D) fp16 or None; step: (k, v) (B, Hkv, T', D) fp16 views with a contiguous
        last dim; tiles: at least the most key tiles any sequence has (sizes the split; the
        kernels split each row's own tiles, so more is only slower).
        Returns (B, H, T, D), a view of a (B, T, H, D) buffer."""
        cp, D = self.cp, self.D
        B, H, T, _ = q.shape
        sk, sv = step
        Hkv, s = sk.shape[1], storage
        for name, a in (("q", q), ("step k", sk), ("step v", sv)):
            if a.dtype != np.float16 or a.strides[-1] != 2:
                raise ValueError(f"fused attention: {name} must be fp16 with a contiguous last dim")
        g = H // Hkv
        if s.method != "fp16" and not np.any(rowinfo[:, 1]):
            s = Storage("fp16")  # no chunks (a prefill): every segment read is fp16, in the lean kernel
        # patternkv's per-block tables hold as many patterns as the fullest sequence has
        mp = -(-int(np.max(rowinfo[:, 5])) // 64) * 64 if s.method == "patternkv" else 0
        ok_bits = DECODE_BITS.get(s.method, ())
        # nqkv: a lane's run of a key's channels (D/4 of K, D/8 of V) must lie in one absmax block
        ok_bs = s.method != "nqkv_token" or min(s.bs, D) % (D // 4) == 0
        if self.decode and g * T <= DECODE_ROWS and s.kbits in ok_bits and s.vbits in ok_bits and ok_bs:
            pat = s.method == "patternkv"
            nq = (1 + (s.kbits != s.vbits)) if s.method == "nqkv_token" else 0
            warps = self.warps or next((w for w in DECODE_WARPS if decode_smem_bytes(D, pat, mp, w, nq) <= self.smem_max),
                                       DECODE_WARPS[-1])
            rows, smem, threads = 0, decode_smem_bytes(D, pat, mp, warps, nq), warps * 32
            row_tiles, min_tiles = 1, 2 * warps  # >= 2 tiles (128 keys) per warp
            if q.data.ptr % 16 or any(x % 16 for x in q.strides[:3]):
                q = q.copy()  # a fresh, aligned buffer: the kernel reads q 8 halves at a time
        else:
            rows, warps = (16 if g * T <= 16 or smem_bytes(D, 64, mp) > self.smem_max else 64), 0
            smem, threads = smem_bytes(D, rows, mp), THREADS
            row_tiles, min_tiles = -(-g * T // rows), 4  # >= 4 tiles per block amortise the merge
        min_tiles = max(min_tiles, -(-mp * self.keys_per_pattern // 64), -(-self.min_keys // 64))
        blocks = B * Hkv * row_tiles
        kern = self._kernel(s.method, s.kbits, s.vbits, rows, smem, warps)
        # Split the keys so that all blocks run in one wave (a partial second wave can cost up
        # to half the time).
        per_sm = min(self.smem_sm // (smem + 1024), self.regs_sm // (kern.num_regs * threads), 16)
        n_split = max(1, min(max(1, per_sm) * self.sms // blocks, -(-max(tiles, 1) // min_tiles)))
        if rowinfo_dev is None:
            rowinfo_dev = cp.asarray(np.ascontiguousarray(rowinfo, dtype=np.int32))
        ri = check("rowinfo", rowinfo_dev, np.int32, (B, 6))
        sink_k, sink_v = sinks if sinks is not None else (self._null_h, self._null_h)
        win_k, win_v = window if window is not None else (self._null_h, self._null_h)
        for name, a in (("sink k", sink_k), ("sink v", sink_v), ("window k", win_k), ("window v", win_v)):
            check(name, a, np.float16)
        nb, nh, nf = self._null_b, self._null_h, self._null_f
        o_part = cp.empty((n_split, B, H, T, D), np.float32)
        ml_part = cp.empty((n_split, B, H, T, 2), np.float32)
        out = cp.empty((B, T, H, D), np.float16)
        extra = ()
        if rows == 0:  # the decode kernel merges its splits itself: the last block of a kv head
            if self._counters.size < B * Hkv:
                self._counters = cp.zeros(B * Hkv, np.int32)  # each launch leaves them zero again
            extra = (out, self._counters)
        e = 2  # bytes per fp16 element: CuPy strides are in bytes
        kern(
            (n_split, Hkv * row_tiles, B), (threads,),
            (q, np.int64(q.strides[0] // e), np.int64(q.strides[1] // e), np.int64(q.strides[2] // e),
             i32(H), i32(Hkv), i32(T), f32(scale), ri,
             sink_k, sink_v, i32(sink_k.shape[2] if sinks is not None else 0),
             win_k, win_v, i32(win_k.shape[2] if window is not None else 0),
             sk, sv, np.int64(sk.strides[0] // e), np.int64(sk.strides[1] // e), np.int64(sk.strides[2] // e),
             s.kc if s.kc is not None else nb, s.ks if s.ks is not None else nh, s.km if s.km is not None else nh,
             s.vc if s.vc is not None else nb, s.vs if s.vs is not None else nh, s.vm if s.vm is not None else nh,
             i32(s.n_chunks_cap), i32(s.G), i32(s.bs),
             s.levels_k if s.levels_k is not None else nf, s.levels_v if s.levels_v is not None else nf,
             s.kidx if s.kidx is not None else nb, s.vidx if s.vidx is not None else nb,
             s.vmask if s.vmask is not None else nb, s.kpat if s.kpat is not None else nh,
             s.vpat if s.vpat is not None else nh, i32(s.mmax), i32(mp), o_part, ml_part, *extra),
            shared_mem=smem)
        if rows == 0:
            return out.transpose(0, 2, 1, 3)
        items = B * H * T * (D // 32)  # one warp each; 4 per block once they fill the GPU
        wpb = 4 if items >= 16 * self.sms else 1
        self._reduce((-(-items // wpb),), (32, wpb),
                     (o_part, ml_part, out, i32(n_split), i32(H), i32(T), i32(D), np.int64(B * H * T)),
                     shared_mem=4 * n_split * wpb)
        return out.transpose(0, 2, 1, 3)


def tiles_per_row(sinks, chunks, window, step, G: int) -> int:
    """Key tiles of the longest sequence (host ints or arrays), rounded up to 16 or to one of four
    steps per octave above (16, 20, 24, 28, 32, 40, ...): the split, and so a decode step's
    launches, change only at those steps, and a captured step is replayed until then (the decode
    kernel gives each block >= 16 tiles anyway: at most one split below 1024 keys)."""
    t = int(np.max(-(-np.asarray(sinks) // TILE) + np.asarray(chunks) * (G // TILE) + -(-np.asarray(window) // TILE)
                   + -(-np.asarray(step) // TILE)))
    if t <= 16:
        return 16
    q = 1 << (t.bit_length() - 3)  # a quarter of the octave t lies in
    return -(-t // q) * q
