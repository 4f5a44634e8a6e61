"""`minikv bench`: llama-bench's tests on minikv's own path. For each (KV method, batch, depth):
fill the cache with `depth` tokens, then time a prompt of `p` tokens (pp: prompt tokens/s, fed in
`ubatch` pieces as a session feeds it) and `n` decode steps of one token per sequence (tg:
generated tokens/s, the greedy choice crossing to the host each step while the step it feeds
runs, as a session's does: backend.Readback).

The roofline of a decode step is the bytes it must read, the weights (embedding rows aside) plus
the KV cache, at the device's copy bandwidth measured in the same run.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import numpy as np

from .kv import make_cache
from .stepper import Stepper

WARMUP = 2  # decode steps before tg's clock starts (first launches, first flush of a window)


@dataclass
class BenchRow:
    model: str
    kv: str
    batch: int
    depth: int
    test: str  # "pp512" | "tg128"
    tokens_per_s: float
    peak_mem: int  # bytes: the GPU memory pool's high-water mark, or the process's peak RSS
    roofline_pct: float | None  # tg on the GPU only

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes_read(model) -> int:
    """Bytes of weights one decode step reads (the embedding is gathered, not read, unless tied)."""
    seen, total = set(), 0
    for a in [model.embed, model.norm, model.lm_head] + [a for L in model.layers for a in vars(L).values()]:
        if a is not None and id(a) not in seen:
            seen.add(id(a))
            total += a.nbytes
    return total - model.embed.nbytes * (model.lm_head is not model.embed)


def copy_bandwidth(backend, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy GB/s (bytes read plus written), GPU only."""
    if not backend.is_gpu:
        return None
    cp = backend.xp
    a = cp.ones(nbytes // 4, dtype=np.float32)
    b = cp.empty_like(a)
    b[...] = a
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record()
    for _ in range(10):
        b[...] = a
    e1.record()
    e1.synchronize()
    return 2 * nbytes * 10 / (cp.cuda.get_elapsed_time(e0, e1) / 1e3) / 1e9


class _Peak:
    """The high-water mark of memory in use: CuPy's pool (sampled after each phase) or peak RSS."""

    def __init__(self, backend):
        self.backend, self.peak = backend, 0
        if backend.is_gpu:
            backend.xp.get_default_memory_pool().free_all_blocks()

    def sample(self) -> int:
        if self.backend.is_gpu:
            self.peak = max(self.peak, self.backend.xp.get_default_memory_pool().total_bytes())
        else:
            self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return self.peak


def run(model, name: str, kv: str, batch: int, depth: int, p: int, n: int, ubatch: int, bandwidth,
        seed: int = 0, graphs: bool = True) -> list[BenchRow]:
    be, xp = model.backend, model.xp
    rng = np.random.default_rng(seed)
    peak = _Peak(be)
    cache = make_cache(kv, model.kv_geometry, batch, depth + p + n + WARMUP + 1, be)
    stepper = Stepper(model, cache, ubatch, graphs)  # a session's own path
    prompt = rng.integers(0, model.cfg.vocab_size, (batch, p))
    if depth:  # also warms up what the prompt runs
        stepper.feed(rng.integers(0, model.cfg.vocab_size, (batch, depth)))
    else:  # as llama-bench, an untimed pass first (kernels compile and load, cuBLAS starts), here on a scratch cache
        Stepper(model, make_cache(kv, model.kv_geometry, batch, p + 1, be), ubatch, False).feed(prompt)
    rows = []
    be.synchronize()
    t = time.perf_counter()
    logits = stepper.feed(prompt)
    be.synchronize()
    rows.append(BenchRow(name, kv, batch, depth, f"pp{p}", batch * p / (time.perf_counter() - t), peak.sample(), None))
    readback = be.readback()
    tokens = xp.argmax(logits, axis=-1)
    ticket = readback.start(tokens)
    for i in range(WARMUP + n):  # one greedy token per sequence, as generate runs it: the step feeding
        if i == WARMUP:          # an id is queued first, then the id (copied behind its draw) is read
            t = time.perf_counter()
        logits = stepper.decode(tokens)
        tokens = xp.argmax(logits, axis=-1)
        following = readback.start(tokens)
        readback.wait(ticket)
        ticket = following
    readback.wait(ticket)
    rate = n / (time.perf_counter() - t)
    roof = None
    if bandwidth:
        roof = 100 * (weight_bytes_read(model) + cache.nbytes()) * rate / (bandwidth * 1e9)
    rows.append(BenchRow(name, kv, batch, depth, f"tg{n}", batch * rate, peak.sample(), roof))
    del stepper, cache
    return rows


def markdown(rows: list[BenchRow], bandwidth) -> str:
    head = ("| model | kv | batch | depth | test | t/s | peak mem | % roofline |\n"
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    body = [f"| {r.model} | {r.kv} | {r.batch} | {r.depth} | {r.test} | {r.tokens_per_s:.2f} | "
            f"{r.peak_mem / 2**30:.2f} GiB | {'' if r.roofline_pct is None else f'{r.roofline_pct:.0f}%'} |"
            for r in rows]
    note = (f"\nroofline: a decode step's weight and KV bytes read at the copy bandwidth, {bandwidth:.0f} GB/s "
            "(read + write) measured now" if bandwidth else "")
    return "\n".join([head, *body]) + note
