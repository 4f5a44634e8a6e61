"""Test helpers: tiny random Hugging Face models of each architecture, written to disk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5)

# name -> config overrides; together they cover every architecture feature minikv reads.
CASES = {
    "llama-gqa-tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama-mha-untied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=False),
    "llama-llama3-rope": dict(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama-linear-rope-bias": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 4.0},
                                   attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, head_dim=32),
    "qwen2-bias": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=24, num_attention_heads=8, num_key_value_heads=2),
    # head_dim 64: on the GPU this one runs the fused attention kernel
    "llama-hd64": dict(model_type="llama", hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2),
}


def make_hf_model(case: str, seed: int = 0, **overrides):
    """A random-weight HF model (float32, eval mode) whose logits are far from zero.

    HF's 0.02-std init gives near-constant logits that would hide errors, so weights are
    redrawn with larger scales; biases are large, like Qwen2's real k_proj biases.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**TINY, **CASES[case], **overrides}
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def save_hf_model(model, path: Path, dtype=None, max_shard_size=None) -> Path:
    import torch

    m = model.to(dtype) if dtype is not None else model
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    m.save_pretrained(path, **kw)
    if dtype is not None:
        model.to(torch.float32)
    return Path(path)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the scale of b."""
    return float(np.abs(a - b).max() / max(1e-6, np.abs(b).max()))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def minikv_logits(model, ids: np.ndarray, chunks=None, kv: str = "fp16") -> np.ndarray:
    """minikv's logits (host float32) for every position of `ids` (B, T), fed in chunks of the
    given sizes (one prefill if None) through a fresh cache."""
    from minikv.kv import make_cache

    cache = make_cache(kv, model.kv_geometry, ids.shape[0], max(256, ids.shape[1]), model.backend)
    out, t = [], 0
    for n in chunks or [ids.shape[1]]:
        out.append(model.backend.to_host(model.forward(ids[:, t:t + n], cache, logits="all")))
        t += n
    return np.concatenate(out, axis=1)
