"""Can a decode step of more than 8 rows (a server's batch) be a CUDA graph? Its matmuls then go to
cuBLAS, which session 17 found CuPy would not capture. This probes, on the GPU, each way of
capturing one fp16 GEMM of a decode step's shape (rows x 4096 @ 4096 x 14336) and replaying it:

  matmul        cupy.matmul under stream capture, as it is
  workspace     the same after the handle is given a fixed workspace (cublasSetWorkspace: cuBLAS
                then allocates nothing while captured)
  gemmex        cuBLAS gemmEx through cupy_backends' thin wrapper, workspace fixed, host scalars

and prints, for each, whether the capture worked, whether the replay equals the eager result,
and the replay's time against the eager call's.

    python3 bench/profile/cublas_capture.py [--rows 32]
"""
from __future__ import annotations

import argparse
import traceback

import numpy as np


def timed(cp, fn, n=50) -> float:
    fn()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    e1.synchronize()
    return cp.cuda.get_elapsed_time(e0, e1) / n * 1e3  # us


def capture(cp, stream, fn):
    with stream:
        fn()  # warm: anything lazily set up happens outside the capture
        stream.synchronize()
        stream.begin_capture()
        try:
            out = fn()
        finally:
            graph = stream.end_capture()
    return graph, out


def main():
    import cupy as cp
    from cupy_backends.cuda.libs import cublas

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    M, K, N = args.rows, 4096, 14336
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    w = (rng.standard_normal((K, N), dtype=np.float32) * 0.02).astype(np.float16)
    want = x @ w
    stream = cp.cuda.Stream(non_blocking=True)
    handle = cp.cuda.device.get_cublas_handle()
    ws = cp.empty(32 << 20, np.uint8)  # cuBLAS's recommended 32 MiB on Hopper
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    out = cp.empty((M, N), np.float16)

    f16, op_n = 2, 0  # CUDA_R_16F, CUBLAS_OP_N
    compute, algo = getattr(cublas, "CUBLAS_COMPUTE_32F", 68), getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1)

    def gemmex():  # row-major x @ w as column-major: C^T (N, M) = W^T (N, K) @ X^T (K, M)
        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, getattr(cublas, "CUBLAS_POINTER_MODE_HOST", 0))
        cublas.gemmEx(handle, op_n, op_n, N, M, K, one.ctypes.data, w.data.ptr, f16, N, x.data.ptr, f16, K,
                      zero.ctypes.data, out.data.ptr, f16, N, compute, algo)
        return out

    ways = [("matmul", lambda: x @ w, False), ("workspace", lambda: x @ w, True), ("gemmex", gemmex, True)]
    print(f"GEMM ({M} x {K}) @ ({K} x {N}) fp16; eager {timed(cp, lambda: x @ w):.1f} us")
    for name, fn, fixed in ways:
        try:
            if fixed:
                if not hasattr(cublas, "setWorkspace"):
                    print(f"{name}: this CuPy has no cublas.setWorkspace")
                    continue
                cublas.setWorkspace(handle, ws.data.ptr, ws.nbytes)
            graph, got = capture(cp, stream, fn)
            with stream:
                got[...] = 0
                graph.launch(stream)
                stream.synchronize()
            err = float(cp.abs(got.astype(np.float32) - want.astype(np.float32)).max())
            t = timed(cp, lambda: graph.launch(cp.cuda.get_current_stream()))
            print(f"{name}: captured; replay max |diff| vs eager {err:.3g}; replay {t:.1f} us")
        except Exception as e:  # the probe's answer, not a failure of the script
            print(f"{name}: {type(e).__name__}: {e}".splitlines()[0])
            traceback.print_exc(limit=2)


if __name__ == "__main__":
    main()
