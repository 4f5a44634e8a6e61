"""`minikv chat`: an interactive, streaming, multi-turn chat with the model's chat template.

Commands: /reset starts over, /exit (or Ctrl-D) leaves; Ctrl-C stops the current reply.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

from ..errors import MinikvError
from ..generate import Result, Session
from .args import add_model_args, add_sampling_args, load, log, sampling_params


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat", description=__doc__)
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, default_max_tokens=-1)
    p.set_defaults(func=run)


@contextmanager
def interrupt_flag():
    """While active, the first Ctrl-C only sets a flag (checked between tokens); a second
    one interrupts for real (e.g. during a long prefill)."""
    hit = []

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, old)


def run(args) -> int:
    params = sampling_params(args)
    model, tok = load(args)
    session = Session(model, tok, kv=args.kv, ctx_size=args.ctx_size)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        log(f"minikv chat: {model.cfg.model_type}, context {session.ctx_size}, kv {args.kv}. "
            "/reset to start over, /exit or Ctrl-D to leave, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            break
        if cmd == "/reset":
            messages = list(system)
            session.reset()
            log("(conversation reset)")
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.render_chat(messages), add_special_tokens=False)
        if len(ids) >= session.ctx_size:
            messages.pop()
            log(f"minikv: the conversation would need {len(ids)} tokens but the context holds "
                f"{session.ctx_size}; /reset to start a new one or restart with a larger --ctx-size")
            continue
        res = Result()
        try:
            with interrupt_flag() as stop_requested:
                for piece in session.generate(ids, params, args.max_tokens, tuple(args.stop),
                                              should_stop=stop_requested, result=res, ignore_eos=args.ignore_eos):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            session.reset()  # interrupted mid-forward: the cache may be partial, rebuild next turn
            res.stop_reason = "interrupted"
        except MinikvError as e:
            messages.pop()
            log(f"\nminikv: {e}")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": res.text})
        if res.stop_reason == "interrupted":
            log("(reply stopped)")
        elif res.stop_reason == "context":
            log(f"minikv: the context of {session.ctx_size} tokens is full; /reset to start a new "
                "conversation or restart with a larger --ctx-size")
    return 0
