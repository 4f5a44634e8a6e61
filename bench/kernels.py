"""Fused attention speed against the memory roofline, and the prefill cost of quantizing.

    python bench/kernels.py [--ctx 4096 ... 131072] [--batch 1 8] [--kv fp16 kivi:2 ...]

For each (method, batch, context), a cache of Llama-3.1-8B's attention shape (32 query / 8 kv
heads, head_dim 128) is filled directly with random packed storage (speed does not depend on
the values), and one decode step's attention is timed: as minikv runs it (CUDA events, median
of repeats), and its GPU work alone (CUDA graph replay over enough layers that each reads its
bytes from memory, not from the L2). Bytes = what the step must read: the cache's stored bytes
for its tokens plus q and the output. "Plain read" is a kernel that only reads that many bytes
(timed the same way): the most a single launch of that size can reach on this GPU. Then the prefill of an 8K prompt through a random-weight Llama-3.1-8B with
each KV method: the extra time over fp16 is the cost of KMeans + packing.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def copy_bandwidth(cp, nbytes=2 << 30) -> float:
    a = cp.ones(nbytes // 4, dtype=np.float32)
    b = cp.empty_like(a)
    return 2 * nbytes / timed(cp, lambda: b.__setitem__(Ellipsis, a), 10) / 1e9


_READ = r"""
extern "C" __global__ void read_bytes(const uint4* __restrict__ p, long long n, unsigned* out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    uint4 a = make_uint4(0u, 0u, 0u, 0u);
    for (; i + 3 * stride < n; i += 4 * stride) {  // four independent loads in flight per thread
        const uint4 x = __ldg(p + i), y = __ldg(p + i + stride), z = __ldg(p + i + 2 * stride), w = __ldg(p + i + 3 * stride);
        a.x ^= x.x ^ y.x ^ z.x ^ w.x, a.y ^= x.y ^ y.y ^ z.y ^ w.y, a.z ^= x.z ^ y.z ^ z.z ^ w.z, a.w ^= x.w ^ y.w ^ z.w ^ w.w;
    }
    for (; i < n; i += stride) {
        const uint4 x = __ldg(p + i);
        a.x ^= x.x, a.y ^= x.y, a.z ^= x.z, a.w ^= x.w;
    }
    if ((a.x ^ a.y ^ a.z ^ a.w) == 0x9e3779b9u) out[0] = 1u;  // keeps the loads
}
"""


def plain_read_time(cp, nbytes) -> float:
    """Seconds of the fastest single launch that reads nbytes (best of a few grid sizes), buffers
    rotated as in cold_layers so the bytes come from memory."""
    kernel = cp.RawKernel(_READ, "read_bytes")
    bufs = cold_buffers(cp, nbytes)
    n = bufs[0].size // 4
    out = cp.zeros(1, dtype=np.uint32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    return min(replay_time(cp, bufs, lambda b: kernel((blocks,), (256,), (b, np.int64(n), out)))
               for blocks in (sms, 2 * sms, 4 * sms, 8 * sms))


def cold_buffers(cp, nbytes) -> list:
    """Buffers of nbytes (rounded up to 16), as many as cold_layers gives: read in turn, each
    comes from memory, not from the L2."""
    return [cp.zeros(-(-nbytes // 16) * 4, dtype=np.uint32) for _ in range(cold_layers(cp, nbytes))]


def replay_time(cp, bufs, launch) -> float:
    """Seconds per launch(buffer), launched over bufs in turn (graph_time)."""
    def run():
        for b in bufs:
            launch(b)
    return graph_time(cp, run) / len(bufs)


def timed(cp, fn, reps=20) -> float:
    """Median seconds of fn() over reps, after a warm-up, with CUDA events."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    return float(np.median(times))


def filled_cache(spec, B, ctx, backend, patterns=None, layers=1):
    """A cache of `layers` layers holding ctx tokens per sequence, its storage random (not zeros);
    patternkv with `patterns` patterns (None: as many as the cache would have)."""
    cp = backend.xp
    from minikv.kv import make_cache
    from minikv.kv.base import KVGeometry

    geom = KVGeometry(layers, 32, 8, 128, 128 ** -0.5)
    cache = make_cache(spec, geom, B, ctx + 8, backend)
    rng = cp.random.RandomState(0)
    for name, a in vars(cache).items():
        if isinstance(a, list) and a and isinstance(a[0], cp.ndarray):
            for x in a:
                if x.dtype == np.uint8:
                    x[...] = rng.randint(0, 256, size=x.shape, dtype=np.int32).astype(np.uint8)
                else:
                    x[...] = (rng.random_sample(x.shape) * 0.1 + 0.01).astype(x.dtype)
    cache.lengths[:] = ctx
    if hasattr(cache, "n_chunks"):
        cache.n_chunks[:] = (ctx - cache.S - 64) // cache.G  # leaves a partial window, as in use
        cache.lengths[:] = cache.S + cache.n_chunks * cache.G + 64
    if hasattr(cache, "kidx"):  # as many patterns as the cache would hold: m + one per chunk, to mmax
        m = patterns or min(cache.s["mmax"], cache.s["m"] + int(cache.n_chunks[0]))
        if m < 256:  # uint8 indexes: the random fill already spans 0..255
            for a in (*cache.kidx, *cache.vidx):
                a %= m
        cache.count[:] = m
    return cache


