"""Where a decode step's time goes, on minikv's own path (`minikv bench`'s loop).

    python3 bench/profile/step_profile.py --shape smollm2-135m llama-3.1-8b --kv fp16 kivi:2 [--depth 0]

Per shape and method, ms per step of:
  loop     bench's tg loop (what `minikv bench` times): the step feeding an id queued, the argmax
           of its logits queued with its copy to the host, then the previous id read
  serial   the same without the overlap: argmax, the id to the host, then the next step
  gpu      the step's captured graph replayed back to back: its GPU work alone
  plan     the host's step bookkeeping (begin_step, graph_key, end_step) with no GPU work
  launch   the host time of Stepper.decode (the graph launch returns before the GPU finishes)
  argmax   argmax of the logits and the id's copy to the host, after the GPU is idle
  greedy   the same through a session's Sampler (temperature 0), as `minikv generate` pays it
  sample   a session's Sampler at the default settings (top-k 40, top-p 0.95, min-p 0.05, temp 0.8)
loop - gpu is what the host still adds.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def per_step(fn, n) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def profile(shape, kv, depth, steps, be):
    from minikv.kv import make_cache
    from minikv.sampler import Sampler, SamplingParams
    from minikv.stepper import Stepper
    from minikv.synthetic import synthetic_model

    xp = be.xp
    model = synthetic_model(shape, be)
    cache = make_cache(kv, model.kv_geometry, 1, depth + 8 * steps + 64, be)
    st = Stepper(model, cache, 2048)
    rng = np.random.default_rng(0)
    if depth:
        st.feed(rng.integers(0, model.cfg.vocab_size, (1, depth)))
    tok = np.array([1])
    drawn = xp.argmax(st.decode(tok), axis=-1)

    def serial():  # the id crosses to the host before the next step is planned
        nonlocal tok
        tok = be.to_host(xp.argmax(st.decode(tok), axis=-1))

    readback = be.readback()
    ticket = readback.start(drawn)

    def loop():  # as `minikv bench` and generate: the next step queued before the id is read,
        nonlocal drawn, ticket  # whose copy was queued behind its own draw
        logits = st.decode(drawn)
        drawn = xp.argmax(logits, axis=-1)
        following = readback.start(drawn)
        readback.wait(ticket)
        ticket = following

    for _ in range(4):
        serial()  # captures, first flushes
        loop()
    r = {"loop": per_step(loop, steps), "serial": per_step(serial, steps)}
    cache.begin_step(1)  # the next step's key (a key exists only inside a step); replays rewrite its token
    key = cache.graph_key()
    graph = st.graphs.graphs[key][0] if st.graphs and key in st.graphs.graphs else None
    if graph is not None:
        e0, e1 = xp.cuda.Event(), xp.cuda.Event()
        e0.record(st.graphs.stream)
        for _ in range(steps):
            graph.launch(st.graphs.stream)
        e1.record(st.graphs.stream)
        e1.synchronize()
        r["gpu"] = xp.cuda.get_elapsed_time(e0, e1) / steps
    cache.end_step()

    def plan():  # a step begun and ended with nothing stored: the counts restored after it
        saved = {k: getattr(cache, k).copy() for k in ("lengths", "n_chunks") if hasattr(cache, k)}
        cache.begin_step(1)
        cache.graph_key()
        cache.end_step()
        for k, v in saved.items():
            setattr(cache, k, v)

    r["plan"] = per_step(plan, steps)
    be.synchronize()
    launch = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = st.decode(tok)
        launch.append(time.perf_counter() - t)
        be.synchronize()
    r["launch"] = float(np.median(launch)) * 1e3
    r["argmax"] = per_step(lambda: be.to_host(xp.argmax(logits, axis=-1)), steps)
    history = list(range(100))
    for name, params in (("greedy", SamplingParams(temperature=0)), ("sample", SamplingParams(seed=0))):
        sampler = Sampler(params, xp)
        r[name] = per_step(lambda: int(sampler(logits[0], history)), steps)
    return r


def main():
    from minikv.backend import get_backend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--kv", nargs="+", default=["fp16"])
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (no graph, no gpu column)")
    a = ap.parse_args()
    be = get_backend(a.device)
    print("| shape | kv | depth | loop | serial | gpu | loop - gpu | plan | launch | argmax | greedy | sample |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in a.shape:
        for kv in a.kv:
            r = profile(shape, kv, a.depth, a.steps, be)
            gap = r["loop"] - r["gpu"] if "gpu" in r else float("nan")
            print(f"| {shape} | {kv} | {a.depth} | {r['loop']:.3f} | {r['serial']:.3f} | {r.get('gpu', float('nan')):.3f} | {gap:.3f} | "
                  f"{r['plan']:.3f} | {r['launch']:.3f} | {r['argmax']:.3f} | {r['greedy']:.3f} | {r['sample']:.3f} |", flush=True)
    print("ms per decode step, batch 1")


if __name__ == "__main__":
    main()
