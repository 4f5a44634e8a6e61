"""The model's hot ops as CUDA kernels (kernels_cu/ops.cu); ArrayOps is their oracle and
the fallback for layouts the kernels do not take (e.g. Qwen3's per-head q/k norm)."""
from __future__ import annotations

import numpy as np

from ..ops import ArrayOps
from .gemm import CAPTURE_ROWS, probe as probe_gemm
from .module import check, f32, i32, kernel

_THREADS = 256
GEMV_ROWS = 8  # matmuls of at most this many rows (a decode step's tokens) run gemv.cu, more go to cuBLAS


def _gemv_w_rows(M: int) -> int:
    """Rows of W per warp of gemv.cu for M rows of x: more x rows reuse each W row more (H100,
    bench/gemv.py: 4 is slower than 2 at one row, faster at eight). The CI compile check builds
    the same pairs (gemv.cu's MINIKV_INSTANTIATE_ALL)."""
    return 4 if M >= 4 else 2


def _row_threads(C: int) -> int:
    """Threads for one row of C values: about two values each, whole warps, at most 1024."""
    return min(1024, max(32, (C // 2 + 31) // 32 * 32))


class CudaOps(ArrayOps):
    def __init__(self, cp):
        super().__init__(cp)
        self._k = {n: kernel("ops", n) for n in ("rms_norm", "add_rms_norm", "rope_qkv", "swiglu", "embed", "gather_rows", "kv_append",
                                                  "hadamard_f16")}
        self._gemv: dict = {}  # rows -> gemv<rows>, compiled on first use
        self.gemm = probe_gemm(cp)  # 9-64 rows through cuBLAS as a graph can capture it, or None
        self.graph_rows = CAPTURE_ROWS if self.gemm is not None else GEMV_ROWS

    def linear(self, x, w, b=None):
        K = x.shape[-1]
        M = x.size // K if K else 0
        if (not 1 <= M <= self.graph_rows or K % 8 or x.dtype != np.float16 or w.dtype != np.float16
                or not x.flags.c_contiguous or not w.flags.c_contiguous or x.data.ptr % 16 or w.data.ptr % 16
                or (b is not None and (b.dtype != np.float16 or not b.flags.c_contiguous))):
            return super().linear(x, w, b)
        if M > GEMV_ROWS:  # a server's batch: cuBLAS, as a captured step can run it
            y = self.gemm(x.reshape(M, K), w)
            return (y if b is None else y + b).reshape(*x.shape[:-1], w.shape[0])
        return self.gemv(x.reshape(M, K), w, b).reshape(*x.shape[:-1], w.shape[0])

    def gemv(self, x, w, b=None):
        """x (M, K) @ w (N, K).T (+ b) for M <= GEMV_ROWS rows: fp16, K a multiple of 8, rows
        16-byte aligned. Rounds as ArrayOps.linear: the product to fp16, then the bias added."""
        M, K = x.shape
        check("gemv x", x, np.float16)
        check("gemv w", w, np.float16, (None, K))
        if not 1 <= M <= GEMV_ROWS or K % 8 or x.data.ptr % 16 or w.data.ptr % 16:
            raise ValueError(f"gemv: needs 1..{GEMV_ROWS} rows, K a multiple of 8 and 16-byte aligned rows, "
                             f"got x {x.shape}, w {w.shape}")
        N = w.shape[0]
        if b is not None:
            check("gemv bias", b, np.float16, (N,))
        R = _gemv_w_rows(M)
        if M not in self._gemv:
            self._gemv[M] = kernel("gemv", f"gemv<{M}, {R}>")
        y = self.xp.empty((M, N), np.float16)
        rows_per_block = 8 * R  # 8 warps
        self._gemv[M](((N + rows_per_block - 1) // rows_per_block,), (_THREADS,),
                      (x, w, b if b is not None else np.uint64(0), y, i32(N), i32(K)))
        return y

    def rms_norm(self, x, w, eps, out_dtype):
        if x.dtype != np.float32 or not x.flags.c_contiguous or np.dtype(out_dtype) != np.float16:
            return super().rms_norm(x, w, eps, out_dtype)
        C = x.shape[-1]
        check("rms_norm w", w, np.float16, (C,))
        h = self.xp.empty(x.shape, dtype=np.float16)
        rows = x.size // C
        self._k["rms_norm"]((rows,), (_row_threads(C),), (x, w, h, i32(C), f32(eps)))
        return h

    def add_rms_norm(self, x, y, w, eps, out_dtype):
        if (np.dtype(out_dtype) != np.float16 or y.dtype != np.float16 or x.dtype != np.float32
                or not x.flags.c_contiguous):
            return super().add_rms_norm(x, y, w, eps, out_dtype)
        C = x.shape[-1]
        y = self.xp.ascontiguousarray(y)
        check("add_rms_norm y", y, np.float16, x.shape)
        check("add_rms_norm w", w, np.float16, (C,))
        h = self.xp.empty(x.shape, dtype=np.float16)
        self._k["add_rms_norm"]((x.size // C,), (_row_threads(C),), (x, y, w, h, i32(C), f32(eps)))
        return h

    def embed(self, table, tokens):
        if table.dtype != np.float16:
            return super().embed(table, tokens)
        check("embed table", table, np.float16)
        tok = self.xp.ascontiguousarray(self.xp.asarray(tokens), dtype=np.int64)  # host ids, or the device's
        B, T = tok.shape
        C = table.shape[1]
        x = self.xp.empty((B, T, C), dtype=np.float32)
        self._k["embed"]((B * T,), (_row_threads(C),), (table, tok, x, i32(C)))
        return x

    def qkv_heads(self, qkv, rope_step, H, Hkv, D, q_norm=None, k_norm=None, eps=0.0):
        if q_norm is not None or qkv.dtype != np.float16 or not qkv.flags.c_contiguous or D % 2:
            return super().qkv_heads(qkv, rope_step, H, Hkv, D, q_norm, k_norm, eps)
        B, T, W = qkv.shape
        check("qkv", qkv, np.float16, (B, T, (H + 2 * Hkv) * D))
        pos = check("rope positions", rope_step.device_positions(), np.int32, (B, T))
        check("rope inv_freq", rope_step.inv_freq, np.float32, (D // 2,))
        n = B * T * (H + Hkv) * (D // 2)
        self._k["rope_qkv"](((n + _THREADS - 1) // _THREADS,), (_THREADS,),
                            (qkv, pos, rope_step.inv_freq, i32(B * T), i32(H + Hkv), i32(H + 2 * Hkv), i32(D)))
        q = qkv[..., :H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        return q, k, v

    def swiglu(self, gate_up):
        if gate_up.dtype != np.float16 or not gate_up.flags.c_contiguous:
            return super().swiglu(gate_up)
        I2 = gate_up.shape[-1]
        out = self.xp.empty((*gate_up.shape[:-1], I2 // 2), dtype=np.float16)
        n = out.size
        self._k["swiglu"](((n + _THREADS - 1) // _THREADS,), (_THREADS,), (gate_up, out, i32(I2 // 2), np.int64(n)))
        return out

    def kv_append(self, k, v, dst_k, dst_v, info, info_dev):
        B, H, T, D = k.shape
        if (k.dtype != np.float16 or v.dtype != np.float16 or dst_k.dtype != np.float16 or v.shape != k.shape
                or D % 8 or k.strides[3] != 2 or v.strides[3] != 2 or any(st % 16 for st in k.strides[:3] + v.strides[:3])
                or k.data.ptr % 16 or v.data.ptr % 16 or not k.size):
            if self.xp.cuda.get_current_stream().is_capturing():  # host offsets would be baked into the graph
                raise RuntimeError(f"kv_append: no kernel for k {k.shape} {k.dtype} strides {k.strides} in a captured step")
            return super().kv_append(k, v, dst_k, dst_v, info, info_dev)
        cap = dst_k.shape[2]
        for name, a in (("kv_append dst k", dst_k), ("kv_append dst v", dst_v)):
            check(name, a, np.float16, (B, H, None, D))
        check("kv_append rowinfo", info_dev, np.int32, (B, 6))
        n = k.size // 8
        self._k["kv_append"](((n + _THREADS - 1) // _THREADS,), (_THREADS,),
                             (k, v, *(np.int64(st // 2) for st in k.strides[:3] + v.strides[:3]), i32(H), i32(T), i32(D // 8),
                              dst_k, dst_v, i32(cap), info_dev, np.int64(n)))

    def hadamard(self, x, signs, back: bool = False):
        """ArrayOps.hadamard for fp16 (B, H, T, D) views with a contiguous last dim; the result is a
        (B, H, T, D) view of a (B, T, H, D) buffer."""
        B, H, T, D = x.shape if x.ndim == 4 else (0, 0, 0, 0)
        if x.dtype != np.float16 or x.ndim != 4 or x.strides[3] != 2 or D > 256 or D & (D - 1) or D < 2 or not x.size:
            if self.xp.cuda.get_current_stream().is_capturing():
                raise RuntimeError(f"hadamard: no kernel for x {x.shape} {x.dtype} strides {x.strides} in a captured step")
            return super().hadamard(x, signs, back)
        check("hadamard signs", signs, np.float32, (D,))
        out = self.xp.empty((B, T, H, D), np.float16)
        self._k["hadamard_f16"]((B * H * T,), (D // 2,),
                                (x, *(np.int64(st // 2) for st in x.strides[:3]), i32(H), i32(T), i32(D), signs,
                                 f32(1.0 / np.sqrt(D)), i32(back), out))
        return out.transpose(0, 2, 1, 3)

    def hadamard_pair(self, k, v, signs):
        """One launch where k and v are adjacent heads of one buffer (the projection's k and v
        heads, as the model passes them), else two."""
        H = k.shape[1] if k.ndim == 4 else 0
        if (k.ndim != 4 or v.shape != k.shape or v.strides != k.strides or k.dtype != v.dtype
                or v.data.ptr != k.data.ptr + H * k.strides[1]):
            return super().hadamard_pair(k, v, signs)
        both = self.xp.ndarray((k.shape[0], 2 * H, *k.shape[2:]), k.dtype, k.data, k.strides)  # (B, 2H, T, D)
        out = self.hadamard(both, signs)
        return out[:, :H], out[:, H:]

    def contiguous(self, x):
        """gather_rows for a strided 4-D fp16 view with aligned contiguous rows (the k/v heads of
        the projection: CuPy's generic strided copy runs at about a fifth of the bandwidth)."""
        if (x.flags.c_contiguous or x.dtype != np.float16 or x.ndim != 4 or x.shape[3] % 8 or x.strides[3] != 2
                or x.data.ptr % 16 or any(st % 16 for st in x.strides[:3]) or not x.size):
            return super().contiguous(x)
        nb, H, T, D = x.shape
        out = self.xp.empty(x.shape, np.float16)
        n = x.size // 8
        self._k["gather_rows"](((n + _THREADS - 1) // _THREADS,), (_THREADS,),
                               (x, *(np.int64(st // 2) for st in x.strides[:3]), i32(H), i32(T), i32(D // 8), out,
                                np.int64(n)))
        return out
