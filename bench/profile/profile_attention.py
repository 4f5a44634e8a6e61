"""One decode-step attention launch to profile with Nsight Compute:

    ncu --set detailed -k regex:attend_decode --launch-skip 3 --launch-count 1 \
        python3 bench/profile/profile_attention.py kivi:2 8 131072      (kv spec, batch, context)

The cache is bench/kernels.py's (random storage, Llama-3.1-8B's attention shape); five steps run,
so --launch-skip 3 skips the warm-up launches.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import filled_cache, step_inputs  # noqa: E402
from minikv.backend import get_backend  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kv", help="kv spec, e.g. kivi:2")
    ap.add_argument("batch", type=int)
    ap.add_argument("ctx", type=int, help="context tokens")
    args = ap.parse_args()
    spec, B, ctx = args.kv, args.batch, args.ctx
    be = get_backend("cuda")
    cp = be.xp
    cache = filled_cache(spec, B, ctx, be)
    q, k = step_inputs(cp, B)
    attend = cache.attend  # attention only: no commit
    for _ in range(5):
        cache.begin_step([1] * B)
        cache.update(0, k, k)
        attend(0, q)
    cp.cuda.get_current_stream().synchronize()


if __name__ == "__main__":
    main()
