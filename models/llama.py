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
        """Run `tokens` (int (B, T), host or device, rows right-padded to `n_new[b]` valid tokens)
        through the model, appending them to `cache`.

        Returns float32 logits on the device: (B, V) at each row's last valid token when
        logits="last", (B, T, V) for every position when logits="all", or None when
        logits="none" (a prompt's chunks before its last: the LM head is skipped).
        """
        if isinstance(tokens, (list, tuple)):
            tokens = np.asarray(tokens, dtype=np.int64)
        B, T = tokens.shape
        cache.begin_step(T if n_new is None else n_new)
        out = self.run(tokens, cache, logits)
        cache.end_step()
        return out

    def run(self, tokens, cache: KVCache, logits: str = "last"):
        """The device work of a forward whose step `cache` has begun (forward's arguments). It
        changes no host state beyond the cache's per-layer staging and reads positions from the
        device, so a decode step can be captured as a CUDA graph and replayed (engine.Stepper)."""
        cfg, ops, dt, eps, xp = self.cfg, self.ops, self.backend.dtype, self.cfg.rms_norm_eps, self.xp
        B, T = tokens.shape
        start = cache.start_dev.reshape(B, 1)  # (B, 1) int32 on the device
        rope = self.rope.step(start if T == 1 else start + xp.arange(T, dtype=np.int32)[None, :])
        with ops.forward_pass(B * T):
            x = ops.embed(self.embed, tokens)  # (B, T, C) float32 residual stream
            h = ops.rms_norm(x, self.layers[0].input_norm, eps, dt)
            for i, layer in enumerate(self.layers):
                # Residual adds are fused with the next RMSNorm: h is always norm(x) for what follows.
                h = ops.add_rms_norm(x, self._attention(i, layer, h, cache, rope), layer.post_norm, eps, dt)
                nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
                h = ops.add_rms_norm(x, self._mlp(layer, h), nxt, eps, dt)
            if logits == "none":
                return None
            if logits == "last":  # (B, C) at each row's last valid token
                h = h[:, 0] if T == 1 else h[xp.arange(B), xp.asarray(cache.n_new - 1)]
            return ops.linear(h, self.lm_head).astype(np.float32)

    def _attention(self, i, L: Layer, h, cache, rope):
        """Self-attention branch of layer i on the normed input h (B, T, C) -> (B, T, C)."""
        cfg, ops = self.cfg, self.ops
        B, T, _ = h.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = ops.linear(h, L.qkv_w, L.qkv_b)  # (B, T, (H + 2 Hkv) D)
        q, k, v = ops.qkv_heads(qkv, rope, H, Hkv, D, L.q_norm, L.k_norm, cfg.rms_norm_eps)
        cache.update(i, k, v)  # k, v (B, Hkv, T, D) post-RoPE
        o = cache.attend(i, q)  # (B, H, T, D)
        cache.commit(i)  # after attention: a step sees its own tokens unquantized
        return ops.linear(o.transpose(0, 2, 1, 3).reshape(B, T, H * D), L.o_w, L.o_b)

    def _mlp(self, L: Layer, h):
        gu = self.ops.linear(h, L.gate_up_w, L.gate_up_b)  # (B, T, 2 I)
        return self.ops.linear(self.ops.swiglu(gu), L.down_w, L.down_b)
