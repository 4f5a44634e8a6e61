"""`minikv chat`: an interactive, streaming, multi-turn chat with the model's chat template.

Commands: /reset starts over, /exit (or Ctrl-D) leaves, /help lists them; Ctrl-C stops the
current reply. Timings of the whole chat are printed on stderr at the end (each reply's with -v).
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

from ..errors import MinikvError
from ..generate import Result, Session, Timings
from .args import add_model_args, add_sampling_args, add_session_args, load, log, sampling_params, session_ctx


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat", description=__doc__)
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_session_args(p)
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


HELP = "/reset starts over, /exit (or Ctrl-D) leaves, /help shows this; Ctrl-C stops a reply"


def read_message(prompt: str) -> str | None:
    """The next line of standard input (None at its end), or one clear error."""
    if sys.stdin is None or sys.stdin.closed:
        raise MinikvError("chat reads messages from standard input, which is closed; run it in a terminal "
                          "or pipe the messages in")
    try:
        line = input(prompt)
        line.encode("utf-8")  # stdin's surrogateescape keeps bad bytes as lone surrogates
        return line
    except EOFError:
        return None
    except UnicodeError as e:  # decoding (a strict stdin) or encoding (an escaped byte)
        bad = e.object[e.start]
        byte = bad if isinstance(bad, int) else ord(bad) - 0xDC00
        raise MinikvError(f"standard input is not UTF-8 text (byte 0x{byte:02x}); send messages in UTF-8") from None


def run(args) -> int:
    params = sampling_params(args)
    model, tok, ctx = load(args, planner=session_ctx)
    session = Session(model, tok, kv=args.kv, ctx_size=ctx, ubatch=args.ubatch, graphs=args.graphs)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty()
    if interactive:
        log(f"minikv chat: {model.cfg.model_type}, context {session.ctx_size}, kv {args.kv}. {HELP}.")
    total, turns = Timings(), 0
    while True:
        try:
            line = read_message("> " if interactive else "")
        except KeyboardInterrupt:
            print()
            continue
        if line is None:
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            break
        if cmd == "/help":
            log(HELP)
            continue
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
        res = reply(session, ids, params, args)
        messages.append({"role": "assistant", "content": res.text})
        total.add(res.timings)
        turns += 1
        if args.verbose:
            log(res.timings.summary())
    if turns:
        log(f"minikv: {turns} {'reply' if turns == 1 else 'replies'} | {total.summary()}")
    return 0


def reply(session, ids, params, args) -> Result:
    """Stream one reply to stdout and say on stderr why it ended, unless the model ended it."""
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
    sys.stdout.write("\n")
    sys.stdout.flush()
    if res.stop_reason == "interrupted":
        log("(reply stopped)")
    elif res.stop_reason == "length":
        log(f"(reply cut at -n {args.max_tokens} tokens)")
    elif res.stop_reason == "context":
        log(f"minikv: the context of {session.ctx_size} tokens is full; /reset to start a new "
            "conversation or restart with a larger --ctx-size")
    return res
