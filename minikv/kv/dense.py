"""`fp16`: the unquantized cache, in the backend's compute dtype (float32 on the CPU)."""
from __future__ import annotations

import numpy as np

from .attention import attention, causal_limits
from .base import KVCache
from .registry import register


@register("fp16")
class DenseCache(KVCache):
    method = "fp16"
    options: dict = {}

    def __init__(self, geom, batch, capacity, backend, spec=None, attention="auto", plan_only=False):
        super().__init__(geom, batch, capacity, backend, attention, plan_only)
        shape = (batch, geom.n_kv_heads, capacity, geom.head_dim)  # (B, Hkv, T, D) per layer
        self.k = self.per_layer(shape, backend.dtype)
        self.v = self.per_layer(shape, backend.dtype)

    def write_rowinfo(self, info):
        from ..cuda.attention import tiles_per_row

        # history tokens in the "window" segment, this step's keys right behind them (same buffer)
        z = np.zeros_like(self.lengths)
        info[:] = np.stack([z, z, self.lengths, self.n_new, self.lengths, z], axis=1)
        self.tiles = tiles_per_row(0, 0, self.lengths, self.n_new, 64)

    def graph_key(self):
        # one token per row, or none (a server's idle slots: kv_append writes nothing for them)
        if self.fused is None or (self.n_new > 1).any() or not self.n_new.any():
            return None
        return ("fp16", self.tiles)

    def update(self, layer, k, v):
        # each row's valid tokens at its own length, offsets read on the device
        self.backend.ops.kv_append(k, v, self.k[layer], self.v[layer], self.rowinfo_host[layer],
                                   self.rowinfo_dev[layer])

    def attend(self, layer, q):
        if self.fused is not None:
            from ..cuda.attention import KernelStorage

            kv = (self.k[layer], self.v[layer])
            return self.fused(q, self.rowinfo_host[layer], self.geom.scale, None, kv, kv, KernelStorage(),
                              self.tiles, self.rowinfo_dev[layer])
        S = int((self.lengths + self.n_new).max())
        limit = causal_limits(self.lengths, self.n_new, q.shape[2])
        return attention(self.xp, q, [(self.k[layer][:, :, :S], self.v[layer][:, :, :S], limit)], self.geom.scale)

    def nbytes(self):
        per_token = 2 * self.geom.n_layers * self.geom.n_kv_heads * self.geom.head_dim
        return int(per_token * self.lengths.sum() * self.backend.dtype.itemsize)
