"""What every quantized method shares (KVQUANT.md section 0): per sequence, S fp16 sink
tokens, then chunks of G quantized tokens, then an fp16 window of the newest tokens.

Positions: [0, S) sinks; chunk c covers [S + cG, S + (c+1)G); the window is the rest.
After a step's attention, a sequence whose window holds >= max(R, G) tokens flushes its
oldest G tokens as a chunk, repeatedly, so between steps the window holds fewer than
max(R, G) tokens. With R = G this is KIVI's rule; a prefill attends to itself in full
precision, then all its whole chunks are quantized (the rest stays in the window).

Reference attention path: a dense mirror (DenseCache storage) holds every token as the
format represents it: fp16 values for sinks and window, dequantized values for flushed
chunks (rewritten once per flush, never per step). Methods implement `_flush`, which
quantizes chunks into their packed storage and returns the dequantized values.
"""
from __future__ import annotations

import numpy as np

from ..errors import MinikvError
from .dense import DenseCache


class ChunkedQuantCache(DenseCache):
    BITS: tuple[int, ...] = ()
    DEFAULT_BITS: int | None = None
    INT_OPTIONS = {"g": 128, "r": 128, "sink": 0}  # subclasses extend
    STR_OPTIONS: dict[str, tuple[str, ...]] = {}  # name -> choices (first is the default)

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
    def __init__(self, geom, batch, capacity, backend, spec):
        super().__init__(geom, batch, capacity, backend, spec)
        self.spec, self.s = spec, self.settings(spec)
        self.G, self.S = self.s["g"], self.s["sink"]
        self.flush_at = max(self.s["r"], self.G)  # window size that triggers a flush
        self.n_chunks_max = -(-max(0, capacity - self.S) // self.G)
        self.n_chunks = np.zeros(batch, dtype=np.int64)  # flushed chunks per sequence
        self._plan: list[tuple[np.ndarray, int, int, int]] = []
        self._flushing = np.zeros(batch, dtype=np.int64)
        self.allocate()

    def allocate(self) -> None:
        """Allocate the packed storage for n_chunks_max chunks per sequence and layer."""

    def reset(self) -> None:
        super().reset()
        self.n_chunks[:] = 0

    def _window_start(self) -> np.ndarray:
        return self.S + self.n_chunks * self.G

    def tokens_until_flush(self) -> int:
        """How many tokens every sequence can take before the next flush (chunked scoring
        aligned with flushes sees exactly what step-by-step decoding sees)."""
        return int((self._window_start() + self.flush_at - self.lengths).min())

    def can_truncate(self, length: int) -> bool:
        return bool((np.minimum(self.lengths, length) >= self._window_start()).all())

    # -- stepping -----------------------------------------------------------------------------
    def begin_step(self, n_new):
        start = super().begin_step(n_new)
        # Which chunks this step flushes, grouped so rows in the same state go together.
        end = self.lengths + self.n_new
        w = end - self._window_start()
        f = np.where(w >= self.flush_at, (w - self.flush_at) // self.G + 1, 0)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for b in np.nonzero(f)[0]:
            groups.setdefault((int(self.n_chunks[b]), int(f[b]), int(w[b])), []).append(int(b))
        self._plan = [(np.asarray(rows), c0, nf, nw) for (c0, nf, nw), rows in groups.items()]
        self._flushing = f
        return start

    def _store(self, x):
        # The window and sinks are fp16 in the format, whatever the compute dtype.
        return x.astype(np.float16).astype(self.backend.dtype, copy=False)

    def update(self, layer, k, v):
        super().update(layer, self._store(k), self._store(v))

    def attend(self, layer, q):
        out = super().attend(layer, q)
        self.commit(layer)  # after attention: this step saw its own tokens in fp16
        return out

    def commit(self, layer: int) -> None:
        """Flush the chunks this step completes in `layer` (attend does it; diagnostics that
        only store keys and values call it after update)."""
        for rows, c0, nf, nw in self._plan:
            lo = self.S + c0 * self.G
            xk = self.k[layer][rows, :, lo:lo + nw]  # (nb, Hkv, w, D) the whole window
            xv = self.v[layer][rows, :, lo:lo + nw]
            k_hat, v_hat = self._flush(layer, rows, c0, nf, xk, xv)
            self.k[layer][rows, :, lo:lo + nf * self.G] = k_hat
            self.v[layer][rows, :, lo:lo + nf * self.G] = v_hat

    def end_step(self):
        super().end_step()
        self.n_chunks += self._flushing
        self._plan, self._flushing = [], np.zeros_like(self.n_chunks)

    def _flush(self, layer: int, rows: np.ndarray, c0: int, n: int, xk, xv):
        """Quantize chunks c0..c0+n-1 of sequences `rows` from their window xk, xv
        (nb, Hkv, w, D) (the chunks are the first n*G tokens; a method may look at all w,
        e.g. to mine patterns). Store them; return the dequantized (nb, Hkv, n*G, D)."""
        raise NotImplementedError

    # -- accounting ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        g = self.geom
        fp16_tokens = int((self.lengths - self.n_chunks * self.G).sum())  # sinks + windows
        return fp16_tokens * 2 * g.n_layers * g.n_kv_heads * g.head_dim * 2 + self.quantized_bytes()

    def quantized_bytes(self) -> int:
        """Bytes of everything stored for the flushed chunks (codes, scales, indices, patterns...)."""
        raise NotImplementedError
