"""One 8K prefill of the random-weight Llama-3.1-8B between cudaProfilerStart/Stop, after two
warm-up prefills: run it under a profiler that honours the range, e.g.

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv python3 bench/prefill_profile.py patternkv:2

for every kernel's duration (bench/RESULTS.md, "Prefill: flush kernels ...")."""
from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kv", help="kv spec, e.g. fp16, kivi:2, patternkv:2")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    import cupy as cp

    from minikv.backend import get_backend
    from minikv.kv import make_cache
    from minikv.synthetic import synthetic_model

    be = get_backend("cuda")
    model = synthetic_model("llama-3.1-8b", be)
    T = args.tokens
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(1, T))
    for i in range(3):
        cache = make_cache(args.kv, model.kv_geometry, 1, T + 8, be)
        cp.cuda.Device().synchronize()
        if i == 2:
            cp.cuda.profiler.start()
        t = time.perf_counter()
        model.forward(ids, cache)
        cp.cuda.Device().synchronize()
        if i == 2:
            cp.cuda.profiler.stop()
        print(f"{args.kv}: prefill {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
