"""Perplexity rise over the unquantized cache, per text, for a few KV methods: one text is
not enough to rank 2-bit methods (their perplexity moves by a few percent under fp16-level
changes of the activations), so this scores the same methods on many texts.

    python3 bench/kv_texts.py [MODEL_DIR] --texts FILE... --max-tokens 4096 --kv fp16 --kv kivi:2 ...

The first --kv is the baseline. Prints a markdown table: rise (%) per text and method, the
mean and worst rise, bits per value, and on how many texts each method beats the second --kv.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np

from common import load_model, perplexity_parser


def main():
    from minikv.cli.perplexity import text_ids
    from minikv.perplexity import perplexity

    ap = perplexity_parser(__doc__)
    ap.add_argument("--texts", nargs="+", required=True)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kv", action="append", required=True)
    args = ap.parse_args()
    model, tok = load_model(args)
    print(f"<!-- {' '.join(sys.argv)} | {model.backend.name} | {datetime.date.today()} -->")
    print("| text | " + " | ".join(f"`{s}`" for s in args.kv) + " |")
    print("| --- " * (len(args.kv) + 1) + "|")
    rises, bits = [], []
    for path in args.texts:
        ids = text_ids(tok, path, args.max_tokens)
        res = [perplexity(model, ids, s, prefill=args.prefill) for s in args.kv]
        ppl = [r.ppl for r in res]
        bits.append([r.bits_per_value for r in res])
        rises.append([100 * (p / ppl[0] - 1) for p in ppl])
        cells = [f"{ppl[0]:.2f}"] + [f"{r:+.1f}%" for r in rises[-1][1:]]
        print(f"| {Path(path).stem} | " + " | ".join(cells) + " |", flush=True)
    r = np.array(rises)
    print("| mean rise | — | " + " | ".join(f"{m:+.1f}%" for m in r[:, 1:].mean(0)) + " |")
    print("| worst rise | — | " + " | ".join(f"{m:+.1f}%" for m in r[:, 1:].max(0)) + " |")
    print("| bits/value | " + " | ".join(f"{b:.3f}" for b in np.array(bits).mean(0)) + " |")
    if len(args.kv) > 2:
        wins = (r[:, 2:] < r[:, 1:2]).sum(0)
        print("| texts where it beats `" + args.kv[1] + "` | — | — | " +
              " | ".join(f"{w}/{len(r)}" for w in wins) + " |")


if __name__ == "__main__":
    main()
