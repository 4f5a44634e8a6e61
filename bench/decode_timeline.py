"""Where one decode step's attention time goes, per thread block: an instrumented copy of
kernels_cu/decode.cu (the files themselves are not touched) records %globaltimer and clock64 at
the kernel's phase boundaries, and this prints the medians over 5 cold-L2 runs.

    python3 decode_timeline.py kivi:2,1,32768 patternkv:2,8,131072   (kv spec, batch, context)

Phases, in us from the first block's start: the prologue (q staged, per-block tables), the
warps' keys done, the block's warps merged and its part written, the arrival count (one
atomic), and the last block's merge of the splits. Needs a GPU; from bench/, like kernels.py."""
from __future__ import annotations

import re
import sys

import numpy as np

from kernels import filled_cache, step_inputs

GT = 'unsigned long long g_; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g_));'
ROW = 32  # u64 slots per block: 0 start (ns), 1 SM, 2 prologue, 3..10 warps' keys done, 11 part written,
# 12 arrival counted (cycles from the block's start), 13 arrival (ns), 14 merge done (ns), 15 its cycles,
# 16 valid, 17..19 the warp merge's steps (cycles)


def instrument(src: str) -> str:
    """decode.cu with the timing stores; fails loudly where an anchor moved."""
    def once(s, old, new):
        if s.count(old) != 1:
            raise SystemExit(f"decode_timeline: anchor not found once in decode.cu: {old.strip()[:60]!r}")
        return s.replace(old, new)
    s = once(src, "using namespace minikv;\n", "using namespace minikv;\n__device__ unsigned long long dbg_t[32 * 8192];\n")
    s = once(s, "extern __shared__ __align__(128) unsigned char smem[];\n",
             "extern __shared__ __align__(128) unsigned char smem[];\n"
             "    unsigned long long* dbg = dbg_t + 32 * (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));\n"
             "    const long long dbg_c0 = clock64();\n"
             "    if (threadIdx.x == 0) { " + GT + " dbg[0] = g_; unsigned s_; "
             "asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(s_)); dbg[1] = s_; dbg[16] = 1; }\n")
    s = once(s, "    __syncthreads();\n\n    Acc<D, PAT> acc;",
             "    __syncthreads();\n    if (threadIdx.x == 0) dbg[2] = clock64() - dbg_c0;\n\n    Acc<D, PAT> acc;")
    s = once(s, "    // Merge the block's warps.",
             "    if ((threadIdx.x & 31) == 0) dbg[3 + (threadIdx.x >> 5)] = clock64() - dbg_c0;\n    // Merge the block's warps.")
    stamp = "    if (tid == 0) dbg[{}] = clock64() - dbg_c0;\n"
    s = once(s, "    __syncthreads();\n    float f[2][DW]", "    __syncthreads();\n" + stamp.format(17) + "    float f[2][DW]")
    s = once(s, "    const long long BHT = ", stamp.format(18) + "    const long long BHT = ")
    s = once(s, "    for (int i = tid; i < nrows * D / 4; i += NT) {", stamp.format(19) + "    for (int i = tid; i < nrows * D / 4; i += NT) {")
    m = re.search(r"    if \(([^\n]*)\)\n        (merge_splits<[^;]*;)\n}", s)
    if not m:
        raise SystemExit("decode_timeline: the split merge at the end of attend_decode not found")
    return s[:m.start()] + (
        "    __syncthreads();\n" + stamp.format(11) +
        f"    const bool dbg_last = {m.group(1)};\n"
        "    if (tid == 0) { dbg[12] = clock64() - dbg_c0; " + GT + " dbg[13] = g_; }\n"
        f"    if (dbg_last) {{\n        {m.group(2)}\n        __syncthreads();\n"
        "        if (tid == 0) { " + GT + " dbg[14] = g_; dbg[15] = clock64() - dbg_c0; }\n    }\n}") + s[m.end():]


def phases(d: np.ndarray, warps: int) -> dict:
    """One run's phase times (us) from its (blocks, ROW) records."""
    t0 = d[:, 0].min()
    mg = d[d[:, 14] > 0]
    ghz = np.median((mg[:, 15] - mg[:, 12]) / np.maximum(mg[:, 14] - mg[:, 13], 1))  # SM clock, from the merges
    us = lambda c: c / ghz / 1e3  # noqa: E731
    start = (d[:, 0] - t0) / 1e3
    keys = start[:, None] + us(d[:, 3:3 + warps])
    return {
        "GHz": ghz, "start skew": start.max(), "prologue": np.median(us(d[:, 2])),
        "keys done (warp med)": np.median(keys), "keys done (block med)": np.median(keys.max(1)), "keys done (max)": keys.max(),
        "merge: factors": np.median(us(d[:, 18] - d[:, 17])), "merge: barrier": np.median(us(d[:, 19] - d[:, 18])),
        "part written (med)": np.median(start + us(d[:, 11])), "part written (max)": (start + us(d[:, 11])).max(),
        "arrival atomic": np.median(us(d[:, 12] - d[:, 11])), "last arrival": (start + us(d[:, 12])).max(),
        "split merge": np.median((mg[:, 14] - mg[:, 13]) / 1e3), "end": (mg[:, 14].max() - t0) / 1e3,
    }


def main():
    import cupy as cp

    from minikv.backend import get_backend
    from minikv.cuda import attention as A
    from minikv.cuda.module import source_dir

    be = get_backend("cuda")
    code = instrument(open(f"{source_dir()}/decode.cu", encoding="utf-8").read())
    flush = cp.ones(1 << 26, np.float32)  # 256 MB, read (not written) between runs: the L2 holds no dirty lines
    for cfg in sys.argv[1:] or ["kivi:2,1,32768"]:
        spec, B, ctx = cfg.split(",")[0], int(cfg.split(",")[1]), int(cfg.split(",")[2])
        cache = filled_cache(spec, B, ctx, be)
        q, k = step_inputs(cp, B)
        cache.begin_step([1] * B)
        cache.update(0, k, k)
        f = cache.fused
        cache._attend(0, q)  # picks and compiles the kernel: swap in the instrumented one
        key = next(x for x in f._kernels if x[3] == 0)
        ng = f.groups or A.decode_variant(key[0], key[1], key[2])
        name = f"attend_decode<128, {A.METHODS[key[0]]}, {key[1]}, {key[2]}, {ng}, {key[5]}>"
        mod = cp.RawModule(code=code, options=("-std=c++17", f"-I{source_dir()}"), name_expressions=(name,))
        fn = mod.get_function(name)
        fn.max_dynamic_shared_size_bytes = f._kernels[key].max_dynamic_shared_size_bytes
        f._kernels[key] = fn
        buf = cp.ndarray((ROW * 8192,), np.uint64, mod.get_global("dbg_t"))
        runs = []
        for _ in range(5):
            buf[:] = 0
            flush.sum()
            cache._attend(0, q)
            cp.cuda.get_current_stream().synchronize()
            d = buf.get().reshape(8192, ROW)
            runs.append(phases(d[d[:, 16] > 0].astype(np.float64), key[5]))
        n = int((buf.get().reshape(8192, ROW)[:, 16] > 0).sum())
        med = {x: float(np.median([r[x] for r in runs])) for x in runs[0]}
        print(f"{cfg}: {n} blocks, " + ", ".join(f"{x} {v:.2f}" for x, v in med.items()), flush=True)
        del cache
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
