"""Model architectures by HF `model_type`, and loading a model directory onto a backend."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def expected_tensors(cfg: ModelConfig, n_tensors: int, where) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor the config implies, for a file holding `n_tensors`: a
    config claiming more layers than there are tensors is refused before the list is built
    (a corrupt num_hidden_layers of 10**12 would otherwise take forever)."""
    if cfg.num_hidden_layers > n_tensors:
        raise MinikvError(f"{where}: the config says {cfg.num_hidden_layers} layers but the checkpoint holds "
                          f"only {n_tensors} tensors; the files do not belong together or are corrupt")
    return ARCHITECTURES[cfg.model_type][0].tensor_shapes(cfg)


@dataclass(frozen=True)
class ModelFiles:
    """A model directory opened and checked (config, every tensor's presence and shape), before
    anything is loaded: enough to plan memory."""
    dir: Path
    cfg: ModelConfig
    ckpt: Checkpoint
    shapes: dict[str, tuple[int, ...]]


def open_model(model_dir: str | Path) -> ModelFiles:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MinikvError(f"{model_dir}: no such file or directory")
    if not model_dir.is_dir():
        hint = " (run `minikv convert` on it first)" if model_dir.suffix == ".gguf" else ""
        raise MinikvError(f"{model_dir}: not a model directory{hint}")
    cfg = ModelConfig.from_dir(model_dir)
    ckpt = Checkpoint(model_dir)
    shapes = expected_tensors(cfg, len(ckpt.files), model_dir)
    ckpt.check(shapes)
    return ModelFiles(model_dir, cfg, ckpt, shapes)


def build_model(files: ModelFiles, backend: Backend, progress: Callable[[int, int], None] = lambda done, total: None):
    """The model on `backend`; `progress(bytes_loaded, bytes_total)` is called after each tensor."""
    ckpt = files.ckpt
    size = {n: ckpt.files[n].raw(n).nbytes for n in files.shapes}  # views of the mapped files: nothing is read
    total, done = sum(size.values()), 0

    def get(name):
        nonlocal done
        t = ckpt.load(name, backend)
        done += size[name]
        progress(done, total)
        return t

    return ARCHITECTURES[files.cfg.model_type][1](files.cfg, backend, get)


def load_model(model_dir: str | Path, backend: Backend, progress: Callable[[int, int], None] = lambda done, total: None):
    """Read config.json, check every tensor, and build the model on `backend`."""
    return build_model(open_model(model_dir), backend, progress)
