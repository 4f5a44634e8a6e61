"""Load on a running `minikv serve` (or llama-server): N concurrent streaming clients send M
completion requests in all, on loopback only. Prints aggregate generated tokens/s, time to first
token and inter-token latency percentiles.

    python3 bench/serve_load.py --port 8080 -c 32 -m 128 --max-tokens 128 [--prompt-tokens 512]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np


async def one(session, url, body, ttft, itl, counts):
    t0 = time.perf_counter()
    last, n = None, 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if not json.loads(line[6:])["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if last is None:
                ttft.append(now - t0)
            else:
                itl.append(now - last)
            last, n = now, n + 1
    counts.append(n)


async def main(args) -> None:
    import aiohttp

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loopback only: --host 127.0.0.1")
    url = f"http://{args.host}:{args.port}/v1/completions"
    prompt = " ".join(["the"] * args.prompt_tokens)
    ttft, itl, counts = [], [], []
    queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait({"prompt": f"{i} {prompt}", "max_tokens": args.max_tokens, "temperature": 0,
                          "stream": True, "ignore_eos": True})

    async def worker(session):
        while not queue.empty():
            await one(session, url, queue.get_nowait(), ttft, itl, counts)

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.gather(*(worker(s) for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    pct = lambda a, q: 1e3 * float(np.percentile(a, q)) if a else float("nan")  # noqa: E731
    print(f"{args.clients} clients, {args.requests} requests, {sum(counts)} tokens in {wall:.1f} s: "
          f"{sum(counts) / wall:.1f} generated tokens/s")
    print(f"TTFT ms p50 {pct(ttft, 50):.1f} p90 {pct(ttft, 90):.1f} p99 {pct(ttft, 99):.1f}; "
          f"ITL ms p50 {pct(itl, 50):.2f} p90 {pct(itl, 90):.2f} p99 {pct(itl, 99):.2f}")


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
