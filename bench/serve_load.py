"""Load on a running `minikv serve` (or llama-server): N concurrent streaming clients send M
completion requests in all, on loopback only. Prints generated tokens/s over the whole run and
over the window where every stream decodes at once (with -m equal to -c: the steady decode
throughput of N streams), time to first token and inter-token latency percentiles.

    python3 bench/serve_load.py --port 8080 -c 32 -m 32 --max-tokens 256 [--prompt-tokens 7680]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np


async def one(session, url, body, runs):
    """One streamed request: its start, the arrival time of each text chunk, its completion tokens."""
    t0, times, tokens = time.perf_counter(), [], 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    runs.append((t0, times, tokens or len(times)))  # a server without usage in its stream: chunks


def report(runs, wall, clients) -> str:
    """Throughput over the whole run and over the window where every stream decodes (from the
    last first token to the first last token), TTFT and inter-token latency percentiles."""
    pct = lambda a, q: 1e3 * float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    total = sum(n for _, _, n in runs)
    ttft = [ts[0] - t0 for t0, ts, _ in runs if ts]
    itl = np.concatenate([np.diff(ts) for _, ts, _ in runs if len(ts) > 1] or [np.zeros(0)])
    lo, hi = max(ts[0] for _, ts, _ in runs if ts), min(ts[-1] for _, ts, _ in runs if ts)
    window = sum(sum(lo <= t <= hi for t in ts) for _, ts, _ in runs)
    steady = f"{window / (hi - lo):.1f} t/s with all {clients} streams decoding" if hi > lo else "no common window"
    return (f"{clients} clients, {len(runs)} requests, {total} tokens in {wall:.1f} s: {total / wall:.1f} generated "
            f"tokens/s overall; {steady}\n"
            f"TTFT ms p50 {pct(ttft, 50):.1f} p90 {pct(ttft, 90):.1f} p99 {pct(ttft, 99):.1f}; "
            f"ITL ms p50 {pct(itl, 50):.2f} p90 {pct(itl, 90):.2f} p99 {pct(itl, 99):.2f}")


async def main(args) -> None:
    import aiohttp

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loopback only: --host 127.0.0.1")
    url = f"http://{args.host}:{args.port}/v1/completions"
    prompt = " ".join(["the"] * args.prompt_tokens)
    runs = []
    queue = asyncio.Queue()
    for i in range(args.requests):  # prompts differ from their first token: no request reuses another's prefix
        queue.put_nowait({"prompt": f"{i} {prompt}", "max_tokens": args.max_tokens, "temperature": 0,
                          "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})

    failed = []

    async def worker(session):
        while not queue.empty():
            try:
                await one(session, url, queue.get_nowait(), runs)
            except (asyncio.TimeoutError, aiohttp.ClientError) as e:  # reported, not raised: the rest still counts
                failed.append(type(e).__name__)

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.gather(*(worker(s) for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    if failed:
        print(f"{len(failed)} of {args.requests} requests failed ({', '.join(sorted(set(failed)))}; "
              f"--timeout {args.timeout:g} s per request)")
    print(report(runs, wall, args.clients) if runs else "no request completed")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-c", "--clients", type=int, default=8)
    p.add_argument("-m", "--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64, help="about this many tokens of filler prompt")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
    asyncio.run(main(p.parse_args()))
    sys.exit(0)
