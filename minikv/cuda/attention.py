"""The fused attention kernels: one launch over every segment of a cache (sinks | quantized
chunks | window | this step), split across thread blocks along the keys; the splits are merged
by a second launch (attend_reduce), or, in the decode kernel, by the last block of each kv head
to finish. Steps with at most 8 query rows per kv head (decode) whose codes are 2, 4
or 8 bits (nqkv: 2 or 4, token-axis blocks) run kernels_cu/decode.cu (register-resident tiles);
everything else (prefill, chunked scoring, 3-bit codes, nqkv with channel-axis K blocks) runs
kernels_cu/attention.cu (shared-memory tiles). What a method's chunks look like to these kernels is
the method's own: a KernelStorage subclass and a KernelMethod in its cuda/ module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .module import check, f32, i32, kernel

TILE, THREADS = 64, 128


@dataclass(frozen=True)
class KernelMethod:
    """A method's tile decoder as the fused kernels know it: its id in tiles.cuh's Method enum, the
    code widths decode.cu's register-tile kernel takes (others run attention.cu), and whether
    its blocks hold pattern tables. Each method's own module (cuda/kivi.py, ...) declares its own."""
    name: str
    ident: int
    decode_bits: tuple[int, ...] = ()
    patterns: bool = False  # per-block q.C tables, sized by the fullest sequence's pattern count
    trial_bits: tuple[int, ...] = ()  # decode.cu takes these too, but only when asked (not yet run on a GPU)

    def __post_init__(self):
        KERNEL_METHODS[self.name] = self

    def groups(self, kb: int, vb: int) -> int:
        """16-key groups each warp of decode.cu loads a step ahead: 4, unless its registers then
        spill (ptxas, head_dim 128: 4 + 4 bits or more, 3-bit codes held as 4), which get 2, and
        8 + 8 bits 1. tests/test_kernels_compile.py checks that no variant picked spills."""
        held = lambda b: 4 if b == 3 else b  # noqa: E731  (decode_steps.cuh's held_bits)
        return 4 if held(kb) + held(vb) <= 6 else 2 if kb + vb < 16 else 1

    def decodes(self, st: "KernelStorage", D: int, trial: bool = False) -> bool:
        """Whether decode.cu reads this storage (else attention.cu does); trial: with trial_bits."""
        bits = self.decode_bits + (self.trial_bits if trial else ())
        return st.kbits in bits and st.vbits in bits

    def lookup_tables(self, st: "KernelStorage") -> int:
        """Code-level tables decode.cu keeps in shared memory (nqkv's), 0 to 2."""
        return 0


KERNEL_METHODS: dict[str, KernelMethod] = {}  # by name, as each method module declares its own
FP16 = KernelMethod("fp16", 0, (16,))


@dataclass(frozen=True)
class Nulls:
    """Stand-in device pointers for the storage arguments a method does not use."""
    h: object  # fp16
    b: object  # uint8
    f: object  # float32


@dataclass(frozen=True)
class KernelStorage:
    """What the fused kernels read of one layer's quantized chunks, laid out as their storage
    arguments by `args`. This base is the fp16 cache's: no chunks. A method's subclass (in its
    cuda/ module) names its typed arrays, checks them when built, and says which kernel reads them."""
    kernel: ClassVar[KernelMethod] = FP16
    kbits: ClassVar[int] = 16
    vbits: ClassVar[int] = 16
    G: ClassVar[int] = TILE  # tokens per chunk (the base: one tile, unused)

    def args(self, null: Nulls) -> tuple:
        """(kc, ks, km, vc, vs, vm, chunk capacity, G, block size, K levels, V levels, K pattern
        indices, V pattern indices, V mask, K patterns, V patterns, mmax): attention.cu's and
        decode.cu's storage parameters (tiles.cuh), in order."""
        return self.codes(null) + self.extras(null)

    def codes(self, null: Nulls) -> tuple:
        h, b = null.h, null.b
        return (b, h, h, b, h, h, i32(0), i32(self.G), i32(64))

    def extras(self, null: Nulls) -> tuple:
        h, b, f = null.h, null.b, null.f
        return (f, f, b, b, b, h, h, i32(0))

    def pattern_table(self, rowinfo: np.ndarray) -> int:
        """Patterns per block table (a multiple of 64) for the fullest sequence of the step, 0 without."""
        return 0


