"""`minikv perplexity`: score a text with one or more KV cache methods on the same tokens."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinikvError
from .args import add_model_args, load


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text per KV cache method", description=__doc__)
    add_model_args(p, kv_multi=True)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens")
    p.add_argument("--prefill", type=int, default=512, metavar="P",
                   help="tokens fed as one prefill before the chunked rest (default 512)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per method: {"kv", "ppl", "tokens", "kv_bytes", "bits_per_value"}')
    p.set_defaults(func=run)


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinikvError(f"--text {path}: cannot read ({e})") from None


def text_ids(tok, path: str, max_tokens: int | None) -> list[int]:
    ids = tok.encode(read_text(path))
    return ids[:max_tokens] if max_tokens else ids


def run(args) -> int:
    from ..kv import parse_kv_spec
    from ..perplexity import perplexity

    specs = args.kv or ["fp16"]
    for s in specs:
        parse_kv_spec(s)  # fail on a bad spec before loading anything
    model, tok = load(args)
    ids = text_ids(tok, args.text, args.max_tokens)
    if not args.json:
        print(f"{'kv':28} {'ppl':>10} {'tokens':>7} {'KV MiB':>9} {'bits/value':>10}")
    for s in specs:
        r = perplexity(model, ids, s, prefill=args.prefill)
        if args.json:
            print(json.dumps(r.as_dict()))
        else:
            print(f"{r.kv:28} {r.ppl:10.4f} {r.tokens:7d} {r.kv_bytes / 2**20:9.2f} {r.bits_per_value:10.3f}")
        sys.stdout.flush()
    return 0
