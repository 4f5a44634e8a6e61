"""Flags shared by the subcommands (named as llama.cpp users know them) and model loading."""
from __future__ import annotations

import argparse
import sys

from ..backend import DTYPES, get_backend
from ..errors import MinikvError
from ..sampler import SamplingParams
from ..tokenizer import Tokenizer


def add_model_args(p: argparse.ArgumentParser, kv_multi: bool = False) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help="model directory (Hugging Face checkpoint or `minikv convert` output); "
                        "default: SmolLM2-135M-Instruct, fetched and converted on first use")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: the GPU if CuPy sees one)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="compute dtype (default: float16 on the GPU, float32 on the CPU); float32 on "
                        "the GPU computes as the CPU does, slower, to check numbers")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="context size in tokens (default: min(model's maximum, 4096))")
    kv_help = ("KV cache: METHOD[:BITS][,key=value...], e.g. fp16, kivi:2, patternkv:4,sink=4 "
               "(default fp16)")
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
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                          seed=args.seed)


def resolve_model_dir(args) -> str:
    if args.model is not None:
        return args.model
    from ..convert.default_model import default_model_dir

    return str(default_model_dir())


def load(args):
    """(model, tokenizer) for the command's MODEL_DIR and --device."""
    from ..models import load_model

    model_dir = resolve_model_dir(args)
    backend = get_backend(args.device, getattr(args, "dtype", "auto"))
    model = load_model(model_dir, backend)
    tok = Tokenizer.from_dir(model_dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise MinikvError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{model.cfg.vocab_size}; the tokenizer files belong to another model")
    return model, tok


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
