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


    def update(self, layer, k, v):
        T = k.shape[2]
        s = self.lengths
        if (s == s[0]).all() and (self.n_new == T).all():
            self.k[layer][:, :, s[0]:s[0] + T] = k
            self.v[layer][:, :, s[0]:s[0] + T] = v
            return
        for b in range(self.batch):  # ragged batch: each row writes its own valid tokens
            lo, n = int(s[b]), int(self.n_new[b])
            self.k[layer][b, :, lo:lo + n] = k[b, :, :n]
            self.v[layer][b, :, lo:lo + n] = v[b, :, :n]

    def attend(self, layer, q):
        if self.fused is not None:  # the history, then this step's keys (same buffer, causal)
            from ..cuda.attention import Storage, tiles_per_row

            z = np.zeros_like(self.lengths)
            info = np.stack([z, z, self.lengths, self.n_new, self.lengths, z], axis=1)
            kv = (self.k[layer], self.v[layer])
            return self.fused(q, info, self.geom.scale, None, kv, kv, Storage("fp16"),
                              tiles_per_row(0, 0, self.lengths, self.n_new, 64))
        S = int((self.lengths + self.n_new).max())
        limit = causal_limits(self.lengths, self.n_new, q.shape[2])
        return attention(self.xp, q, [(self.k[layer][:, :, :S], self.v[layer][:, :, :S], limit)], self.geom.scale)

    def nbytes(self):
        per_token = 2 * self.geom.n_layers * self.geom.n_kv_heads * self.geom.head_dim
        return int(per_token * self.lengths.sum() * self.backend.dtype.itemsize)
