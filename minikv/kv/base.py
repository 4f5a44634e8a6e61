"""The KV-cache contract every method implements (KVQUANT.md section 0).

A cache belongs to a generation session: the caller creates it and passes it into each
forward. Per forward the model calls

    start = cache.begin_step(n_new)        # (B,) positions of the first new token per row
    for each layer: cache.update(layer, k, v); out = cache.attend(layer, q); cache.commit(layer)
    cache.end_step()                       # the new tokens are held

Storing (update, then commit: a quantized cache flushes chunks there) and attending are separate
steps; accessors (nbytes, bits_per_value, reconstruct) read the state between steps and change
nothing.

so the model never knows how (or whether) keys and values are quantized.

begin_step also publishes the step's row info (what the kernels read: per layer and sequence,
the segments' lengths) and each row's start position to the device, in one copy: a step whose
launches depend on nothing else (`graph_key`) can be captured as a CUDA graph and replayed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..backend import Backend
from ..errors import MinikvError


@dataclass(frozen=True)
class KVGeometry:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float  # softmax scale applied to q.k


class KVCache(ABC):
    method = "?"
    # Bytes of fp16 K/V a method may hold while it quantizes a prompt (the memory planner adds them).
    FIRST_FLUSH_BATCH_BYTES = 0

    def __init__(self, geom: KVGeometry, batch: int, capacity: int, backend: Backend, attention: str = "auto",
                 plan_only: bool = False):
        """plan_only: allocate nothing, only count the bytes the buffers would take
        (`allocated_bytes`, what the memory planner charges for this cache)."""
        self.geom, self.batch, self.capacity, self.backend = geom, batch, capacity, backend
        self.plan_only, self.allocated_bytes = plan_only, 0
        self.xp = backend.xp
        self.fused = self._fused_kernel() if attention == "auto" else None  # else: reference array ops
        self.lengths = np.zeros(batch, dtype=np.int64)  # committed tokens per sequence (host)
        self.n_new = np.zeros(batch, dtype=np.int64)  # tokens being added in the current step
        self.tiles = 0  # key tiles of the step's longest row, bucketed (sizes the attention's split)
        self._storage: list[list] = []  # every per_layer list (row views slice them)
        self._views: dict = {}  # (b0, b1) -> the cache over those rows (row_range)
        self._alloc_rowinfo()

    # Host arrays holding one entry per row, by (name, row axis): what a row view takes over.
    ROW_STATE: tuple = (("lengths", 0),)

    def _alloc_rowinfo(self) -> None:
        """The step's row info (L, B, 6) and start positions (B,), one int32 buffer on each side
        (a few kilobytes: the planner's workspace covers them, allocated_bytes counts K/V storage)."""
        L, B, none = self.geom.n_layers, self.batch, self.plan_only
        n, gpu = L * B * 6, self.backend.is_gpu and not none
        # On the GPU two host buffers take turns: a step may be planned while the previous
        # step's upload still waits in the stream (a pipelined decode loop).
        self._info_hosts = [self.backend.host_buffer(0 if none else n + B, np.int32) for _ in range(1 + gpu)]
        self._rowinfo_hosts = [h[:n].reshape(L, B, 6) for h in self._info_hosts] if not none else None
        self._info_host, self._info_turn = self._info_hosts[0], 0
        self._info_dev = self.xp.zeros(n + B, np.int32) if gpu else self._info_host
        self.rowinfo_host = self._info_host[:n].reshape(L, B, 6) if not none else None
        self.rowinfo_dev = self._info_dev[:n].reshape(L, B, 6) if not none else None
        self.start_dev = self._info_dev[n:] if not none else None  # (B,) positions of the step's first tokens

    def _fused_kernel(self):
        """The fused CUDA attention where this cache's geometry allows it (fp16 compute, head_dim
        64 or 128), else None."""
        if not self.backend.is_gpu or self.backend.dtype != np.float16 or self.geom.head_dim not in (64, 128):
            return None
        from ..cuda.attention import FusedAttention

        return FusedAttention(self.xp, self.geom.head_dim, max_heads=self.batch * self.geom.n_kv_heads)

    def per_layer(self, shape, dtype) -> list:
        """A zeroed array of `shape` per layer: views of one allocation (one per layer would cost a
        cache of a 32-layer model a few milliseconds of allocations and memsets). Every buffer a
        cache keeps is made here, so `allocated_bytes` is exact."""
        shape = (self.geom.n_layers, *shape)
        self.allocated_bytes += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        arrays = [None] * self.geom.n_layers if self.plan_only else list(self.xp.zeros(shape, dtype))
        self._storage.append(arrays)
        return arrays

    @classmethod
    def validate(cls, spec) -> None:
        """Raise MinikvError unless `spec` (a KVSpec) is valid for this method."""
        if spec.bits is not None or spec.options:
            raise MinikvError(f"--kv {spec}: {cls.method} takes no bits or options")

    # -- stepping ---------------------------------------------------------------------
    def begin_step(self, n_new) -> np.ndarray:
        """Announce `n_new[b]` new tokens per sequence; returns each row's start position."""
        n_new = np.broadcast_to(np.asarray(n_new, dtype=np.int64), (self.batch,)).copy()
        end = self.lengths + n_new
        if int(end.max()) > self.capacity:
            raise MinikvError(f"context full: {int(end.max())} tokens do not fit in the context of "
                              f"{self.capacity}; use a shorter prompt or a larger --ctx-size")
        self.n_new = n_new
        self._plan_step()
        if len(self._info_hosts) > 1:  # the other buffer: the previous step's upload may still be queued
            self._info_turn ^= 1
            self._info_host, self.rowinfo_host = self._info_hosts[self._info_turn], self._rowinfo_hosts[self._info_turn]
        self.write_rowinfo(self.rowinfo_host)
        self._info_host[-self.batch:] = self.lengths
        if self._info_dev is not self._info_host:
            self._info_dev.set(self._info_host)  # pinned: asynchronous, ordered before the step's kernels
        return self.lengths.copy()

    def _plan_step(self) -> None:
        """Host bookkeeping of the step just begun (n_new set), before its row info is written."""

    def write_rowinfo(self, info: np.ndarray) -> None:
        """Fill info (L, B, 6) with what the attention kernels read per layer and sequence: sink
        tokens, quantized chunks, window tokens, step tokens, the step's offset in the window
        buffer, patterns (see cuda.attention.FusedAttention), and set `tiles`."""

    def graph_key(self):
        """None where this step cannot be replayed from a captured CUDA graph (it changes how the
        history is stored, or runs without the fused kernel); else a hashable of every host value
        its launches depend on beyond the row info on the device (a graph captured for the key
        is valid for every step with the same key)."""
        return None

    def end_step(self) -> None:
        self.lengths = self.lengths + self.n_new
        self._clear_step()

    @abstractmethod
    def update(self, layer: int, k, v) -> None:
        """Store this step's post-RoPE keys/values, k and v (B, Hkv, T, D)."""

    @abstractmethod
    def attend(self, layer: int, q):
        """Causal attention of q (B, H, T, D) over history + this step -> (B, H, T, D)."""

    def tokens_until_flush(self) -> int:
        """Tokens every sequence can take before the cache next changes how it stores its
        history (quantized caches flush chunks); chunked scoring aligns with this."""
        return self.capacity - int(self.lengths.max())

    def commit(self, layer: int) -> None:
        """Finish this step's storage for `layer`, after its attention (methods that store
        everything in `update` do nothing here)."""

    def _clear_step(self) -> None:
        """Per-step state back to "no step begun" (a new row view starts from it)."""
        self.n_new = np.zeros(self.batch, dtype=np.int64)

    # -- row views ----------------------------------------------------------------------------
    @contextmanager
    def row_range(self, b0: int, b1: int):
        """This cache's rows b0..b1-1 as a cache of b1 - b0 rows over the same storage: a forward
        on it runs only those rows (a server slot's prompt, without the idle slots' rows). Its
        per-row host state is taken from this cache on entry and handed back on a clean exit."""
        if not 0 <= b0 < b1 <= self.batch:
            raise ValueError(f"rows {b0}..{b1} of a batch of {self.batch}")
        if (b0, b1) == (0, self.batch):
            yield self
            return
        view = self._views.get((b0, b1))
        if view is None:
            view = self._views[(b0, b1)] = self._make_view(b0, b1)
        rows = lambda a, axis: a[(slice(None),) * axis + (slice(b0, b1),)]  # noqa: E731
        for name, axis in self.ROW_STATE:
            setattr(view, name, rows(getattr(self, name), axis).copy())
        yield view
        for name, axis in self.ROW_STATE:
            rows(getattr(self, name), axis)[...] = getattr(view, name)

    def _make_view(self, b0: int, b1: int) -> "KVCache":
        import copy

        view = copy.copy(self)
        view.batch, view._views = b1 - b0, {}
        view._storage = [[a[b0:b1] for a in arrays] for arrays in self._storage]  # (b1 - b0, ...) views
        for name, value in vars(self).items():
            for arrays, sliced in zip(self._storage, view._storage):
                if value is arrays:
                    setattr(view, name, sliced)
        view._alloc_rowinfo()
        view._clear_step()
        return view

    # -- session management -------------------------------------------------------------
    # rows: the sequences concerned, a host index (an int, a list), None for all of them.
    def reset(self, rows=None) -> None:
        """Forget every token of `rows` (a server slot taking a new conversation)."""
        self.lengths[slice(None) if rows is None else rows] = 0

    def can_truncate(self, length: int, rows=None) -> bool:
        """Whether `truncate(length, rows)` keeps the cache exact (methods with quantized
        history can only drop tokens that are still in their fp16 window)."""
        return True

    def truncate(self, length: int, rows=None) -> None:
        """Forget every token at position >= length of `rows`."""
        if not self.can_truncate(length, rows):
            raise MinikvError(f"{self.method} cache cannot drop tokens below position {length}")
        r = slice(None) if rows is None else rows
        self.lengths[r] = np.minimum(self.lengths[r], length)

    # -- accounting ------------------------------------------------------------------------
    @abstractmethod
    def nbytes(self) -> int:
        """Every byte stored for the tokens held (codes, scales, patterns, windows, sinks)."""

    def n_values(self) -> int:
        """Number of K and V scalars represented by the tokens held."""
        g = self.geom
        return int(2 * g.n_layers * g.n_kv_heads * g.head_dim * self.lengths.sum())

    def bits_per_value(self) -> float:
        n = self.n_values()
        return 8.0 * self.nbytes() / n if n else 0.0
