"""Decode-step matmuls: gemv.cu against cuBLAS (CuPy matmul) on the weight shapes of real models.

    python3 bench/gemv.py [--model smollm2-135m llama-3.2-1b llama-3.1-8b] [--rows 1 8]

For each weight (N, K) and row count M: the GPU time per call (gemv: 20 calls captured in a CUDA
graph, replayed; medians of 7 runs; cuBLAS cannot be captured through CuPy, so it is timed as 20 calls back to back,
which includes any host time the GPU waits for), the GB/s of reading W once, and the host time
per call of each (what an eager decode step pays). Weights rotate over enough copies that each
call reads W from memory, not from the L2.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import device_name, timed


def weights(name):
    from minikv.synthetic import SHAPES

    C, I, _, H, Hkv, D, V, _ = SHAPES[name]
    return {"qkv": ((H + 2 * Hkv) * D, C), "o": (C, H * D), "gate_up": (2 * I, C), "down": (C, I), "lm_head": (V, C)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args()
    import cupy as cp

    from minikv.cuda.ops import CudaOps

    ops, n = CudaOps(cp), 20
    print(device_name(cp))
    print("| model | weight | N x K | rows | gemv GPU (us) | gemv GB/s | cuBLAS back to back (us) | cuBLAS GB/s "
          "| host per call: gemv / cuBLAS (us) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.model:
        for wname, (N, K) in weights(name).items():
            copies = max(2, -(-200 << 20) // (N * K * 2))  # > 2x the L2, so each call reads from memory
            ws = [cp.random.standard_normal((N, K), dtype=np.float32).astype(np.float16) * 0.01 for _ in range(copies)]
            for M in args.rows:
                x = cp.random.standard_normal((M, K), dtype=np.float32).astype(np.float16)
                s = cp.cuda.Stream(non_blocking=True)
                with s:
                    for w in ws[:2]:
                        ops.gemv(x, w), x @ w.T
                    s.begin_capture()
                    for i in range(n):
                        ops.gemv(x, ws[i % copies])
                    g = s.end_capture()
                    t_gemv = timed(cp, lambda: g.launch(s), 7) * 1e6 / n
                    h0 = time.perf_counter()
                    for i in range(n):
                        ops.gemv(x, ws[i % copies])
                    h1 = time.perf_counter()
                    for i in range(n):
                        cp.matmul(x, ws[i % copies].T)
                    h2 = time.perf_counter()
                    t_blas = timed(cp, lambda: [cp.matmul(x, ws[i % copies].T) for i in range(n)], 7) * 1e6 / n
                    s.synchronize()
                gb = N * K * 2 / 1e3
                print(f"| {name} | {wname} | {N} x {K} | {M} | {t_gemv:.1f} | {gb / t_gemv:.0f} | {t_blas:.1f} | "
                      f"{gb / t_blas:.0f} | {(h1 - h0) / n * 1e6:.1f} / {(h2 - h1) / n * 1e6:.1f} |", flush=True)
            ws = None  # frees this weight's copies before the next are made


if __name__ == "__main__":
    main()
