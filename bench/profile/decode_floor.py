"""The floor of a one-launch split-K decode attention: what the fastest such kernel could reach.

    python3 bench/profile/decode_floor.py [--kv kivi:2 patternkv:2] [--batch 1 8] [--ctx 32768 65536 131072]

decode.cu splits each kv head's keys across thread blocks (one wave: grid (splits, Hkv, B)), and
the last block of a head to finish merges the splits' parts. The "floor" kernel here has that
shape and nothing else: each block reads its share of the same bytes (no arithmetic but an XOR),
writes a part of the attention's size (4 rows x 128 floats), counts itself with the same
acquire-release atomic, and the last block sums the parts into the output. No q, no scores, no
softmax: a real kernel of this design can only be slower. Timed as bench/kernels.py times the
attention (CUDA graph replay over layers whose bytes do not fit the L2 together), best over block
sizes, blocks per SM (1, 2, 4: more splits) and load depths, next to the 70% of copy bandwidth
target and the plain read (best grid, no merge).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import cold_buffers, cuda_backend, filled_cache, plain_read_time, replay_time, step_inputs  # noqa: E402

_FLOOR = r"""
extern "C" __global__ void __launch_bounds__(FLOOR_THREADS) split_floor(const uint4* __restrict__ p, long long per_head,
        float* __restrict__ part, __half* __restrict__ out, int* __restrict__ counters) {
    const int S = gridDim.x, s = blockIdx.x, tid = threadIdx.x;
    const long long hd = (long long)blockIdx.z * gridDim.y + blockIdx.y;  // the block's (b, kv head)
    const long long share = (per_head + S - 1) / S;
    const long long lo = hd * per_head + min(per_head, s * share), hi = hd * per_head + min(per_head, (s + 1) * share);
    unsigned a = 0u;
    for (long long i = lo + tid; i < hi; i += FLOOR_U * FLOOR_THREADS) {  // FLOOR_U loads in flight per thread
        uint4 x[FLOOR_U];
#pragma unroll
        for (int j = 0; j < FLOOR_U; ++j) x[j] = i + j * FLOOR_THREADS < hi ? __ldg(p + i + j * FLOOR_THREADS) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int j = 0; j < FLOOR_U; ++j) a ^= x[j].x ^ x[j].y ^ x[j].z ^ x[j].w;
    }
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) a ^= __shfl_xor_sync(0xffffffffu, a, x);
    __shared__ unsigned wx[FLOOR_THREADS / 32];
    __shared__ int last;
    if ((tid & 31) == 0) wx[tid >> 5] = a;
    __syncthreads();
    unsigned v = 0u;
    for (int w = 0; w < FLOOR_THREADS / 32; ++w) v ^= wx[w];
    float* mine = part + (hd * S + s) * 512;  // the split's part: 4 query rows x 128 channels
    for (int i = tid; i < 512; i += FLOOR_THREADS) mine[i] = (float)(v & 0xffu) + (float)i;
    __syncthreads();
    if (tid == 0) {
        int old;
        asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;" : "=r"(old) : "l"(counters + hd) : "memory");
        last = old == S - 1;
        if (last) counters[hd] = 0;
    }
    __syncthreads();
    if (last && tid < 128) {  // the merge: every split's float4 of this thread, 8 loads in flight
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int s0 = 0; s0 < S; s0 += 8) {
            float4 x[8];
#pragma unroll
            for (int j = 0; j < 8; ++j)
                x[j] = s0 + j < S ? __ldcg(reinterpret_cast<const float4*>(part + (hd * S + s0 + j) * 512) + tid)
                                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc.x += x[j].x, acc.y += x[j].y, acc.z += x[j].z, acc.w += x[j].w;
        }
        __half2* o = reinterpret_cast<__half2*>(out + hd * 512) + 2 * tid;
        o[0] = __floats2half2_rn(acc.x, acc.y), o[1] = __floats2half2_rn(acc.z, acc.w);
    }
}
"""


FLOOR_CONFIGS = ((256, 4), (256, 8), (512, 4), (512, 8), (1024, 4))  # (threads per block, loads in flight)


def floor_times(cp, nbytes: int, B: int, Hkv: int = 8) -> dict:
    """{(blocks per SM, threads per block, loads in flight per thread): seconds} of the floor kernel
    over nbytes: the keys of each of the B * Hkv heads split over blocks per SM x SMs / (B Hkv)
    blocks (decode.cu: one block of 256 threads per SM)."""
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    per_head = -(-nbytes // (16 * B * Hkv))  # 16-byte words
    bufs = cold_buffers(cp, per_head * B * Hkv * 16)
    out = cp.zeros(B * Hkv * 512, np.float16)
    counters = cp.zeros(B * Hkv, np.int32)
    times = {}
    for threads, u in FLOOR_CONFIGS:
        mod = cp.RawModule(code="#include <cuda_fp16.h>\n" + _FLOOR, options=(f"-DFLOOR_THREADS={threads}", f"-DFLOOR_U={u}"))
        kern = mod.get_function("split_floor")
        for per_sm in (1, 2, 4):
            if per_sm * threads > 2048:  # more than an SM holds: a second wave
                continue
            splits = max(1, per_sm * sms // (B * Hkv))
            part = cp.zeros(B * Hkv * splits * 512, np.float32)
            times[per_sm, threads, u] = replay_time(
                cp, bufs, lambda b: kern((splits, Hkv, B), (threads,), (b, np.int64(per_head), part, out, counters)))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", nargs="+", default=["kivi:2", "patternkv:2"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--ctx", nargs="+", type=int, default=[32768, 65536, 131072])
    args = ap.parse_args()
    be, cp, bw = cuda_backend()
    print("| kv | batch | context | MB read | 70% target (us) | plain read (us) | split-K floor (us) | floor, % of copy "
          "| floor's best (blocks per SM, threads, loads in flight) | floor, 1 block of 256 threads per SM (us) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for B in args.batch:
        for ctx in args.ctx:
            for spec in args.kv:
                q, _ = step_inputs(cp, B)
                nbytes = filled_cache(spec, B, ctx, be).nbytes() + q.nbytes * 2  # as kernels.py counts
                cp.get_default_memory_pool().free_all_blocks()
                times = floor_times(cp, nbytes, B)
                how = min(times, key=times.get)
                t, t256 = times[how], min(v for (n, th, _), v in times.items() if (n, th) == (1, 256))  # decode.cu's shape
                t_read = plain_read_time(cp, nbytes)
                gb = nbytes / 1e9  # bw is in GB/s
                print(f"| `{spec}` | {B} | {ctx} | {nbytes / 1e6:.1f} | {gb / (0.7 * bw) * 1e6:.1f} | "
                      f"{t_read * 1e6:.1f} | {t * 1e6:.1f} | {100 * gb / t / bw:.0f}% | {how} | "
                      f"{t256 * 1e6:.1f} |", flush=True)
                cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
