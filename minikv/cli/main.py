"""The `minikv` command line: subcommands, and one-line errors with exit status 2."""
from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import MinikvError
from . import bench, chat, convert, generate, kvstats, passkey, perplexity, serve
from .args import Parser

SUBCOMMANDS = [generate, chat, convert, perplexity, passkey, kvstats, bench, serve]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="minikv", description="A small LLM runtime with quantized KV caches.")
    p.add_argument("--version", action="version", version=f"minikv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in SUBCOMMANDS:
        mod.add_parser(sub)
    return p


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # cupy's OOM


def expand_presets(args) -> None:
    """--kv as the full spec (a preset such as q2 spelled out, its options merged) wherever a
    command shows or reports it; a bad spec fails here, before anything loads."""
    from ..kv import parse_kv_spec

    kv = getattr(args, "kv", None)
    if isinstance(kv, str):
        args.kv = str(parse_kv_spec(kv))
    elif kv:
        args.kv = [str(parse_kv_spec(s)) for s in kv]


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # model text is UTF-8 whatever the locale says
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    args = build_parser().parse_args(argv)
    try:
        expand_presets(args)
        return args.func(args) or 0
    except MinikvError as e:
        print(f"minikv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout went to `| head`, which has read enough: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # what a shell reports for a program stopped by SIGPIPE
    except Exception as e:  # noqa: BLE001 - only to turn out-of-memory into a clear line
        if not _out_of_memory(e):
            raise
        where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "host"
        print(f"minikv: error: not enough {where} memory ({e}); use a smaller --ctx-size, a quantized "
              "--kv (e.g. kivi:4), or --device cpu", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
