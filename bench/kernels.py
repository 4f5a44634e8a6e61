"""Decode attention speed against the memory roofline, and the prefill cost of quantizing.

    python3 bench/kernels.py [--ctx 4096 ... 131072] [--batch 1 8] [--kv fp16 kivi:2 ...]
                             [--prefill fp16 kivi:2 patternkv:2] [--breakdown patternkv:2]

For each (method, batch, context), a cache of Llama-3.1-8B's attention shape (32 query / 8 kv
heads, head_dim 128) is filled directly with random packed storage (speed does not depend on
the values), and one decode step's attention is timed: as minikv runs it ("step": CUDA events,
median of repeats, Python preparation included), and its GPU work alone ("kernel": CUDA graph
replay over enough layers that each reads its bytes from memory, not from the L2). Bytes = what
the step must read: the cache's stored bytes for its tokens plus q and the output. "Plain read"
is a kernel that only reads that many bytes (timed the same way): the most a single launch of
that size reaches on this GPU. Then the prefill of an 8K prompt through a random-weight
Llama-3.1-8B with each --prefill method: the extra time over the first is the cost of
quantizing (KMeans + packing); --breakdown splits it by function (each call synchronised).
"""
from __future__ import annotations

import argparse
import time

from common import cold_layers, cuda_backend, filled_cache, graph_time, llama8b_prompt, plain_read_time, step_inputs, timed


def attention_row(spec, B, ctx, backend, groups=None, warps=None, patterns=None, keys_per_pattern=None,
                  min_keys=None, trial=False):
    """(step seconds, kernel seconds, bytes) of one decode step's attention over ctx tokens (the
    kernel timed with its bytes read from memory, see cold_layers)."""
    cp = backend.xp
    layers = cold_layers(cp, filled_cache(spec, B, ctx, backend, patterns).nbytes())
    cp.get_default_memory_pool().free_all_blocks()
    cache = filled_cache(spec, B, ctx, backend, patterns, layers)
    if cache.fused is not None:
        cache.fused.groups, cache.fused.warps, cache.fused.trial = groups, warps, trial
        if keys_per_pattern is not None:
            cache.fused.keys_per_pattern = keys_per_pattern
        if min_keys is not None:
            cache.fused.min_keys = min_keys
    q, k = step_inputs(cp, B)

    attend = cache.attend  # attention only: storing (commit, flushes) is a separate step

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
    """{spec: seconds} of one prefill of T tokens through the random-weight Llama-3.1-8B, cache
    creation included (median of 3)."""
    from minikv.kv import make_cache

    cp = backend.xp
    model, ids = llama8b_prompt(backend, T)
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

    cp = backend.xp
    model, ids = llama8b_prompt(backend, T)
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
    ap.add_argument("--trial", action="store_true",
                    help="let decode.cu take the code widths it has on trial (3-bit: FusedAttention.trial)")
    ap.add_argument("--min-keys", type=int, default=None,
                    help="fewest keys per block when splitting a sequence (default: the runtime's)")
    args = ap.parse_args()
    be, cp, bw = cuda_backend()
    print("step: one decode step's attention as minikv runs it (Python preparation included); kernel: its "
          "GPU work alone (CUDA graph replay); GB/s and speed-ups from the kernel time")
    print("| kv | batch | context | step (us) | kernel (us) | MB read | GB/s | % of copy | x faster than fp16 "
          "| plain read (us) | % of plain read |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for B in args.batch:
        for ctx in args.ctx:
            base = None
            for spec in args.kv:
                t_step, t, nbytes = attention_row(spec, B, ctx, be, args.groups, args.warps, args.patterns,
                                                       args.keys_per_pattern, args.min_keys, args.trial)
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
        print("\nprefill of 8192 tokens, random-weight Llama-3.1-8B, batch 1:")
        for spec, t in times.items():
            over = 100 * (t / times[args.prefill[0]] - 1)
            print(f"  {spec:14} {t * 1e3:8.1f} ms  ({over:+.1f}% vs {args.prefill[0]})", flush=True)


if __name__ == "__main__":
    main()
