"""Perplexity of every KV cache method on the same tokens, as a markdown table.

    python3 bench/kv_table.py [MODEL_DIR] --text FILE --max-tokens 4096 [--device cpu] [--dtype float32] [--kv SPEC ...]

Rows: perplexity, its rise over the unquantized cache, tokens scored, bits per value
(every stored byte counted). Default methods: all 16 of bench/RESULTS.md's table.
"""
from __future__ import annotations

import datetime
import platform
import sys
import time

from common import load_model, perplexity_parser

DEFAULT = ["fp16", "kivi:2", "kivi:3", "kivi:4", "nqkv:2", "nqkv:3", "nqkv:4", "nqkv:2,kaxis=channel",
           "nqkv:3,kaxis=channel", "nqkv:4,kaxis=channel", "patternkv:2", "patternkv:3", "patternkv:4",
           "patternkv:2,sink=4", "patternkv:2,sink=16", "kivi:2,sink=16"]


def main():
    from minikv.cli.perplexity import text_ids
    from minikv.perplexity import perplexity

    ap = perplexity_parser(__doc__)
    ap.add_argument("--text", required=True)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="compute dtype: auto, float16 (GPU) or float32")
    ap.add_argument("--kv", action="append", default=None)
    args = ap.parse_args()
    model, tok = load_model(args)
    ids = text_ids(tok, args.text, args.max_tokens)
    print(f"<!-- {' '.join(sys.argv)} | {model.backend.name} | {platform.node()} | "
          f"{datetime.date.today()} -->")
    print(f"{len(ids)} tokens of `{args.text.split('/')[-1]}`, prefill {args.prefill}, device {model.backend.name} "
          f"({model.backend.dtype})\n")
    print("| kv | ppl | rise vs fp16 | bits/value | seconds |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for spec in args.kv or DEFAULT:
        t = time.perf_counter()
        r = perplexity(model, ids, spec, prefill=args.prefill)
        base = r.ppl if base is None else base
        print(f"| `{r.kv}` | {r.ppl:.3f} | {100 * (r.ppl / base - 1):+.2f}% | {r.bits_per_value:.3f} | "
              f"{time.perf_counter() - t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
