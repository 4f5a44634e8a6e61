"""The Llama-family decoder: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm).

One code path for NumPy and CuPy (`backend.xp`); weights keep their HF names on disk and
are fused on load (q|k|v and gate|up) so each layer runs four matmuls. The residual
stream is float32; matmul inputs and outputs are in the backend dtype (fp16 on the GPU,
where cuBLAS accumulates in float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from minikv.backend import Backend
from minikv.config import ModelConfig
from minikv.kv.base import KVCache, KVGeometry

from .rope import Rope

Array = Any


@dataclass
class Layer:
    input_norm: Array  # (C,)
    qkv_w: Array  # ((H + 2 Hkv) D, C)
    qkv_b: Array | None  # ((H + 2 Hkv) D,)
    q_norm: Array | None  # (D,) Qwen3
    k_norm: Array | None  # (D,) Qwen3
    o_w: Array  # (C, H D)
    o_b: Array | None
    post_norm: Array  # (C,)
    gate_up_w: Array  # (2 I, C)
    gate_up_b: Array | None
    down_w: Array  # (C, I)
    down_b: Array | None


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the checkpoint must hold, with its shape."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, C)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (qd, C), p + "self_attn.k_proj.weight": (kvd, C),
            p + "self_attn.v_proj.weight": (kvd, C), p + "self_attn.o_proj.weight": (C, qd),
            p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
            p + "mlp.down_proj.weight": (C, I),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (qd,), p + "self_attn.k_proj.bias": (kvd,),
                           p + "self_attn.v_proj.bias": (kvd,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (C,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,),
                           p + "mlp.down_proj.bias": (C,)})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return shapes


class LlamaModel:
    def __init__(self, cfg: ModelConfig, backend: Backend, get: Callable[[str], Array]):
        """`get(name)` returns one HF tensor already on the device in the backend dtype."""
        self.cfg, self.backend, self.xp, self.ops = cfg, backend, backend.xp, backend.ops
        xp = self.xp
        self.embed = get("model.embed_tokens.weight")  # (V, C)
        self.norm = get("model.norm.weight")  # (C,)
        self.lm_head = self.embed if cfg.tie_word_embeddings else get("lm_head.weight")  # (V, C)

        def opt(name, on):
            return get(name) if on else None

        def cat(*names, on=True):
            return xp.concatenate([get(n) for n in names], axis=0) if on else None

        self.layers = []
        for i in range(cfg.num_hidden_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            self.layers.append(Layer(
                input_norm=get(f"model.layers.{i}.input_layernorm.weight"),
                qkv_w=cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                qkv_b=cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias", on=cfg.attention_bias),
                q_norm=opt(a + "q_norm.weight", cfg.qk_norm),
                k_norm=opt(a + "k_norm.weight", cfg.qk_norm),
                o_w=get(a + "o_proj.weight"),
                o_b=opt(a + "o_proj.bias", cfg.o_bias),
                post_norm=get(f"model.layers.{i}.post_attention_layernorm.weight"),
                gate_up_w=cat(m + "gate_proj.weight", m + "up_proj.weight"),
                gate_up_b=cat(m + "gate_proj.bias", m + "up_proj.bias", on=cfg.mlp_bias),
                down_w=get(m + "down_proj.weight"),
                down_b=opt(m + "down_proj.bias", cfg.mlp_bias),
            ))
        self.rope = Rope(cfg.rope, cfg.head_dim, xp)
        self.kv_geometry = KVGeometry(cfg.num_hidden_layers, cfg.num_attention_heads,
                                      cfg.num_key_value_heads, cfg.head_dim, cfg.attn_scale)

    def forward(self, tokens, cache: KVCache, n_new=None, logits: str = "last"):
        """Run `tokens` (host int (B, T), rows right-padded to `n_new[b]` valid tokens)
        through the model, appending them to `cache`.

        Returns float32 logits on the device: (B, V) at each row's last valid token when
        logits="last", or (B, T, V) for every position when logits="all".
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        B, T = tokens.shape
        n_new = np.full(B, T, dtype=np.int64) if n_new is None else np.asarray(n_new, dtype=np.int64)
        start = cache.begin_step(n_new)  # (B,) position of each row's first new token
        cos, sin = self.rope.cos_sin(start[:, None] + np.arange(T)[None, :])  # (B, 1, T, D)
        x = self.embed[self.xp.asarray(tokens)].astype(np.float32)  # (B, T, C) residual stream
        for i, layer in enumerate(self.layers):
            x = self._attention_block(i, layer, x, cache, cos, sin)
            x = self._mlp_block(layer, x)
        cache.end_step()
        if logits == "last":
            x = x[self.xp.arange(B), self.xp.asarray(n_new - 1)]  # (B, C)
        h = self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps, self.backend.dtype)
        return self.ops.linear(h, self.lm_head).astype(np.float32)

    def _attention_block(self, i, L: Layer, x, cache, cos, sin):
        cfg, ops, dt = self.cfg, self.ops, self.backend.dtype
        B, T, _ = x.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = ops.rms_norm(x, L.input_norm, cfg.rms_norm_eps, dt)  # (B, T, C)
        qkv = ops.linear(h, L.qkv_w, L.qkv_b)  # (B, T, (H + 2 Hkv) D)
        q = qkv[..., :H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        v = qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        if cfg.qk_norm:
            q = ops.rms_norm(q, L.q_norm, cfg.rms_norm_eps, dt)
            k = ops.rms_norm(k, L.k_norm, cfg.rms_norm_eps, dt)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        cache.update(i, k, v)
        o = cache.attend(i, q)  # (B, H, T, D)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        return ops.add_(x, ops.linear(o, L.o_w, L.o_b))

    def _mlp_block(self, L: Layer, x):
        h = self.ops.rms_norm(x, L.post_norm, self.cfg.rms_norm_eps, self.backend.dtype)
        gu = self.ops.linear(h, L.gate_up_w, L.gate_up_b)  # (B, T, 2 I)
        return self.ops.add_(x, self.ops.linear(self.ops.swiglu(gu), L.down_w, L.down_b))
