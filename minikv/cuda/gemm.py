"""Decode-step matmuls of 9-64 rows (a server's batch) in a form a CUDA graph can capture.

gemv.cu takes up to 8 rows; more go to cuBLAS, which CuPy's matmul does not let a stream capture
(cuBLAS may allocate its workspace mid-capture). Here cuBLAS's gemmEx runs on a handle of its own
with a fixed workspace (it then allocates nothing) and host scalars, on the current stream: the
same call eagerly and under capture, so a replayed step computes what an eager one does. It is
used only where `probe` finds that a captured call replays to the eager call's product; else
steps of more than 8 rows run eagerly, as before.
"""
from __future__ import annotations

import numpy as np

from .module import check

CAPTURE_ROWS = 64  # decode steps of up to this many rows may be captured with these matmuls
WORKSPACE = 32 << 20  # cuBLAS's recommendation for Hopper
_F16, _OP_N, _OP_T = 2, 0, 1  # CUDA_R_16F, CUBLAS_OP_N, CUBLAS_OP_T


class Gemm:
    def __init__(self, cp):
        from cupy_backends.cuda.libs import cublas

        self.cp, self.cublas = cp, cublas
        self.handle = cublas.create()
        self.workspace = cp.empty(WORKSPACE, np.uint8)
        cublas.setWorkspace(self.handle, self.workspace.data.ptr, WORKSPACE)
        cublas.setPointerMode(self.handle, getattr(cublas, "CUBLAS_POINTER_MODE_HOST", 0))
        self.compute = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)  # fp16 products summed in fp32, as CuPy's
        self.algo = getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1)
        self.one, self.zero = np.ones(1, np.float32), np.zeros(1, np.float32)  # host scalars: captured by value

    def __call__(self, x, w, out=None):
        """x (M, K) @ w (N, K).T -> (M, N), fp16, C-contiguous; out: where to write it (else new)."""
        M, K = check("gemm x", x, np.float16).shape
        N = check("gemm w", w, np.float16, (None, K)).shape[0]
        y = self.cp.empty((M, N), np.float16) if out is None else check("gemm out", out, np.float16, (M, N))
        cb = self.cublas
        cb.setStream(self.handle, self.cp.cuda.get_current_stream().ptr)
        # row-major y = x w^T is column-major y^T (N, M) = op_T(w as (K, N)) @ (x as (K, M))
        cb.gemmEx(self.handle, _OP_T, _OP_N, N, M, K, self.one.ctypes.data, w.data.ptr, _F16, K, x.data.ptr, _F16, K,
                  self.zero.ctypes.data, y.data.ptr, _F16, N, self.compute, self.algo)
        return y


def probe(cp) -> Gemm | None:
    """A Gemm if, on this device, one captured into a CUDA graph replays to its eager product
    (a decode step's shape, 32 rows); None where anything about that fails."""
    try:
        g = Gemm(cp)
        rng = np.random.default_rng(0)
        x = cp.asarray(rng.standard_normal((32, 512)).astype(np.float16))
        w = cp.asarray((rng.standard_normal((1024, 512)) * 0.05).astype(np.float16))
        want, got = g(x, w), cp.zeros((32, 1024), np.float16)
        cp.cuda.Device().synchronize()  # the capture stream does not wait for the default stream's work
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            g(x, w, got)
            stream.synchronize()
            got[...] = 0
            stream.begin_capture()
            try:
                g(x, w, got)
            finally:
                graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
        return g if bool(cp.array_equal(got, want)) and bool(cp.any(want != 0)) else None
    except Exception:  # no capturable cuBLAS here: steps of more than 8 rows stay eager
        return None
