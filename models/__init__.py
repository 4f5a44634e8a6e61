"""Model architectures by HF `model_type`, and loading a model directory onto a backend."""
from __future__ import annotations

from pathlib import Path

from minikv.backend import Backend
from minikv.checkpoint import Checkpoint
from minikv.config import ModelConfig
from minikv.errors import MinikvError

from . import llama

# model_type -> (module with tensor_shapes(cfg), model class). Mistral and Qwen2/3 differ from
# Llama only in flags that ModelConfig derives (biases, q/k norm), so they share its code.
ARCHITECTURES = {
    "llama": (llama, llama.LlamaModel),
    "mistral": (llama, llama.LlamaModel),
    "qwen2": (llama, llama.LlamaModel),
    "qwen3": (llama, llama.LlamaModel),
}


def load_model(model_dir: str | Path, backend: Backend):
    """Read config.json, check every tensor, and build the model on `backend`."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MinikvError(f"{model_dir}: no such file or directory")
    if not model_dir.is_dir():
        hint = " (run `minikv convert` on it first)" if model_dir.suffix == ".gguf" else ""
        raise MinikvError(f"{model_dir}: not a model directory{hint}")
    cfg = ModelConfig.from_dir(model_dir)
    module, cls = ARCHITECTURES[cfg.model_type]
    ckpt = Checkpoint(model_dir)
    ckpt.check(module.tensor_shapes(cfg))
    return cls(cfg, backend, lambda name: ckpt.load(name, backend))