def smem_bytes(D: int, rows: int, mmax: int = 0) -> int:
    """Shared memory of attend<D, ..., rows>: mirrors Smem<D, ROWS>::bytes in attention.cu
    (mmax > 0: patternkv's q.C table and histogram, mmax rounded up to 64 patterns)."""
    al = lambda x: (x + 127) // 128 * 128  # noqa: E731
    ldh, lds, ldp, mp = D + 8, TILE + 4, TILE + 8, -(-mmax // 64) * 64
    return (2 * al(rows * ldh * 2) + 2 * al(TILE * ldh * 2) + al(rows * lds * 4) + al(rows * ldp * 2)
            + al(rows * 5 * 4) + al((2 * D + 32) * 4) + al(TILE * 5 * 4) + 2 * al(rows * mp * 4))


DECODE_WARPS, DECODE_ROWS = (8, 4), 8  # warps per block of the decode kernel (preferred first), query rows
NQ_TABLE = 256 * 128  # bytes of one nqkv lookup table in decode.cu (decode_nq.cuh)


def decode_smem_bytes(D: int, patterns: bool, mp: int, warps: int, nq_tables: int = 0) -> int:
    """Shared memory of attend_decode<D, ..., warps>: mirrors DLayout<D, DW>::bytes in decode_tiles.cuh
    (nq_tables: nqkv's lookup tables, 1 or 2, at DLayout::NL)."""
    al = lambda x: (x + 127) // 128 * 128  # noqa: E731
    W, R, ldm = warps, DECODE_ROWS, D + 4
    qc = (2 * al(32 * (D // 8 + 4) * 4) + al(W * 4 * D * 2) + al(W * R * ldm * 4)
          + al((3 * W * R + W + R + 1) * 4))
    return qc + al(R * mp * 4) + al(W * mp * R * 4) if patterns else qc + nq_tables * NQ_TABLE


class FusedAttention:
    """decode: route steps of <= 8 query rows per kv head to the register-tile kernel where the
    method allows (False: always the shared-memory-tile kernel; tests compare both).
    groups: 16-key groups each warp of the decode kernel loads a step ahead (None: as
    its KernelMethod picks), warps: its warps per block, 8 or 4 (None: 8 where the shared memory
    allows, which at batch 1 runs 6-15% faster on an H100). keys_per_pattern: the
    fewest keys a block takes per pattern of its tables (patternkv: every block reads both
    pattern tables from L2, so short splits would read more table than cache). min_keys: the
    fewest keys a block takes (a block's prologue and its share of the merge are fixed costs)."""

    KEYS_PER_PATTERN = 4  # bench: 4 and 8 equal, 16+ slower (fewer blocks than SMs)
    MIN_KEYS = 0

    def __init__(self, cp, head_dim: int, decode: bool = True, groups: int | None = None,
                 warps: int | None = None, keys_per_pattern: int | None = None, max_heads: int = 0,
                 trial: bool = False):
        if head_dim not in (64, 128):
            raise ValueError(f"the fused attention kernel takes head_dim 64 or 128, not {head_dim}")
        self.cp, self.D = cp, head_dim
        dev = cp.cuda.Device()
        self.sms = dev.attributes["MultiProcessorCount"]
        self.smem_max = dev.attributes["MaxSharedMemoryPerBlockOptin"]
        self.smem_sm = dev.attributes["MaxSharedMemoryPerMultiprocessor"]
        self.regs_sm = dev.attributes["MaxRegistersPerMultiprocessor"]
        self._nulls = Nulls(cp.zeros(8, np.float16), cp.zeros(8, np.uint8), cp.zeros(16, np.float32))
        self._kernels: dict = {}
        if warps not in (None, *DECODE_WARPS):
            raise ValueError(f"the decode kernel takes {DECODE_WARPS} warps per block, not {warps}")
        self.decode, self.groups, self.warps, self.trial = decode, groups, warps, trial
        self.keys_per_pattern = self.KEYS_PER_PATTERN if keys_per_pattern is None else keys_per_pattern
        self.min_keys = self.MIN_KEYS
        self._reduce = kernel("attention", "attend_reduce")
        # decode: blocks finished per kv head (decode_merge.cuh); sized up front for a cache's
        # B * Hkv heads, so a captured step never sees them reallocated
        self._counters = cp.zeros(max_heads, np.int32)

    def _kernel(self, method: KernelMethod, kb: int, vb: int, rows: int, smem: int, warps: int = 0):
        """rows: 16 or 64 (attention.cu's row tile), 0 for decode.cu's kernel (warps per block)."""
        key = (method.ident, kb, vb, rows, self.groups, warps)
        if key not in self._kernels:
            m = method.ident
            ng = self.groups or method.groups(kb, vb)
            self._kernels[key] = (kernel("decode", f"attend_decode<{self.D}, {m}, {kb}, {vb}, {ng}, {warps}>") if rows == 0
                                  else kernel("attention", f"attend<{self.D}, {m}, {kb}, {vb}, {rows}>"))
        k = self._kernels[key]
        if k.max_dynamic_shared_size_bytes < smem:
            k.max_dynamic_shared_size_bytes = smem
        return k

    def __call__(self, q, rowinfo: np.ndarray, scale: float, sinks, window, step, storage: KernelStorage,
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
        if s.kernel is not FP16 and not np.any(rowinfo[:, 1]):
            s = KernelStorage()  # no chunks (a prefill): every segment read is fp16, in the lean kernel
        method = s.kernel
        mp = s.pattern_table(rowinfo)
        if self.decode and g * T <= DECODE_ROWS and method.decodes(s, D, self.trial):
            pat, nq = method.patterns, method.lookup_tables(s)
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
        kern = self._kernel(method, s.kbits, s.vbits, rows, smem, warps)
        # Split the keys so that all blocks run in one wave (a partial second wave can cost up
        # to half the time).
        per_sm = min(self.smem_sm // (smem + 1024), self.regs_sm // (kern.num_regs * threads), 16)
        n_split = max(1, min(max(1, per_sm) * self.sms // blocks, -(-max(tiles, 1) // min_tiles)))
        if rowinfo_dev is None:
            rowinfo_dev = cp.asarray(np.ascontiguousarray(rowinfo, dtype=np.int32))
        ri = check("rowinfo", rowinfo_dev, np.int32, (B, 6))
        sink_k, sink_v = sinks if sinks is not None else (self._nulls.h, self._nulls.h)
        win_k, win_v = window if window is not None else (self._nulls.h, self._nulls.h)
        for name, a in (("sink k", sink_k), ("sink v", sink_v), ("window k", win_k), ("window v", win_v)):
            check(name, a, np.float16)
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
             *s.args(self._nulls), i32(mp), o_part, ml_part, *extra),
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
