"""`minikv passkey`: passkey retrieval per KV cache method. A 5-digit number is hidden at
several depths of filler text of several lengths; the model is asked for it at the end. Prints
the fraction retrieved per method and length (every method gets the same prompts)."""
from __future__ import annotations

import json
import sys

from ..errors import MinikvError
from ..progress import Progress
from .args import add_graph_arg, add_model_args, kv_specs, load
from .bench import int_list


def add_parser(sub) -> None:
    p = sub.add_parser("passkey", help="passkey retrieval per KV cache method", description=__doc__)
    add_model_args(p, kv_multi=True, ctx_help=None)
    p.add_argument("--lengths", default="1024,2048,4096,7168", metavar="N,...",
                   help="prompt lengths in tokens (default 1024,2048,4096,7168)")
    p.add_argument("--depths", default="10,30,50,70,90", metavar="PCT,...",
                   help="where the key sits, in percent of the filler (default 10,30,50,70,90)")
    p.add_argument("--trials", type=int, default=1, help="keys per length and depth (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON object per method and length, with every answer")
    add_graph_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..passkey import ANSWER_TOKENS, min_length, passkey

    specs = kv_specs(args)
    lengths, depths = int_list(args.lengths), int_list(args.depths)
    if not lengths or min(lengths) < 64 or not depths or not all(0 <= d <= 100 for d in depths) or args.trials < 1:
        raise MinikvError("--lengths takes lengths of 64 tokens or more, --depths percentages 0 to 100, "
                          "--trials 1 or more")
    model, tok, _ = load(args)
    n_max, shortest = model.cfg.max_position_embeddings, min_length(tok)
    if min(lengths) < shortest:
        raise MinikvError(f"--lengths {min(lengths)}: this tokenizer needs {shortest} tokens or more for the "
                          "instruction, the key, the question and some filler")
    if max(lengths) + ANSWER_TOKENS > n_max:
        raise MinikvError(f"--lengths {max(lengths)}: with the {ANSWER_TOKENS}-token answer it exceeds the "
                          f"model's max_position_embeddings ({n_max})")
    total = len(lengths) * len(depths) * args.trials
    table = []
    for s in specs:
        with Progress(total, f"passkey {s}", unit="prompt") as bar:
            rows = passkey(model, tok, s, lengths, [d / 100 for d in depths], args.trials, args.seed, args.ubatch,
                           args.graphs, progress=lambda: bar.advance())
        for r in rows:
            if args.json:
                print(json.dumps(r.as_dict()))
        table.append((s, rows))
        sys.stdout.flush()
    if not args.json:
        print("| kv | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
        print("| --- |" + " ---: |" * len(lengths))
        for s, rows in table:
            print(f"| {s} | " + " | ".join(f"{r.found}/{r.tried}" for r in rows) + " |")
    return 0
