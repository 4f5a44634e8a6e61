"""Flags shared by the subcommands (named as llama.cpp users know them) and model loading."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..backend import DTYPES, get_backend
from ..errors import MinikvError
from ..progress import Progress
from ..sampler import SamplingParams
from ..tokenizer import Tokenizer


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as every other minikv error."""

    def error(self, message):
        print(f"minikv: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


CTX_HELP = "context size in tokens, 0 = the largest that fits in memory (default: min(model's maximum, 4096))"


UBATCH_HELP = ("the most tokens one forward pass takes: longer prompts are fed in chunks of N "
               "(default: 2048 on the GPU, 512 on the CPU)")


def add_model_args(p: argparse.ArgumentParser, kv_multi: bool = False, ctx_help: str | None = CTX_HELP,
                   ubatch_help: str | None = UBATCH_HELP) -> None:
    """MODEL, -m, --device, --dtype, -t, --kv, and -c and -ub unless their help is None."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model directory (Hugging Face checkpoint or `minikv convert` output) or .gguf file "
                        "(converted into the cache on first use); default: SmolLM2-135M-Instruct, fetched "
                        "and converted on first use")
    p.add_argument("-m", "--model", dest="model_flag", default=None, metavar="MODEL", help="the same as MODEL")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: the GPU if CuPy sees one)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="compute dtype (default: float16 on the GPU, float32 on the CPU); float32 on "
                        "the GPU computes as the CPU does, slower, to check numbers")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="CPU BLAS threads (default: the physical cores); decode steps use 1 or N, "
                        "whichever is faster at the time")
    if ctx_help is not None:
        p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N", help=ctx_help)
    if ubatch_help is not None:
        p.add_argument("-ub", "--ubatch-size", dest="ubatch", type=int, default=None, metavar="N", help=ubatch_help)
    kv_help = ("KV cache: METHOD[:BITS][,key=value...], e.g. fp16, kivi:2, patternkv:4,sink=4, or a preset "
               "q2 / q3 / q4 (2-, 3-, 4-bit class; q2,sink=4 overrides its options) (default fp16)")
    if kv_multi:
        p.add_argument("--kv", action="append", default=None, metavar="SPEC",
                       help=kv_help + "; repeat to compare several on the same tokens")
    else:
        p.add_argument("--kv", default="fp16", metavar="SPEC", help=kv_help)


def add_sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    d = SamplingParams()
    p.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int,
                   default=default_max_tokens, metavar="N",
                   help=f"tokens to generate, -1 = until EOS or the context is full (default {default_max_tokens})")
    p.add_argument("--temp", type=float, default=d.temperature, help=f"temperature, 0 = greedy (default {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"top-k, 0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"top-p, 1.0 = off (default {d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"min-p, 0.0 = off (default {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help=f"penalty on recently seen tokens, 1.0 = off (default {d.repeat_penalty})")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help=f"how many recent tokens the penalty covers, -1 = all (default {d.repeat_last_n})")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed, -1 = random (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_params(args) -> SamplingParams:
    if args.max_tokens < -1:
        raise MinikvError(f"-n {args.max_tokens}: use a count of tokens, or -1 for no limit")
    if args.seed is not None and args.seed < -1:
        raise MinikvError(f"--seed {args.seed}: use 0 or more, or -1 for a random seed")
    for flag, v in (("--temp", args.temp), ("--top-p", args.top_p), ("--min-p", args.min_p),
                    ("--repeat-penalty", args.repeat_penalty)):
        if not math.isfinite(v):
            raise MinikvError(f"{flag} {v}: must be a finite number")
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                          seed=None if args.seed == -1 else args.seed)


def model_arg(args) -> str | None:
    """MODEL given as the positional argument or as -m (llama.cpp's spelling), not both."""
    if args.model is not None and args.model_flag is not None and args.model != args.model_flag:
        raise MinikvError(f"two models given ({args.model} and -m {args.model_flag}); give one")
    return args.model if args.model is not None else args.model_flag


def resolve_model_dir(args) -> str:
    """The model directory to load: MODEL as given, the cached conversion of a .gguf file, or
    the default model."""
    from ..convert.default_model import default_model_dir, gguf_model_dir

    model = model_arg(args)
    if model is None:
        return str(default_model_dir())
    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(gguf_model_dir(path))
    return model


def add_graph_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-graph", dest="graphs", action="store_false",
                   help="run every decode step op by op instead of replaying CUDA graphs (for debugging)")


def add_session_args(p: argparse.ArgumentParser) -> None:
    """The memory planner's flags and --no-graph (generate, chat)."""
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                   help="memory the model may use on its device (default: what is free there)")
    add_graph_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print the memory plan and each reply's timings")


def session_ctx(args, files, backend, batch: int = 1) -> int:
    """The context each of `batch` sequences gets: -c as given, or the model's default, or with
    -c 0 the largest that fits; refused before the weights load unless weights + KV +
    activations fit."""
    from ..generate import default_ubatch
    from ..plan import check, largest_ctx, plan, weight_bytes

    cfg, n_max = files.cfg, files.cfg.max_position_embeddings
    if args.ctx_size is not None and not 0 <= args.ctx_size <= n_max:
        raise MinikvError(f"--ctx-size {args.ctx_size}: use 1 to {n_max} tokens (the model's "
                          "max_position_embeddings), or 0 for the most that fits")
    if args.gpu_mem is not None and not args.gpu_mem > 0:
        raise MinikvError(f"--gpu-mem {args.gpu_mem}: use a positive number of GiB")
    budget = int(args.gpu_mem * 2**30) if args.gpu_mem else backend.memory_free()
    weights, ubatch = weight_bytes(files.shapes, backend.dtype), args.ubatch or default_ubatch(backend)
    ctx = min(n_max, 4096) if args.ctx_size is None else args.ctx_size
    if ctx == 0:
        ctx = largest_ctx(cfg, weights, args.kv, ubatch, batch, backend, budget, n_max) or n_max
    p = plan(cfg, weights, args.kv, ctx, ubatch, batch, backend, budget)
    if args.verbose:
        log(f"minikv: {p.describe()}")
    check(p, cfg, ubatch, backend, f"{files.dir.name}:")
    return ctx


def load(args, planner=None):
    """(model, tokenizer, planned) for the command's MODEL and --device; `planner(args, files,
    backend)` runs once the model's files are checked, before its weights load (planned: what
    it returns, else None)."""
    backend, files, planned = prepare(args, planner)
    return (*load_weights(files, backend), planned)


def prepare(args, planner=None):
    """(backend, files, planned): everything before the weights load, where input errors show."""
    from ..models import open_model

    backend = get_backend(args.device, args.dtype, args.threads)  # its errors before any fetch or conversion
    files = open_model(resolve_model_dir(args))
    return backend, files, planner(args, files, backend) if planner is not None else None


def load_weights(files, backend):
    """(model, tokenizer) of checked model files (prepare's)."""
    from ..models import build_model

    with Progress(None, "loading", unit="B") as bar:
        model = build_model(files, backend, progress=lambda done, total: bar.update_to(done, total=total))
    tok = Tokenizer.from_dir(files.dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise MinikvError(f"{files.dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{model.cfg.vocab_size}; the tokenizer files belong to another model")
    return model, tok


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kv_specs(args, default: tuple = ("fp16",)) -> list[str]:
    """The --kv specs given (or the default), each checked before anything loads."""
    from ..kv import parse_kv_spec

    specs = args.kv or list(default)
    for s in specs:
        parse_kv_spec(s)
    return specs
