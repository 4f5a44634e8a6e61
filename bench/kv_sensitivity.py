"""How much a KV method's perplexity moves when only the activations' rounding changes.

    python bench/kv_sensitivity.py [MODEL_DIR] --text FILE --max-tokens 4096 --kv fp16 --kv kivi:2 ...

Runs each method twice on the CPU: float32 matmul inputs (minikv's CPU path), then matmul
inputs rounded to fp16 as on the GPU. The difference is the numerical noise of the method's
perplexity on that text: low-bit codes and pattern choices flip and the flips compound.
"""
from __future__ import annotations

import argparse

import numpy as np


def main():
    from minikv.cli.args import load
    from minikv.cli.perplexity import text_ids
    from minikv.ops import ArrayOps
    from minikv.perplexity import perplexity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--kv", action="append", required=True)
    args = ap.parse_args()
    args.device, args.ctx_size = "cpu", None
    model, tok = load(args)
    ids = text_ids(tok, args.text, args.max_tokens)
    base = {s: perplexity(model, ids, s).ppl for s in args.kv}
    linear = ArrayOps.linear
    ArrayOps.linear = lambda self, x, w, b=None: linear(self, x.astype(np.float16).astype(np.float32), w, b)
    print("| kv | fp32 matmul inputs | fp16-rounded inputs | change |")
    print("| --- | --- | --- | --- |")
    for s in args.kv:
        p = perplexity(model, ids, s).ppl
        print(f"| `{s}` | {base[s]:.3f} | {p:.3f} | {100 * (p / base[s] - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
