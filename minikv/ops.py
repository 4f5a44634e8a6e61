"""The model's elementwise/normalisation ops, written once against an array module.

`ArrayOps(numpy)` is the oracle and `CpuOps` the CPU path (the same ops, with BLAS threads
chosen per product); on the GPU a subclass swaps in fused CUDA kernels for the hot ops.
Matmuls go straight to `xp.matmul` (BLAS / cuBLAS).
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from .cpu_threads import BlasThreads


class ArrayOps:
    graph_rows = 0  # the most rows of a decode step a CUDA graph can capture (none here)

    def __init__(self, xp):
        self.xp = xp

    def forward_pass(self, rows: int):
        """A context around one forward pass of `rows` token rows (the CPU picks its BLAS
        threads by it)."""
        return nullcontext()

    def linear(self, x, w, b=None):
        """x (..., K) @ w(N, K).T (+ b) -> (..., N), in x's dtype (cuBLAS accumulates fp16 in fp32)."""
        y = self.xp.matmul(x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b

    def rms_norm(self, x, w, eps: float, out_dtype):
        """HF LlamaRMSNorm: normalise in float32, cast, then scale by the weight."""
        x32 = x.astype(np.float32, copy=False)
        var = (x32 * x32).mean(axis=-1, keepdims=True)
        y = (x32 * (1.0 / self.xp.sqrt(var + np.float32(eps)))).astype(out_dtype)
        return y * w.astype(out_dtype, copy=False)

    def add_rms_norm(self, x, y, w, eps: float, out_dtype):
        """x += y (float32 residual stream, in place), then rms_norm(x)."""
        return self.rms_norm(self.add_(x, y), w, eps, out_dtype)

    def embed(self, table, tokens):
        """table (V, C)[tokens (B, T) host ints] -> (B, T, C) float32 residual stream."""
        return table[self.xp.asarray(tokens)].astype(np.float32)

    def rope(self, x, rope_step):
        """Rotate-half RoPE. x (B, H, T, D) -> x's dtype (computed in float32)."""
        cos, sin = rope_step.cos_sin()  # (B, 1, T, D)
        half = x.shape[-1] // 2
        x32 = x.astype(np.float32)
        rot = self.xp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
        return (x32 * cos + rot * sin).astype(x.dtype)

    def qkv_heads(self, qkv, rope_step, H: int, Hkv: int, D: int, q_norm=None, k_norm=None, eps=0.0):
        """Fused projection output (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k, v (B, Hkv, T, D),
        with Qwen3's per-head q/k RMSNorm (if given) and RoPE applied to q and k."""
        B, T, _ = qkv.shape
        q = qkv[..., :H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        if q_norm is not None:
            q = self.rms_norm(q, q_norm, eps, qkv.dtype)
            k = self.rms_norm(k, k_norm, eps, qkv.dtype)
        return self.rope(q, rope_step), self.rope(k, rope_step), v

    def swiglu(self, gate_up):
        """silu(gate) * up for gate_up = [gate | up] along the last axis, in its dtype."""
        n = gate_up.shape[-1] // 2
        g = gate_up[..., :n].astype(np.float32)
        u = gate_up[..., n:].astype(np.float32)
        return (g / (1.0 + self.xp.exp(-g)) * u).astype(gate_up.dtype)

    def hadamard(self, x, signs, back: bool = False):
        """x (B, H, T, D) (any strides) turned by the signed, normalized Hadamard matrix R =
        diag(signs) H / sqrt(D) (D a power of two): x @ R, or x @ R.T when `back`, in x's dtype.
        Computed in float32 as the kernel does: the signs, log2(D) butterfly stages (pairs i,
        i + h for h = 1, 2, 4, ...: a + b, a - b), the scale; back applies the signs last."""
        xp, D = self.xp, x.shape[-1]
        t = x.astype(np.float32)
        if not back:
            t = t * signs
        h = 1
        while h < D:
            t = t.reshape(*x.shape[:-1], D // (2 * h), 2, h)
            a, b = t[..., 0, :], t[..., 1, :]
            t = xp.stack([a + b, a - b], axis=-2).reshape(x.shape)
            h *= 2
        t = t * np.float32(1.0 / np.sqrt(D))
        return (t * signs if back else t).astype(x.dtype)

    def hadamard_pair(self, k, v, signs):
        """(hadamard(k, signs), hadamard(v, signs)): a step's keys and values turned alike."""
        return self.hadamard(k, signs), self.hadamard(v, signs)

    def kv_append(self, k, v, dst_k, dst_v, info, info_dev):
        """Row b's first info[b, 3] tokens of k, v (B, H, T, D) into dst_k, dst_v (B, H, cap, D)
        at token info[b, 2]; info (B, 6) host ints, info_dev the same on the device (the CUDA
        kernel reads the offsets there, so a captured step writes where each replay says)."""
        for b, (off, n) in enumerate(info[:, 2:4].tolist()):
            dst_k[b, :, off:off + n] = k[b, :, :n]
            dst_v[b, :, off:off + n] = v[b, :, :n]

    def contiguous(self, x):
        """A C-contiguous copy of x (or x itself if it already is one)."""
        return self.xp.ascontiguousarray(x)

    def add_(self, residual, y):
        """residual += y, the float32 residual stream absorbing a branch output."""
        residual += y
        return residual


class CpuOps(ArrayOps):
    """NumPy ops whose forward passes run on the BLAS thread count chosen for each (cpu_threads)."""

    def __init__(self, threads: int | None = None):
        super().__init__(np)
        self.blas = BlasThreads(threads)

    def forward_pass(self, rows: int):
        return self.blas.forward(rows)
