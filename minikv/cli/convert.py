"""`minikv convert`: a Hugging Face checkpoint directory or a GGUF file -> a minikv model directory."""
from __future__ import annotations

import time

from .args import log


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF checkpoint or a GGUF file", description=__doc__)
    p.add_argument("src", metavar="SRC", help="Hugging Face checkpoint directory or .gguf file")
    p.add_argument("dst", metavar="DST", help="output model directory")
    p.add_argument("--dtype", choices=["f16", "bf16", "f32"], default=None,
                   help="weight dtype (default: the source's for HF checkpoints, f16 for GGUF)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert import convert

    t = time.perf_counter()
    dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force)
    size = sum(f.stat().st_size for f in dst.iterdir()) / 1e9
    log(f"minikv: converted {args.src} -> {dst} ({size:.2f} GB) in {time.perf_counter() - t:.1f} s")
    return 0
