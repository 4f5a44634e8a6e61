"""`minikv serve`: an OpenAI-compatible HTTP server (chat and text completions, streaming,
models, health, metrics, tokenize) with continuous batching over N slots of a quantized cache."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from ..errors import MinikvError
from .args import add_graph_arg, add_model_args, load_weights, log, model_arg, prepare, session_ctx


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server", description=__doc__)
    add_model_args(p, ctx_help="total context of all slots, each gets CTX / --parallel (llama-server's "
                               "-c); 0 = the most that fits (default: --parallel x min(model max, 4096))")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("-np", "--parallel", type=int, default=4, metavar="N",
                   help="sequences decoded together, one cache slot each (default 4)")
    p.add_argument("--queue-size", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot; more are answered 429 (default 64)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--alias", default=None, metavar="NAME", help="the model id clients use (default: MODEL's name)")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                   help="memory the model may use on its device (default: what is free there)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the memory plan")
    add_graph_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aiohttp import web

    from ..generate import default_ubatch
    from ..server.api import State, build_app
    from ..server.engine import Engine

    if args.parallel < 1 or args.queue_size < 0:
        raise MinikvError("--parallel takes 1 or more slots and --queue-size 0 or more requests")
    if not 0 < args.port < 65536:
        raise MinikvError(f"--port {args.port}: use 1 to 65535")
    per_slot = copy.copy(args)  # the planner sizes N slots of CTX / N tokens
    if args.ctx_size:
        per_slot.ctx_size = args.ctx_size // args.parallel
        if per_slot.ctx_size < 1:
            raise MinikvError(f"--ctx-size {args.ctx_size} leaves no tokens for each of {args.parallel} slots")
    if args.ubatch is not None and args.ubatch < 1:
        raise MinikvError(f"--ubatch-size {args.ubatch}: use 1 or more tokens")

    def planner(a, f, be):
        a.ubatch = args.ubatch or default_ubatch(be)  # a prefill forward's tokens over all its rows
        return session_ctx(a, f, be, batch=args.parallel)
    backend, files, ctx = prepare(per_slot, planner)
    model_id = args.alias or Path(model_arg(args) or files.dir).name
    ubatch = per_slot.ubatch

    def load():
        model, tok = load_weights(files, backend)
        return Engine(model, tok, args.kv, args.parallel, ctx, ubatch, args.queue_size, args.graphs), tok

    state = State(load, model_id, args.api_key)
    log(f"minikv: serving {model_id} on http://{args.host}:{args.port}/v1 with {args.parallel} slots of {ctx} "
        f"tokens (--kv {args.kv}); /health answers 200 once the weights are loaded")
    try:
        web.run_app(build_app(state), host=args.host, port=args.port, print=None, shutdown_timeout=30,
                    handle_signals=True, access_log=None)
    except OSError as e:
        raise MinikvError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); "
                          "use another --port or --host") from None
    sys.stderr.flush()
    return 0
