"""Decode and prefill speed of random-weight models of real shapes, with the roofline.

    python3 bench/decode.py --model llama-3.2-1b --ctx 1024 4096 --kv fp16 [--matmul gemv cublas]

Prints, per (model, kv, context): prefill tokens/s, decode ms/token, and achieved GB/s =
(weight bytes + KV bytes read per token) / time per token, next to the device copy bandwidth
measured in the same run. Decode time includes the per-token host round trip a session makes.
Runs on the CPU too (--device cpu), without the roofline.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import copy_bandwidth
from minikv.backend import get_backend
from minikv.bench import weight_bytes_read
from minikv.kv import make_cache
from minikv.synthetic import SHAPES, synthetic_model


def run(model, kv, ctx, batch, steps, backend):
    cache = make_cache(kv, model.kv_geometry, batch, ctx + steps + 4, backend)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.cfg.vocab_size, size=(batch, ctx))
    backend.synchronize()
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    backend.synchronize()
    t_prefill = time.perf_counter() - t0
    tok = backend.xp.argmax(logits, axis=-1)
    for _ in range(3):  # warm-up
        logits = model.forward(backend.to_host(tok)[:, None], cache)
        tok = backend.xp.argmax(logits, axis=-1)
    backend.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model.forward(backend.to_host(tok)[:, None], cache)  # the per-token transfer a session does
        tok = backend.xp.argmax(logits, axis=-1)
    backend.synchronize()
    per_tok = (time.perf_counter() - t0) / steps
    kv_read = cache.nbytes()  # bytes the cache holds ~ bytes one decode step reads
    return batch * ctx / t_prefill, per_tok, kv_read


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama-3.2-1b"], choices=sorted(SHAPES))
    ap.add_argument("--kv", nargs="+", default=["fp16"])
    ap.add_argument("--ctx", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--matmul", nargs="+", default=["gemv"], choices=["gemv", "cublas"],
                    help="decode matmuls through gemv.cu (as minikv runs) or all through cuBLAS, to compare")
    args = ap.parse_args()
    backend = get_backend(args.device)
    bw = copy_bandwidth(backend.xp) if backend.is_gpu else float("nan")
    print(f"device {backend.name}, copy bandwidth {bw:.0f} GB/s")
    print(f"{'model':14} {'kv':12} {'matmul':6} {'batch':>5} {'ctx':>7} {'prefill tok/s':>13} {'decode ms/tok':>13} "
          f"{'weights GB':>10} {'KV GB':>7} {'GB/s':>7} {'% copy':>6}")
    if backend.is_gpu:
        from minikv.cuda import ops as cuda_ops

        gemv_rows = cuda_ops.GEMV_ROWS
    for name in args.model:
        model = synthetic_model(name, backend)
        wb = weight_bytes_read(model)
        for kv in args.kv:
            for batch in args.batch:
                for ctx in args.ctx:
                    for mm in args.matmul:
                        if backend.is_gpu:
                            cuda_ops.GEMV_ROWS = 0 if mm == "cublas" else gemv_rows
                        pf, dt, kvb = run(model, kv, ctx, batch, args.steps, backend)
                        gbs = (wb + kvb) / dt / 1e9
                        print(f"{name:14} {kv:12} {mm:6} {batch:5d} {ctx:7d} {pf:13.0f} {dt * 1e3:13.2f} "
                              f"{wb / 1e9:10.2f} {kvb / 1e9:7.3f} {gbs:7.0f} {100 * gbs / bw:6.1f}")
        del model


if __name__ == "__main__":
    main()
