"""CPU decode speed as a user gets it: `minikv generate` on SmolLM2-135M, tokens/s of generation.

Each configuration runs the CLI in a fresh process (`--json` timings), on an idle machine and
with one or two cores kept busy by other processes (a browser, a build, a test run: what a
laptop or a 2-core VM usually has), so thread oversubscription shows. Configurations:
  default     minikv as installed, no flags
  OPENBLAS_NUM_THREADS=1   one BLAS thread for everything
  other       --other-python: the minikv another interpreter imports (e.g. an older checkout),
              by default and with OPENBLAS_NUM_THREADS=1
  llama.cpp   --llama-bench: llama.cpp's CPU build on the same GGUF (Q4_1 weights; minikv's are
              fp32 in memory, 3.6x the bytes per token, so this is a reference, not a like-for-like)

    python3 bench/cpu_decode.py --runs 3 --tokens 64 [--other-python /tmp/old/bin/python]
        [--llama-bench /tmp/llb-cpu/bin/llama-bench --gguf ~/.cache/minikv/downloads/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from contextlib import contextmanager

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@contextmanager
def busy_cores(n: int):
    """n processes spinning, a core each, for the duration."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def minikv_rate(python: str, model: str | None, tokens: int, env: dict) -> float:
    cmd = [python, "-m", "minikv", "generate", *([model] if model else []), "-p", PROMPT, "-n", str(tokens),
           "--temp", "0", "--ignore-eos", "--device", "cpu", "--json"]
    # cwd "/": `-m minikv` must import the interpreter's installed minikv, not a checkout in the cwd
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd="/")
    return json.loads(r.stdout)["timings"]["gen_tokens_per_s"]


def llama_rate(llama_bench: str, gguf: str, tokens: int, threads: int) -> float:
    r = subprocess.run([llama_bench, "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1",
                        "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)[0]["avg_ts"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: minikv's default model)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate per run")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (the median is reported)")
    p.add_argument("--other-python", default=None, help="a python whose minikv to time as well (e.g. an older one)")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench (CPU build)")
    p.add_argument("--gguf", default=None, help="the GGUF llama-bench runs")
    args = p.parse_args()

    one = {"OPENBLAS_NUM_THREADS": "1"}
    configs = {"default": lambda env: minikv_rate(sys.executable, args.model, args.tokens, env),
               "OPENBLAS_NUM_THREADS=1": lambda env: minikv_rate(sys.executable, args.model, args.tokens, env | one)}
    if args.other_python:
        configs["other: default"] = lambda env: minikv_rate(args.other_python, args.model, args.tokens, env)
        configs["other: OPENBLAS_NUM_THREADS=1"] = lambda env: minikv_rate(args.other_python, args.model,
                                                                           args.tokens, env | one)
    if args.llama_bench and args.gguf:
        n = len(os.sched_getaffinity(0))
        configs[f"llama.cpp -t {n}"] = lambda env: llama_rate(args.llama_bench, args.gguf, args.tokens, n)
    print(f"{os.cpu_count()} CPUs; generation tokens/s, median of {args.runs} (min-max); {args.tokens} tokens")
    print("| config | idle | one core busy | two cores busy |\n| --- | --- | --- | --- |")
    for name, fn in configs.items():
        cells = []
        for busy in (0, 1, 2):
            with busy_cores(busy):
                rates = [fn(dict(os.environ)) for _ in range(args.runs)]
            cells.append(f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