def graph_time(cp, fn, reps=50) -> float:
    """Seconds per call of fn's GPU work alone: fn captured once into a CUDA graph, the graph
    replayed back to back (no Python between launches), timed with CUDA events."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fn()  # warm: kernels compiled, the memory pool holds the buffers the capture reuses
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
        graph.launch(stream)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        for _ in range(reps):
            graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
    return cp.cuda.get_elapsed_time(e0, e1) / 1e3 / reps


def cold_layers(cp, nbytes) -> int:
    """Layers whose caches together are 4x the L2, at most 16: replaying attention over them in
    turn, as a model's decode step does, each layer's bytes come from memory, not from the L2
    where the previous replay left them (a 2-bit cache of 32K tokens, 19 MB, fits in the 50 MB L2)."""
    l2 = cp.cuda.Device().attributes["L2CacheSize"]
    return int(min(16, max(1, -(-4 * l2 // nbytes))))


def step_inputs(cp, B):
    """One decode step's q (B, 32, 1, 128) and new k (= v) (B, 8, 1, 128), fp16, fixed seeds: the
    shape every decode benchmark here uses (32 query / 8 kv heads, head_dim 128)."""
    q = cp.asarray(np.random.default_rng(0).normal(size=(B, 32, 1, 128)).astype(np.float16))
    k = cp.asarray(np.random.default_rng(1).normal(size=(B, 8, 1, 128)).astype(np.float16))
    return q, k


def attention_row(spec, B, ctx, backend, groups=None, warps=None, patterns=None, keys_per_pattern=None,
                  min_keys=None):
    """(step seconds, kernel seconds, bytes) of one decode step's attention over ctx tokens (the
    kernel timed with its bytes read from memory, see cold_layers)."""
    cp = backend.xp
    layers = cold_layers(cp, filled_cache(spec, B, ctx, backend, patterns).nbytes())
    cp.get_default_memory_pool().free_all_blocks()
    cache = filled_cache(spec, B, ctx, backend, patterns, layers)
    if cache.fused is not None:
        cache.fused.groups, cache.fused.warps = groups, warps
        if keys_per_pattern is not None:
            cache.fused.keys_per_pattern = keys_per_pattern
        if min_keys is not None:
            cache.fused.min_keys = min_keys
    q, k = step_inputs(cp, B)

    attend = getattr(cache, "_attend", cache.attend)  # attention only: no commit, no flush

    def step(n=1):  # the same decode step again and again: lengths never advance
        cache.begin_step([1] * B)
        for layer in range(n):
            cache.update(layer, k, k)
        return attend(0, q)

    t_step = timed(cp, step, 30)
    step(layers)
    t_kernel = graph_time(cp, lambda: [attend(layer, q) for layer in range(layers)]) / layers
    return t_step, t_kernel, cache.nbytes() // layers + q.nbytes * 2


def prefill_overhead(backend, specs, T=8192):
    from minikv.kv import make_cache
    from minikv.synthetic import synthetic_model

    cp = backend.xp
    model = synthetic_model("llama-3.1-8b", backend)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(1, T))
    out = {}
    for spec in specs:
        def run():
            model.forward(ids, make_cache(spec, model.kv_geometry, 1, T + 8, backend))
        out[spec] = timed(cp, run, 3)
    return out


def prefill_breakdown(backend, spec, T=8192):
    """Where a quantized prefill's extra time goes: inclusive seconds in the cache's commit, its
    flush and the quantizer functions it calls (each call synchronised, so the sum is slower
    than the plain prefill)."""
    from collections import defaultdict

    from minikv.kv import make_cache
    from minikv.synthetic import synthetic_model

    cp = backend.xp
    model = synthetic_model("llama-3.1-8b", backend)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(1, T))
    model.forward(ids, make_cache(spec, model.kv_geometry, 1, T + 8, backend))  # compile, warm up
    cache = make_cache(spec, model.kv_geometry, 1, T + 8, backend)
    spent, undo = defaultdict(float), []

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed_call(*a, **k):
            cp.cuda.Stream.null.synchronize()
            t = time.perf_counter()
            r = f(*a, **k)
            cp.cuda.Stream.null.synchronize()
            spent[label] += time.perf_counter() - t
            return r

        undo.append((obj, name, f))
        setattr(obj, name, timed_call)

    wrap(cache, "commit", "commit (all of the cache's storing)")
    wrap(cache, "end_step", "end_step (first flushes batched across layers)")
    wrap(cache, "_flush", "  _flush")
    if hasattr(cache, "_assign"):
        wrap(cache, "_assign", "    _assign")
    for mod in (getattr(cache, "q", None), getattr(cache, "pm", None)):
        for name in ("quantize_k_chunks", "quantize_v_tokens", "kmeans", "nearest_l2", "v_use_residual",
                     "pack_k_residuals", "pack_v_residuals"):
            if mod is not None and hasattr(mod, name):
                wrap(mod, name, f"      {name}" if name in ("kmeans", "nearest_l2") else f"    {name}")
    cp.cuda.Stream.null.synchronize()
    t = time.perf_counter()
    model.forward(ids, cache)
    cp.cuda.Stream.null.synchronize()
    total = time.perf_counter() - t
    for obj, name, f in undo:
        if name in vars(obj) and obj is not cache:
            setattr(obj, name, f)
    print(f"\n{spec} prefill breakdown, {T} tokens (synchronised calls), total {total * 1e3:.1f} ms:")
    for label, sec in spent.items():
        print(f"  {label:40} {sec * 1e3:8.1f} ms")


def main():
    from minikv.backend import get_backend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--kv", nargs="+", default=["fp16", "kivi:2", "patternkv:2", "nqkv:2", "kivi:4"])
    ap.add_argument("--prefill", nargs="*", default=["fp16", "kivi:2", "patternkv:2"])
    ap.add_argument("--breakdown", nargs="*", default=[], help="kv specs whose prefill cost to break down")
    ap.add_argument("--groups", type=int, default=None,
                    help="16-key groups a decode-kernel warp loads ahead (default: the runtime's choice)")
    ap.add_argument("--warps", type=int, default=None, choices=(4, 8),
                    help="warps per block of the decode kernel (default: the runtime's, 8 where shared memory allows)")
    ap.add_argument("--patterns", type=int, default=None,
                    help="patternkv's pattern count (default: m + one per chunk, up to mmax, as in use)")
    ap.add_argument("--keys-per-pattern", type=int, default=None,
                    help="fewest keys per block per table pattern when splitting patternkv (default: the runtime's)")
    ap.add_argument("--min-keys", type=int, default=None,
                    help="fewest keys per block when splitting a sequence (default: the runtime's)")
    args = ap.parse_args()
    be = get_backend("cuda")
    cp = be.xp
    bw = copy_bandwidth(cp)
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy bandwidth {bw:.0f} GB/s "
          f"(read + write, measured now)")
    print("step: one decode step's attention as minikv runs it (Python preparation included); kernel: its "
          "GPU work alone (CUDA graph replay); GB/s and speed-ups from the kernel time")
    print(f"| kv | batch | context | step (us) | kernel (us) | MB read | GB/s | % of copy | x faster than fp16 "
          f"| plain read (us) | % of plain read |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for B in args.batch:
        for ctx in args.ctx:
            base = None
            for spec in args.kv:
                t_step, t, nbytes = attention_row(spec, B, ctx, be, args.groups, args.warps, args.patterns,
                                                       args.keys_per_pattern, args.min_keys)
                gbs = nbytes / t / 1e9
                base = t if spec == "fp16" else base
                speed = f"{base / t:.2f}" if base else "-"
                t_read = plain_read_time(cp, nbytes)
                print(f"| `{spec}` | {B} | {ctx} | {t_step * 1e6:.1f} | {t * 1e6:.1f} | {nbytes / 1e6:.1f} | {gbs:.0f} | "
                      f"{100 * gbs / bw:.0f}% | {speed} | {t_read * 1e6:.1f} | {100 * t_read / t:.0f}% |", flush=True)
                cp.get_default_memory_pool().free_all_blocks()
    for spec in args.breakdown:
        prefill_breakdown(be, spec)
    if args.prefill:
        times = prefill_overhead(be, args.prefill)
        print(f"\nprefill of 8192 tokens, random-weight Llama-3.1-8B, batch 1:")
        for spec, t in times.items():
            over = 100 * (t / times[args.prefill[0]] - 1)
            print(f"  {spec:14} {t * 1e3:8.1f} ms  ({over:+.1f}% vs {args.prefill[0]})", flush=True)


if __name__ == "__main__":
    main()
