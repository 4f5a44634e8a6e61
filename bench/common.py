"""Helpers shared by the benchmarks (bench/) and the investigation tools (bench/profile/).

GPU timing: `timed` (CUDA events, median), `graph_time` and `replay_time` (a CUDA graph replayed
back to back: the GPU work alone), `cold_layers`/`cold_buffers` (enough copies that each read comes
from memory, not from the L2), `copy_bandwidth` and `plain_read_time` (the roofline references).
Decode attention: `filled_cache` and `step_inputs` (Llama-3.1-8B's attention shape). Models:
`llama8b_prompt` (the random-weight prefill), `perplexity_parser`/`load_model` (a real checkpoint).
Nothing here imports CuPy: the GPU helpers take the `cupy` module as `cp`.
"""
from __future__ import annotations

import argparse

import numpy as np


def device_name(cp) -> str:
    return cp.cuda.runtime.getDeviceProperties(0)["name"].decode()


def cuda_backend():
    """(backend, cupy, copy GB/s) for a GPU benchmark, after printing the device and its copy bandwidth."""
    from minikv.backend import get_backend

    be = get_backend("cuda")
    bw = copy_bandwidth(be.xp)
    print(f"{device_name(be.xp)}: copy bandwidth {bw:.0f} GB/s (read + write, measured now)")
    return be, be.xp, bw


def timed(cp, fn, reps=20) -> float:
    """Median seconds of fn() over reps, after a warm-up, with CUDA events on the current stream."""
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


def copy_bandwidth(cp, nbytes=2 << 30) -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written (so a kernel that only
    reads may exceed 100% of it)."""
    a = cp.ones(nbytes // 4, dtype=np.float32)
    b = cp.empty_like(a)
    return 2 * nbytes / timed(cp, lambda: b.__setitem__(Ellipsis, a), 10) / 1e9


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


def replay_time(cp, bufs, launch) -> float:
    """Seconds per launch(buffer), launched over bufs in turn (graph_time)."""
    def run():
        for b in bufs:
            launch(b)
    return graph_time(cp, run) / len(bufs)


def cold_layers(cp, nbytes) -> int:
    """Layers whose caches together are 4x the L2, at most 16: replaying attention over them in
    turn, as a model's decode step does, each layer's bytes come from memory, not from the L2
    where the previous replay left them (a 2-bit cache of 32K tokens, 19 MB, fits in the 50 MB L2)."""
    l2 = cp.cuda.Device().attributes["L2CacheSize"]
    return int(min(16, max(1, -(-4 * l2 // nbytes))))


def cold_buffers(cp, nbytes) -> list:
    """Buffers of nbytes (rounded up to 16), as many as cold_layers gives: read in turn, each
    comes from memory, not from the L2."""
    return [cp.zeros(-(-nbytes // 16) * 4, dtype=np.uint32) for _ in range(cold_layers(cp, nbytes))]


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


def filled_cache(spec, B, ctx, backend, patterns=None, layers=1):
    """A cache of Llama-3.1-8B's attention shape (32 query / 8 kv heads, head_dim 128) and `layers`
    layers holding ctx tokens per sequence, its storage random (not zeros; speed does not depend on
    the values); patternkv with `patterns` patterns (None: as many as the cache would have)."""
    cp = backend.xp
    from minikv.kv import make_cache
    from minikv.kv.base import KVGeometry

    geom = KVGeometry(layers, 32, 8, 128, 128 ** -0.5)
    cache = make_cache(spec, geom, B, ctx + 8, backend)
    rng = cp.random.RandomState(0)
    for a in vars(cache).values():
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


def step_inputs(cp, B):
    """One decode step's q (B, 32, 1, 128) and new k (= v) (B, 8, 1, 128), fp16, fixed seeds: the
    shape of filled_cache."""
    q = cp.asarray(np.random.default_rng(0).normal(size=(B, 32, 1, 128)).astype(np.float16))
    k = cp.asarray(np.random.default_rng(1).normal(size=(B, 8, 1, 128)).astype(np.float16))
    return q, k


def llama8b_prompt(backend, T=8192):
    """(random-weight Llama-3.1-8B, one prompt of T random token ids): the prefill benchmarks' input."""
    from minikv.synthetic import synthetic_model

    model = synthetic_model("llama-3.1-8b", backend)
    return model, np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(1, T))


def perplexity_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every perplexity script takes: MODEL_DIR (default: minikv's default model) and
    --max-tokens."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    return ap


def load_model(args):
    """(model, tokenizer) for args.model on args.device (and args.dtype, if given), loaded as the CLI
    loads them: every model flag the script does not take keeps the CLI's default."""
    from minikv.cli.args import add_model_args, load

    cli = argparse.ArgumentParser(add_help=False)
    add_model_args(cli)
    full = cli.parse_args([])
    for name, value in vars(args).items():
        setattr(full, name, value)
    model, tok, _ = load(full)
    return model, tok
