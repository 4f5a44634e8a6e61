"""One decode-step attention launch to profile with Nsight Compute:

    ncu --set detailed -k regex:attend_decode --launch-skip 3 --launch-count 1 python3 bench/profile_attention.py kivi:2 8 131072
"""
import sys

from kernels import filled_cache, step_inputs  # noqa: E402  (bench/ is on sys.path when run as a script)
from minikv.backend import get_backend


def main():
    spec, B, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    be = get_backend("cuda")
    cp = be.xp
    cache = filled_cache(spec, B, ctx, be)
    q, k = step_inputs(cp, B)
    attend = getattr(cache, "_attend", cache.attend)
    for _ in range(5):
        cache.begin_step([1] * B)
        cache.update(0, k, k)
        attend(0, q)
    cp.cuda.get_current_stream().synchronize()


if __name__ == "__main__":
    main()
