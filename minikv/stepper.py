"""How a model's forwards run over one cache, for a session and for `minikv bench` alike: a
prompt in pieces of `ubatch` tokens (its activations do not grow with it), and decode steps
replayed from CUDA graphs wherever the cache allows (cuda/graphs.py), else run eagerly."""
from __future__ import annotations

import numpy as np


class Stepper:
    def __init__(self, model, cache, ubatch: int, graphs: bool = True):
        """graphs: replay captured decode steps on the GPU (False: every step eager, --no-graph)."""
        self.model, self.cache, self.ubatch = model, cache, ubatch
        be, B = model.backend, cache.batch
        # A captured step's matmuls must be capturable: gemv.cu's (up to 8 rows), or cuda/gemm.py's
        # cuBLAS calls (up to 64) where the device lets a graph capture them.
        self.graphs = None
        if graphs and be.is_gpu and cache.fused is not None and B <= be.ops.graph_rows:
            from .cuda.graphs import GraphCache

            self.graphs = GraphCache(be.xp)
        self._tokens_host = be.host_buffer(B, np.int64)
        self._tokens_dev = be.xp.zeros((B, 1), np.int64) if self.graphs else None

    def feed(self, ids):
        """ids (B, T) host ints, appended to the cache: one decode step when T == 1, else the
        prompt in pieces of ubatch tokens over the B rows, later pieces reading what earlier ones stored. Returns the
        float32 logits (B, V) after each row's last token, valid until the next step."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[1] == 1:
            return self.decode(ids[:, 0])
        piece = max(1, self.ubatch // ids.shape[0])  # ubatch counts the tokens of all rows, as llama.cpp's
        for a in range(0, ids.shape[1], piece):
            last = a + piece >= ids.shape[1]
            logits = self.model.forward(ids[:, a:a + piece], self.cache, logits="last" if last else "none")
        return logits

    def decode(self, tokens, n_new=1):
        """One token per sequence -> logits (B, V). tokens: (B,) host ints, or a device array of
        B ids (a sampler's output: the step is queued without waiting for it, so a loop can plan
        and launch step n + 1 while the GPU still runs step n). n_new (B,) 0 or 1: rows with 0
        (a server's idle slots) take no token, and their logits mean nothing (the step is
        replayed all the same: which rows take a token is row info on the device)."""
        cache, model, xp = self.cache, self.model, self.model.xp
        on_device = xp is not np and isinstance(tokens, xp.ndarray)
        cache.begin_step(n_new)
        key = cache.graph_key() if self.graphs is not None else None
        if on_device:  # a sampler's -1 (non-finite logits) must not index the embedding
            ids = xp.maximum(tokens.reshape(-1, 1), 0, out=self._tokens_dev if key is not None else None)
        if key is None:
            out = model.run(ids if on_device else np.asarray(tokens, dtype=np.int64).reshape(-1, 1), cache)
        else:
            if not on_device:
                self._tokens_host[:] = tokens
                self._tokens_dev.set(self._tokens_host.reshape(-1, 1))
            out = self.graphs.run(key, lambda: model.run(self._tokens_dev, cache))
        cache.end_step()
        return out
