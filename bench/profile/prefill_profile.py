"""One 8K prefill of the random-weight Llama-3.1-8B between cudaProfilerStart/Stop, after two
warm-up prefills: run it under a profiler that honours the range, e.g.

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 bench/profile/prefill_profile.py patternkv:2

for every kernel's duration (the input is bench/kernels.py's prefill benchmark)."""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import llama8b_prompt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kv", help="kv spec, e.g. fp16, kivi:2, patternkv:2")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    import cupy as cp

    from minikv.backend import get_backend
    from minikv.kv import make_cache

    be = get_backend("cuda")
    T = args.tokens
    model, ids = llama8b_prompt(be, T)
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
