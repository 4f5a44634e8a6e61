"""`minikv bench`: prompt and generation speed in llama-bench's style, on a model directory or a
random-weight model of a real shape built on the device (--shape)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinikvError
from .args import add_graph_arg, add_model_args, kv_specs, load, log, model_arg


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MinikvError(f"{text!r}: expected comma-separated integers, e.g. 0,8192") from None


def add_parser(sub) -> None:
    from ..synthetic import SHAPES

    p = sub.add_parser("bench", help="prompt and generation speed (llama-bench style)", description=__doc__)
    add_model_args(p, kv_multi=True, ctx_help=None)
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of MODEL")
    p.add_argument("-p", "--n-prompt", dest="prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("-n", "--n-gen", dest="gen", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("-d", "--n-depth", dest="depth", default="0", help="tokens already in the cache, comma-separated")
    p.add_argument("-b", "--batch", default="1", help="sequences decoded together, comma-separated")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                   help="memory the model may use (default: what is free before it loads); a test whose "
                        "plan does not fit is refused with the planner's message, the others run")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    add_graph_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..backend import get_backend
    from ..bench import WARMUP, copy_bandwidth, markdown, run as bench
    from ..generate import default_ubatch
    from ..models import ARCHITECTURES
    from ..plan import check, plan, weight_bytes
    from ..synthetic import synthetic_config, synthetic_model

    specs = kv_specs(args)
    depths, batches = int_list(args.depth), int_list(args.batch)
    if args.prompt < 1 or args.gen < 1 or min(depths + [0]) < 0 or min(batches + [1]) < 1:
        raise MinikvError("-p and -n take 1 or more tokens, -d 0 or more, -b 1 or more sequences")
    if args.gpu_mem is not None and not args.gpu_mem > 0:
        raise MinikvError(f"--gpu-mem {args.gpu_mem}: use a positive number of GiB")
    if args.shape:
        if args.model or args.model_flag:
            raise MinikvError("give MODEL or --shape, not both")
        backend = get_backend(args.device, args.dtype, args.threads)
        budget = backend.memory_free()
        cfg = synthetic_config(args.shape)
        weights = weight_bytes(ARCHITECTURES[cfg.model_type][0].tensor_shapes(cfg), backend.dtype)
        model, name = synthetic_model(args.shape, backend), args.shape
    else:
        budget = []  # measured by the planner hook, before the weights load
        model, _, weights = load(args, planner=lambda a, files, be: (budget.append(be.memory_free()),
                                                                   weight_bytes(files.shapes, be.dtype))[1])
        budget, name = budget[0], Path(model_arg(args) or "default model").name
    budget = int(args.gpu_mem * 2**30) if args.gpu_mem else budget
    ubatch = args.ubatch or default_ubatch(model.backend)
    bw = copy_bandwidth(model.backend)
    rows = []
    for kv in specs:
        for b in batches:
            for d in depths:
                if d + args.prompt + args.gen > model.cfg.max_position_embeddings:
                    raise MinikvError(f"-d {d} + -p {args.prompt} + -n {args.gen} exceed the model's "
                                      f"max_position_embeddings ({model.cfg.max_position_embeddings})")
                p = plan(model.cfg, weights, kv, d + args.prompt + args.gen + WARMUP + 1, ubatch, b,
                         model.backend, budget)
                try:
                    check(p, model.cfg, ubatch, model.backend, f"{name}:")
                except MinikvError as e:  # this test does not fit: say so, run the others
                    log(f"minikv: refused: {e}")
                    if args.json:
                        print(json.dumps({"model": name, "kv": kv, "batch": b, "depth": d, "refused": str(e)}))
                    continue
                for r in bench(model, name, kv, b, d, args.prompt, args.gen, ubatch, bw, graphs=args.graphs):
                    rows.append(r)
                    if args.json:
                        print(json.dumps(r.as_dict()), flush=True)
                    else:
                        log(f"{r.model} {r.kv} b{r.batch} d{r.depth} {r.test}: {r.tokens_per_s:.2f} t/s")
    if not args.json:
        print(markdown(rows, bw))
    sys.stdout.flush()
    return 0
