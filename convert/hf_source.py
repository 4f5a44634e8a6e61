"""A Hugging Face checkpoint directory as a conversion source (any of fp32/fp16/bf16,
single or sharded): checked against its config, re-stored in the chosen dtype."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from minikv.checkpoint import Checkpoint
from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.models import expected_tensors

# Files copied as they are (tokenizer, generation defaults, chat template, licence).
COPIED = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
          "chat_template.json", "LICENSE", "LICENSE.txt", "NOTICE")
_DTYPE_OF = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


class HFSource:
    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        cfg = ModelConfig.from_dir(path)  # validates the architecture
        try:
            self.raw_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MinikvError(f"{path}/config.json: unreadable ({e})") from None
        self.ckpt = Checkpoint(path)
        self.shapes = expected_tensors(cfg, len(self.ckpt.files), path)
        self.ckpt.check(self.shapes)
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise MinikvError(f"{path}: no tokenizer.json or tokenizer.model to take along")
        kinds = Counter(self.ckpt.files[n].dtype(n) for n in self.shapes)
        self.default_dtype = _DTYPE_OF.get(kinds.most_common(1)[0][0], "f16")

    def plan(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(self.shapes.items())

    def tensor(self, name: str):
        return self.ckpt.files[name].float32(name)

    def files(self, dtype_name: str) -> dict[str, object]:
        cfg = {**self.raw_config, "torch_dtype": dtype_name}
        cfg.pop("dtype", None)
        cfg.pop("quantization_config", None)
        return {"config.json": cfg}

    def copy_extras(self, out: Path) -> None:
        for f in COPIED:
            if (self.path / f).is_file():
                shutil.copy2(self.path / f, out / f)
