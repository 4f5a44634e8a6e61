"""`minikv generate`: complete one prompt, streaming only the generated text to stdout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinikvError
from ..generate import Result, Session
from .args import add_model_args, add_sampling_args, add_session_args, load, log, sampling_params, session_ctx


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt", description=__doc__)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"text", "tokens", "prompt_tokens", "timings"} instead')
    add_session_args(p)
    add_sampling_args(p, default_max_tokens=256)
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = args.prompt
    if args.file is not None:
        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MinikvError(f"--file {args.file}: cannot read ({e})") from None
    params = sampling_params(args)
    model, tok, ctx = load(args, planner=session_ctx)
    session = Session(model, tok, kv=args.kv, ctx_size=ctx, ubatch=args.ubatch, graphs=args.graphs)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode(tok.render_chat(msgs + [{"role": "user", "content": prompt}]), add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    res = Result()
    for piece in session.generate(ids, params, args.max_tokens, tuple(args.stop), result=res, ignore_eos=args.ignore_eos):
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"text": res.text, "tokens": len(res.token_ids), "prompt_tokens": len(ids),
                          "token_ids": res.token_ids, "stop_reason": res.stop_reason,
                          "kv": args.kv, "kv_bits_per_value": round(session.cache.bits_per_value(), 4),
                          "timings": res.timings.as_dict()}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if res.stop_reason == "context":
            log(f"minikv: stopped: the context of {session.ctx_size} tokens is full (raise --ctx-size)")
        elif res.stop_reason == "length" and args.max_tokens > 0:
            log(f"minikv: stopped after -n {args.max_tokens} tokens")
        log(f"{res.timings.summary()} | kv {args.kv}: {session.cache.bits_per_value():.2f} bits/value")
    return 0
