"""`minikv perplexity`: score a text with one or more KV cache methods on the same tokens."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinikvError
from .args import add_model_args, kv_specs, load
from ..progress import Progress

DEFAULT_PREFILL = 512


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text per KV cache method", description=__doc__)
    add_model_args(p, kv_multi=True, ctx_help="score the text in independent windows of N tokens, as "
                   "llama-perplexity does (default and 0: the model's maximum)",
                   ubatch_help="feed the prefill in pieces of N tokens, as a session feeds a long prompt "
                               "(default: in one piece)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="score only the first N tokens (default: all)")
    p.add_argument("--prefill", type=int, default=None, metavar="P",
                   help=f"tokens fed as a prefill (in -ub pieces) before the chunked rest "
                        f"(default {DEFAULT_PREFILL}, or less in a shorter window)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per method: {"kv", "ppl", "tokens", "kv_bytes", "bits_per_value"}')
    p.set_defaults(func=run)


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinikvError(f"--text {path}: cannot read ({e})") from None


def text_ids(tok, path: str, max_tokens: int | None) -> list[int]:
    if max_tokens is not None and max_tokens < 2:
        raise MinikvError(f"--max-tokens {max_tokens}: use 2 or more (or leave it out for the whole text)")
    ids = tok.encode(read_text(path))
    return ids[:max_tokens] if max_tokens else ids


def window_size(args, cfg, n_tokens: int) -> int:
    """-c: the window each part of the text is scored in (default and 0: the model's maximum)."""
    if args.ctx_size is not None and args.ctx_size < 0:
        raise MinikvError(f"-c {args.ctx_size}: use a window size in tokens, or 0 for the model's maximum")
    ctx = args.ctx_size or cfg.max_position_embeddings
    if ctx > cfg.max_position_embeddings:
        raise MinikvError(f"-c {ctx} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
    if ctx < 2:
        raise MinikvError(f"-c {ctx}: a window must hold at least 2 tokens")
    return min(ctx, n_tokens)


def ubatch_size(args) -> int | None:
    """-ub: the prefill is fed in pieces of this many tokens (default: in one piece)."""
    if args.ubatch is not None and args.ubatch < 1:
        raise MinikvError(f"--ubatch-size {args.ubatch}: use 1 or more tokens")
    return args.ubatch


def prefill_size(args, window: int) -> int:
    if args.prefill is None:
        return min(DEFAULT_PREFILL, window - 1)
    if not 1 <= args.prefill < window:
        raise MinikvError(f"--prefill {args.prefill}: use 1 to {window - 1} (fewer tokens than the "
                          f"{window}-token window, so that the rest is scored through the cache)")
    return args.prefill


def run(args) -> int:
    from ..perplexity import perplexity

    specs = kv_specs(args)
    model, tok, _ = load(args)
    ids = text_ids(tok, args.text, args.max_tokens)
    if len(ids) < 2:
        raise MinikvError(f"--text {args.text}: too short to score ({len(ids)} tokens; 2 or more are needed)")
    ctx = window_size(args, model.cfg, len(ids))
    prefill = prefill_size(args, ctx)
    bos = ids[0] if ids[0] == tok.bos_id else None
    for i, s in enumerate(specs):
        with Progress(len(ids), f"perplexity {s}", unit="tok") as bar:
            r = perplexity(model, ids, s, prefill=prefill, ctx=ctx, bos=bos, ubatch=ubatch_size(args),
                           progress=lambda n, ppl: bar.update_to(n, f"ppl {ppl:.4f}"))
        if args.json:
            print(json.dumps(r.as_dict()))
        else:
            if i == 0:  # the header with the first row, so that a failing first method prints no table
                print(f"{'kv':28} {'ppl':>10} {'tokens':>7} {'KV MiB':>9} {'bits/value':>10}")
            print(f"{r.kv:28} {r.ppl:10.4f} {r.tokens:7d} {r.kv_bytes / 2**20:9.2f} {r.bits_per_value:10.3f}")
        sys.stdout.flush()
    return 0
