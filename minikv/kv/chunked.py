"""What every quantized method shares (KVQUANT.md section 0): per sequence, S fp16 sink
tokens, then chunks of G quantized tokens, then an fp16 window of the newest tokens.

Positions: [0, S) sinks; chunk c covers [S + cG, S + (c+1)G); the window is the rest.
After a step's attention, a sequence whose window (with the step's tokens) holds >= max(R, G)
tokens flushes its oldest G as a chunk, repeatedly, so between steps the window holds fewer
than max(R, G). With R = G this is KIVI's rule; a prefill attends to itself in full
precision, then all its whole chunks are quantized and the rest stays in the window.

State per layer: the method's packed storage, fp16 sink and window buffers, and this step's
keys/values, held from `update` until `commit` (after `attend`). Attention reads four
segments: sinks | chunks | window | this step (causal). The reference attention (array ops)
keeps the flushed chunks dequantized in `hist`, written once per flush, never per step.
A method may let a sequence's first flush wait until the step ends (nothing reads a layer's
chunks before the next step) and run it for several layers at once: patternkv's KMeans.
"""
from __future__ import annotations

import numpy as np

from ..errors import MinikvError
from .attention import attention
from .base import KVCache
from .packing import row_index


class ChunkedQuantCache(KVCache):
    BITS: tuple[int, ...] = ()
    DEFAULT_BITS: int | None = None
    INT_OPTIONS = {"g": 128, "r": 128, "sink": 0}  # subclasses extend
    # > 0: a sequence's first flush (the prefill's chunks) waits, up to this many bytes of K/V,
    # and runs for several layers at once at the end of the step (see _first_flushes).
    FIRST_FLUSH_BATCH_BYTES = 0
    # rot: keys (and queries) and/or values turned by one fixed orthogonal matrix per head
    # dimension (a Hadamard with random signs) before anything is stored: q.k and the attention's
    # output are unchanged, and outlier channels are spread over all channels before quantizing.
    STR_OPTIONS: dict[str, tuple[str, ...]] = {"rot": ("none", "kv", "k", "v")}  # name -> choices (first is the default)

    # -- spec ---------------------------------------------------------------------------------
    @classmethod
    def settings(cls, spec) -> dict:
        """The method's settings from a KVSpec, or one MinikvError listing what is valid."""
        names = sorted([*cls.INT_OPTIONS, *cls.STR_OPTIONS, "kbits", "vbits"])
        valid = (f"{cls.method}:BITS with BITS in {', '.join(map(str, cls.BITS))}; options "
                 + ", ".join(f"{n}=" for n in names))

        def bad(why):
            return MinikvError(f"--kv {spec}: {why}; valid: {valid}")

        s = dict(cls.INT_OPTIONS)
        s.update({k: v[0] for k, v in cls.STR_OPTIONS.items()})
        bits = spec.bits if spec.bits is not None else cls.DEFAULT_BITS
        s["kbits"] = s["vbits"] = bits
        for key, val in spec.options.items():
            if key in cls.STR_OPTIONS:
                if val not in cls.STR_OPTIONS[key]:
                    raise bad(f"{key}={val} is not one of {', '.join(cls.STR_OPTIONS[key])}")
                s[key] = val
            elif key in cls.INT_OPTIONS or key in ("kbits", "vbits"):
                try:
                    s[key] = int(val)
                except ValueError:
                    raise bad(f"{key}={val} is not an integer") from None
            else:
                raise bad(f"unknown option {key!r}")
        for key in ("kbits", "vbits"):
            if s[key] not in cls.BITS:
                raise bad(f"{key if s[key] is not None else 'bits'}={s[key]} is not supported")
        if s["g"] < 8 or s["g"] % 8:
            raise bad(f"g={s['g']} must be a positive multiple of 8")
        if s["r"] < 0 or s["sink"] < 0:
            raise bad("r and sink must be >= 0")
        cls.check_settings(s, bad)
        return s

    @classmethod
    def check_settings(cls, s: dict, bad) -> None:
        """Method-specific checks; raise bad(why)."""

    @classmethod
    def validate(cls, spec) -> None:
        cls.settings(spec)

    # -- state --------------------------------------------------------------------------------
    def __init__(self, geom, batch, capacity, backend, spec, attention="auto", plan_only=False):
        super().__init__(geom, batch, capacity, backend, attention, plan_only)
        self.spec, self.s = spec, self.settings(spec)
        self.G, self.S = self.s["g"], self.s["sink"]
        if self.S >= capacity:
            raise MinikvError(f"--kv {spec}: sink={self.S} would keep the whole context of {capacity} tokens "
                              "in fp16; use a few sinks (4-16 is typical)")
        self.flush_at = max(self.s["r"], self.G)  # window size that triggers a flush
        self.n_chunks_max = -(-max(0, capacity - self.S) // self.G)
        self.n_chunks = np.zeros(batch, dtype=np.int64)  # flushed chunks per sequence
        xp, dt = self.xp, backend.dtype
        shape = (batch, geom.n_kv_heads, 0, geom.head_dim)  # (B, Hkv, T, D)
        self.sink_k = self.per_layer(shape[:2] + (self.S,) + shape[3:], dt)
        self.sink_v = self.per_layer(shape[:2] + (self.S,) + shape[3:], dt)
        self.win_k = self.per_layer(shape[:2] + (self.flush_at,) + shape[3:], dt)
        self.win_v = self.per_layer(shape[:2] + (self.flush_at,) + shape[3:], dt)
        if self.fused is not None and (self.G % 64 or not self.kernel_supports()):
            self.fused = None  # the kernel walks chunks in 64-token tiles; else the reference attention
        # The reference attention keeps the flushed chunks dequantized; the kernel reads storage.
        hist = shape[:2] + ((0 if self.fused else self.n_chunks_max * self.G),) + shape[3:]
        self.hist_k = self.per_layer(hist, dt)
        self.hist_v = self.per_layer(hist, dt)
        D = geom.head_dim
        if self.s["rot"] != "none" and (D & (D - 1) or D > 256):
            raise MinikvError(f"--kv {spec}: rot needs a head_dim that is a power of two up to 256, this "
                              f"model's is {D}; use rot=none")
        self.signs = self.xp.asarray(rotation_signs(D)) if self.s["rot"] != "none" else None  # (D,) float32
        self.rot_k, self.rot_v = self.s["rot"] in ("kv", "k"), self.s["rot"] in ("kv", "v")
        self._clear_step()
        self.allocate()
        self.kernel_storages = self._kernel_storages()

    def _kernel_storages(self) -> list | None:
        """Each layer's storage as the fused kernel reads it, built (and checked) once: the arrays
        never move, and an eager step would otherwise rebuild them per layer."""
        if self.fused is None or self.plan_only:
            return None
        return [self.kernel_storage(layer) for layer in range(self.geom.n_layers)]

    def _make_view(self, b0, b1):
        view = super()._make_view(b0, b1)
        view.kernel_storages = view._kernel_storages()  # over the view's rows
        return view

    ROW_STATE = KVCache.ROW_STATE + (("n_chunks", 0),)

    def _clear_step(self) -> None:
        super()._clear_step()
        self._step: list = [None] * self.geom.n_layers  # this step's (k, v) per layer until commit
        self._groups: list = []
        self._flushing = np.zeros(self.batch, dtype=np.int64)
        self._window_only = False  # this step only appends to the windows (see _plan_step)
        self._pending: list = []  # first flushes waiting: (layer, rows, n chunks, xk, xv)
        self._pending_bytes = 0

    def kernel_supports(self) -> bool:
        """Whether the fused kernel reads this method's settings (else the reference attention runs)."""
        return True

    def allocate(self) -> None:
        """Allocate the packed storage for n_chunks_max chunks per sequence and layer."""

    def quantizers(self, oracle_module: str, cuda_module: str):
        """The module holding a method's quantize functions: its CUDA kernels on the GPU (same
        signatures, bit-identical results), else the array-op oracle."""
        import importlib

        return importlib.import_module(cuda_module if self.backend.is_gpu else oracle_module)

    def reset(self, rows=None) -> None:
        super().reset(rows)
        self.n_chunks[slice(None) if rows is None else rows] = 0
        if rows is None:
            self._pending, self._pending_bytes = [], 0

    def _window_start(self) -> np.ndarray:
        return self.S + self.n_chunks * self.G

    def _window_len(self) -> np.ndarray:
        return np.maximum(self.lengths - self._window_start(), 0)

    def tokens_until_flush(self) -> int:
        """How many tokens every sequence can take before the next flush (chunked scoring
        aligned with flushes sees exactly what step-by-step decoding sees)."""
        return int((self._window_start() + self.flush_at - self.lengths).min())

    def can_truncate(self, length: int, rows=None) -> bool:
        r = slice(None) if rows is None else rows
        keep = np.minimum(self.lengths[r], length)
        return bool(((keep >= self._window_start()[r]) | (self.n_chunks[r] == 0)).all())

    def _ix(self, rows: np.ndarray):
        """Host row numbers -> an index for device arrays (a slice when contiguous)."""
        return row_index(self.xp, rows)

    # -- stepping -----------------------------------------------------------------------------
    def _plan_step(self):
        end = self.lengths + self.n_new
        w = end - self._window_start()  # window tokens once this step's are in
        self._flushing = np.where(w >= self.flush_at, (w - self.flush_at) // self.G + 1, 0)
        # Rows in the same state are committed together (usually the whole batch at once).
        groups: dict[tuple, list[int]] = {}
        for b in range(self.batch):
            key = (int(self.lengths[b]), int(self.n_new[b]), int(self.n_chunks[b]), int(self._flushing[b]))
            groups.setdefault(key, []).append(b)
        self._groups = [(np.asarray(rows), *key) for key, rows in groups.items()]
        # Only window writes (no sinks, no flush): one kv_append at offsets read on the device.
        self._window_only = not self._flushing.any() and bool((self.lengths >= self.S).all())

    def write_rowinfo(self, info):
        from ..cuda.attention import tiles_per_row

        sl, wl = np.minimum(self.lengths, self.S), self._window_len()
        z = np.zeros_like(sl)
        info[:] = np.stack([sl, self.n_chunks, wl, self.n_new, z, z], axis=1)
        info[:, :, 5] = self.pattern_counts()
        self.tiles = tiles_per_row(sl, self.n_chunks, wl, self.n_new, self.G)

    def graph_key(self):
        if self.fused is None or not self._window_only or (self.n_new > 1).any() or not self.n_new.any():
            return None
        # the lean fp16 kernel before the first chunk; patternkv's tables sized per layer
        return (self.method, self.tiles, bool(self.n_chunks.any()),
                tuple((-(-self.rowinfo_host[:, :, 5].max(axis=1) // 64)).tolist()))

    def _store(self, x):
        # The window and sinks are fp16 in the format, whatever the compute dtype.
        if x.dtype == np.float16:
            return x
        return x.astype(np.float16).astype(self.backend.dtype, copy=False)

    def _turn(self, x, back: bool = False):
        """x (B, H, T, D) times the rotation (`rotation`), or its transpose, in x's dtype."""
        return self.backend.ops.hadamard(x, self.signs, back)

    def update(self, layer, k, v):
        if self.rot_k and self.rot_v:
            k, v = self.backend.ops.hadamard_pair(k, v, self.signs)
        else:
            k, v = self._turn(k) if self.rot_k else k, self._turn(v) if self.rot_v else v
        self._step[layer] = (self._store(k), self._store(v))

    def attend(self, layer, q):
        out = self._attend(layer, self._turn(q) if self.rot_k else q)
        return self._turn(out, back=True) if self.rot_v else out

    def _attend(self, layer, q):
        """Attention over sinks | chunks | window | step: the fused kernel, or the reference
        over the dequantized chunks."""
        if self.fused is not None:
            return self._attend_fused(layer, q)
        k, v = self._step[layer]
        T = q.shape[2]
        sl = np.minimum(self.lengths, self.S)
        ql, wl = self.n_chunks * self.G, self._window_len()
        step_limit = np.minimum(np.arange(T)[None, :], np.maximum(self.n_new[:, None] - 1, 0)) + 1
        segs = [(self.sink_k[layer][:, :, :sl.max()], self.sink_v[layer][:, :, :sl.max()], sl),
                (self.hist_k[layer][:, :, :ql.max()], self.hist_v[layer][:, :, :ql.max()], ql),
                (self.win_k[layer][:, :, :wl.max()], self.win_v[layer][:, :, :wl.max()], wl),
                (k, v, step_limit)]
        segs = [(a, b, np.broadcast_to(lim[:, None] if lim.ndim == 1 else lim, (self.batch, T)))
                for a, b, lim in segs]
        return attention(self.xp, q, segs, self.geom.scale)

    def _attend_fused(self, layer, q):
        sinks = (self.sink_k[layer], self.sink_v[layer]) if self.S else None
        return self.fused(q, self.rowinfo_host[layer], self.geom.scale, sinks, (self.win_k[layer], self.win_v[layer]),
                          self._step[layer], self.kernel_storages[layer], self.tiles, self.rowinfo_dev[layer])

    def pattern_counts(self) -> np.ndarray | int:
        """(L, B) patterns each sequence holds per layer (methods without patterns: 0)."""
        return 0

    def kernel_storage(self, layer: int):
        """The packed chunks of `layer` as the fused kernel reads them (a cuda.attention.KernelStorage,
        from the method's own cuda module)."""
        raise NotImplementedError

    def commit(self, layer: int) -> None:
        """Store this step's keys/values of `layer`: sinks first, then the window, flushing
        the chunks the step completes (after attend: the step saw its own tokens in fp16)."""
        k, v = self._step[layer]
        self._step[layer] = None
        G, xp = self.G, self.xp
        if self._window_only:
            self.backend.ops.kv_append(k, v, self.win_k[layer], self.win_v[layer], self.rowinfo_host[layer],
                                       self.rowinfo_dev[layer])
            return
        for rows, s0, n, c0, f in self._groups:
            r = self._ix(rows)
            ns = max(0, min(self.S - s0, n))  # step tokens that are sinks
            if ns:
                self.sink_k[layer][r, :, s0:s0 + ns] = k[r, :, :ns]
                self.sink_v[layer][r, :, s0:s0 + ns] = v[r, :, :ns]
            w = max(0, s0 - self.S - c0 * G)  # window tokens before this step
            if not f:
                self.win_k[layer][r, :, w:w + n - ns] = k[r, :, ns:n]
                self.win_v[layer][r, :, w:w + n - ns] = v[r, :, ns:n]
                continue
            if w:  # (nb, Hkv, w', D): the window, then this step's tokens
                xk = xp.concatenate([self.win_k[layer][r, :, :w], k[r, :, ns:n]], axis=2)
                xv = xp.concatenate([self.win_v[layer][r, :, :w], v[r, :, ns:n]], axis=2)
            else:  # the quantizers read the step's tokens in place (a view into the projection)
                xk, xv = k[r, :, ns:n], v[r, :, ns:n]
            if c0 == 0 and self.FIRST_FLUSH_BATCH_BYTES:
                xk, xv = self.backend.ops.contiguous(xk), self.backend.ops.contiguous(xv)  # no view pinning the projection
                self._pending.append((layer, rows, f, xk, xv))
                self._pending_bytes += xk.nbytes + xv.nbytes
                if self._pending_bytes >= self.FIRST_FLUSH_BATCH_BYTES:
                    self._drain()
            else:
                self._keep_hat(layer, rows, c0, f, self._flush(layer, rows, c0, f, xk, xv))
            rest = xk.shape[2] - f * G
            self.win_k[layer][r, :, :rest] = xk[:, :, f * G:]
            self.win_v[layer][r, :, :rest] = xv[:, :, f * G:]

    def _keep_hat(self, layer, rows, c0, n, hats):
        """The reference attention's copy of the flushed chunks (the kernel reads the storage)."""
        if self.fused is None:
            r, G = self._ix(rows), self.G
            self.hist_k[layer][r, :, c0 * G:(c0 + n) * G] = hats[0]
            self.hist_v[layer][r, :, c0 * G:(c0 + n) * G] = hats[1]

    def _drain(self) -> None:
        """Run the waiting first flushes, grouped by rows and sizes (usually all of them at once)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        groups: dict[tuple, list] = {}
        for layer, rows, n, xk, xv in pending:
            groups.setdefault((tuple(rows.tolist()), n, xk.shape), []).append((layer, xk, xv))
        for (rows, n, _), items in groups.items():
            rows = np.asarray(rows)
            layers, xks, xvs = zip(*items)
            for layer, hats in zip(layers, self._first_flushes(list(layers), rows, n, list(xks), list(xvs))):
                self._keep_hat(layer, rows, 0, n, hats)

    def _first_flushes(self, layers, rows, n, xks, xvs):
        """The first flushes of several layers (same rows, same sizes): [_flush's (k_hat, v_hat)]
        per layer. Methods whose first flush has a costly batched step (KMeans) override it."""
        return [self._flush(layer, rows, 0, n, xk, xv) for layer, xk, xv in zip(layers, xks, xvs)]

    def end_step(self):
        self._drain()
        self.n_chunks += self._flushing
        super().end_step()

    def _flush(self, layer: int, rows: np.ndarray, c0: int, n: int, xk, xv):
        """Quantize chunks c0..c0+n-1 of sequences `rows` from xk, xv (nb, Hkv, w, D): the
        window with this step's tokens, whose first n*G tokens are the chunks (a method may
        look at all w, e.g. to mine patterns). Store them; return the dequantized
        (nb, Hkv, n*G, D), which only the reference attention reads (with the fused kernel a
        method may return None, None)."""
        raise NotImplementedError

    def reconstruct(self, layer: int):
        """(B, Hkv, max length, D) float32: every token as the format holds it (fp16 sinks and
        window, flushed chunks decoded from the packed storage alone), between steps."""
        xp, G, S = self.xp, self.G, self.S
        k_hat, v_hat = self.dequantize(layer)
        out = [xp.zeros((self.batch, self.geom.n_kv_heads, int(self.lengths.max()), self.geom.head_dim),
                        np.float32) for _ in range(2)]
        for b in range(self.batch):
            n, q, w = min(int(self.lengths[b]), S), int(self.n_chunks[b]) * G, int(self._window_len()[b])
            for o, sink, quant, win in ((out[0], self.sink_k, k_hat, self.win_k), (out[1], self.sink_v, v_hat, self.win_v)):
                o[b, :, :n] = sink[layer][b, :, :n]
                o[b, :, S:S + q] = quant[b, :, :q]
                o[b, :, S + q:S + q + w] = win[layer][b, :, :w]
        return [self._turn(o, back=True) if turned else o for o, turned in zip(out, (self.rot_k, self.rot_v))]

    # -- accounting ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        g = self.geom
        fp16_tokens = int((self.lengths - self.n_chunks * self.G).sum())  # sinks + windows
        return fp16_tokens * 2 * g.n_layers * g.n_kv_heads * g.head_dim * 2 + self.quantized_bytes()

    def quantized_bytes(self) -> int:
        """Bytes of everything stored for the flushed chunks (codes, scales, indices, patterns...)."""
        raise NotImplementedError


def rotation_signs(D: int) -> np.ndarray:
    """(D,) float32 fixed random signs: the rotation is diag(signs) H / sqrt(D), H the Sylvester
    Hadamard matrix (QuaRot's randomized Hadamard; ops.hadamard applies it)."""
    return np.random.default_rng(0x5EED).choice([-1.0, 1.0], size=D).astype(np.float32)


def rotation(D: int) -> np.ndarray:
    """The (D, D) float32 rotation matrix itself (D a power of two), for checks."""
    h = np.ones((1, 1))
    while h.shape[0] < D:
        h = np.block([[h, h], [h, -h]])
    return (rotation_signs(D)[:, None] * h / np.sqrt(D)).astype(np.float32)
