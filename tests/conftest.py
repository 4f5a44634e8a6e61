"""Shared fixtures. Paths to ../shared resolve from the checkout root."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TEXT = SHARED / "text"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once into minikv's cache)."""
    from minikv.convert.fetch import fetch_smollm2_gguf

    return fetch_smollm2_gguf(log=lambda msg: None)


def _gpu_ready() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no cupy, no driver, no device: all mean "no GPU"
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct converted by minikv (the default model, converted once)."""
    from minikv.convert.default_model import default_model_dir

    return default_model_dir(log=lambda msg: None)
