"""`fp16`: the unquantized cache, in the backend's compute dtype (float32 on the CPU)."""
from __future__ import annotations

from .attention import causal_attention, causal_mask
from .base import KVCache
from .registry import register


@register("fp16")
class DenseCache(KVCache):
    method = "fp16"
    options: dict = {}

    def __init__(self, geom, batch, capacity, backend, spec=None):
        super().__init__(geom, batch, capacity, backend)
        shape = (batch, geom.n_kv_heads, capacity, geom.head_dim)  # (B, Hkv, T, D) per layer
        xp = self.xp
        self.k = [xp.zeros(shape, dtype=backend.dtype) for _ in range(geom.n_layers)]
        self.v = [xp.zeros(shape, dtype=backend.dtype) for _ in range(geom.n_layers)]
        self._mask = None

    def begin_step(self, n_new):
        start = super().begin_step(n_new)
        self._mask = None  # built once per step, on the first attend
        return start

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
        T = q.shape[2]
        S = int((self.lengths + self.n_new).max())
        if self._mask is None:
            self._mask = causal_mask(self.xp, self.lengths, self.n_new, T, S)
        k, v = self.k[layer][:, :, :S], self.v[layer][:, :, :S]
        return causal_attention(self.xp, q, k, v, self._mask, self.geom.scale)

    def nbytes(self):
        per_token = 2 * self.geom.n_layers * self.geom.n_kv_heads * self.geom.head_dim
        return int(per_token * self.lengths.sum() * self.backend.dtype.itemsize)
