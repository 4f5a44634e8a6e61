"""Find and read the weight files of a Hugging Face / minikv model directory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .backend import Backend
from .errors import MinikvError
from .safetensors_io import SafetensorsFile, bf16_bits_to_float32

FP16_MAX = 65504.0


def check_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where,
                  config: str = "config.json") -> None:
    """Every expected tensor is in `found` (name -> shape) with the expected shape, or one clear
    MinikvError; `config` names what the expected shapes were derived from."""
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MinikvError(f"{where}: tensor {missing[0]} is missing{more}; the checkpoint is "
                          f"incomplete or not of the architecture {config} names")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise MinikvError(f"{where}: tensor {name} has shape {list(found[name])}, {config} implies "
                              f"{list(shape)}; the checkpoint does not match its config")


class Checkpoint:
    """All tensors of a model directory: `model.safetensors`, or shards listed by
    `model.safetensors.index.json`, or (failing both) every `*.safetensors` file in it."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise MinikvError(f"{index}: corrupt index ({e}); re-download the checkpoint") from None
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                raise MinikvError(f"{index}: corrupt index (weight_map is not a map of file names); "
                                  "re-download the checkpoint")
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            hint = " (a GGUF file: run `minikv convert` first)" if any(self.dir.glob("*.gguf")) else ""
            raise MinikvError(f"{self.dir}: no safetensors weights found{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        for fname in files:
            if not (self.dir / fname).is_file():
                raise MinikvError(f"{self.dir}: shard {fname} listed in the index is missing; re-download it")
            st = SafetensorsFile(self.dir / fname)
            for name in st.keys():
                self.files[name] = st

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor is present with the expected shape, or one clear error."""
        check_tensors({n: st.shape(n) for n, st in self.files.items()}, expected, self.dir)

    def load(self, name: str, backend: Backend):
        """One tensor, converted to the backend's dtype on the device (bf16 converted there)."""
        st = self.files[name]
        raw, dt = st.raw(name), st.dtype(name)
        xp = backend.xp
        a = xp.asarray(np.ascontiguousarray(raw))  # the stored bits travel, not a float32 copy
        if dt == "BF16":
            a = bf16_bits_to_float32(xp, a)
        if backend.dtype == np.float16 and a.dtype != np.float16:
            a = xp.clip(a, -FP16_MAX, FP16_MAX)  # bf16/f32 values past fp16's range would become inf
        return a.astype(backend.dtype, copy=False)
