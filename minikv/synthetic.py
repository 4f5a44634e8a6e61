"""Random-weight models of real shapes, built directly on the device (for benchmarks: speed
does not depend on weight values, and big checkpoints cannot travel to the GPU machine)."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig, RopeConfig

SHAPES = {
    # name: (hidden, ffn, layers, heads, kv heads, head_dim, vocab, max positions)
    "smollm2-135m": (576, 1536, 30, 9, 3, 64, 49152, 8192),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, 131072),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 128, 152064, 131072),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, 131072),
}


def synthetic_config(name: str) -> ModelConfig:
    C, I, L, H, Hkv, D, V, P = SHAPES[name]
    return ModelConfig(model_type="qwen2" if name.startswith("qwen") else "llama", vocab_size=V,
                       hidden_size=C, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=Hkv, head_dim=D, rms_norm_eps=1e-5, max_position_embeddings=P,
                       rope=RopeConfig(theta=500000.0), tie_word_embeddings=name.startswith("smollm"),
                       attention_bias=name.startswith("qwen"))


def synthetic_model(shape, backend, seed: int = 0):
    """A model of the named shape (or of a ModelConfig) with N(0, 1/fan_in) weights (unit-scale
    activations)."""
    from minikv.models import ARCHITECTURES, llama  # noqa: F401  (models sit above this module)

    cfg = synthetic_config(shape) if isinstance(shape, str) else shape
    module, cls = ARCHITECTURES[cfg.model_type]
    shapes = module.tensor_shapes(cfg)
    xp = backend.xp
    rng = np.random.default_rng(seed) if xp is np else xp.random.RandomState(seed)  # both take dtype=

    def get(n):
        shape = shapes[n]
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(backend.dtype)
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(backend.dtype)

    return cls(cfg, backend, get)
