"""The memory planner: before anything is allocated, does weights + KV cache + activations +
workspace fit the memory there is? If not, one line says what would.

Weights are counted from the checkpoint's tensor shapes in the compute dtype, the KV cache by its
method's own constructor (`cache_bytes`, nothing allocated), the activations from the shapes of
one forward pass of `ubatch` tokens over all rows (the largest live set: the MLP's), the workspace as a fixed
allowance plus what the method holds while it quantizes a prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import MinikvError
from .kv import KVGeometry, cache_bytes, parse_kv_spec
from .kv.attention import MAX_SCORES
from .kv.registry import method_class

WORKSPACE = {True: 512 << 20, False: 64 << 20}  # by backend.is_gpu: cuBLAS workspace, pool slack, scratch
FALLBACK_KV = "kivi:2"  # what a refusal suggests when the chosen cache does not fit


def size(n: int) -> str:
    """Bytes for people: GB with one decimal, MB below a gigabyte."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@dataclass(frozen=True)
class MemoryPlan:
    kv: str
    ctx: int
    batch: int
    weights: int
    kv_bytes: int
    activations: int
    workspace: int
    budget: int | None  # None: no limit known

    @property
    def total(self) -> int:
        return self.weights + self.kv_bytes + self.activations + self.workspace

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def describe(self) -> str:
        budget = "no limit" if self.budget is None else size(self.budget)
        return (f"memory plan: weights {size(self.weights)} + {self.kv} KV for {self.batch} x {self.ctx} tokens "
                f"{size(self.kv_bytes)} + activations {size(self.activations)} + workspace {size(self.workspace)} "
                f"= {size(self.total)} of {budget}")


def weight_bytes(shapes: dict[str, tuple[int, ...]], dtype) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()) * np.dtype(dtype).itemsize


def activation_bytes(cfg: ModelConfig, tokens: int, ctx: int, backend) -> int:
    """The most one forward pass of `tokens` tokens over a `ctx`-token cache holds at once: the
    float32 residual stream and normed input, then the MLP's gate|up output, its float32 SwiGLU
    temporaries and result (or the attention's q/k/v and their float32 RoPE temporaries, if more),
    plus the float32 logits of the last position (ops.py, models/llama.py); off the GPU, the
    reference attention's float32 scores and their exponentials (kv/attention.py)."""
    c, i, el = cfg.hidden_size, cfg.intermediate_size, backend.dtype.itemsize
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    per_token = c * (4 + 2 * el) + max(2 * i * el + 3 * i * 4 + i * el, qkv * (el + 2 * 4))
    scores = 0 if backend.is_gpu else 2 * 4 * min(MAX_SCORES, cfg.num_attention_heads * tokens * ctx)
    return tokens * per_token + cfg.vocab_size * 4 + scores


def plan(cfg: ModelConfig, weights: int, kv: str, ctx: int, ubatch: int, batch: int, backend,
         budget: int | None) -> MemoryPlan:
    geom = KVGeometry(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      cfg.attn_scale)
    spec = parse_kv_spec(kv)
    return MemoryPlan(str(spec), ctx, batch, weights, cache_bytes(spec, geom, batch, ctx, backend),
                      activation_bytes(cfg, min(ubatch, ctx * batch), ctx, backend),
                      WORKSPACE[backend.is_gpu] + method_class(spec).FIRST_FLUSH_BATCH_BYTES, budget)


def largest_ctx(cfg, weights, kv, ubatch, batch, backend, budget, limit: int) -> int:
    """The largest context (a multiple of 256, at most `limit`) whose plan fits; 0 if none does."""
    if budget is None or plan(cfg, weights, kv, limit, ubatch, batch, backend, budget).fits:
        return limit
    lo, hi = 0, limit // 256
    while lo < hi:  # the largest n with plan(256 n) fitting
        mid = (lo + hi + 1) // 2
        if plan(cfg, weights, kv, 256 * mid, ubatch, batch, backend, budget).fits:
            lo = mid
        else:
            hi = mid - 1
    return 256 * lo


def check(p: MemoryPlan, cfg, ubatch, backend, what: str) -> None:
    """One MinikvError saying what fits instead, if `p` does not fit."""
    if p.fits:
        return
    largest = largest_ctx(cfg, p.weights, p.kv, ubatch, p.batch, backend, p.budget, p.ctx)
    other = plan(cfg, p.weights, FALLBACK_KV, p.ctx, ubatch, p.batch, backend, p.budget)
    hints = []
    if p.kv != FALLBACK_KV and other.fits:
        hints.append(f"{FALLBACK_KV} fits {p.ctx} tokens ({size(other.kv_bytes)})")
    if largest:
        hints.append(f"{p.kv} fits {largest}")
    use = [f"--kv {FALLBACK_KV}"] * (p.kv != FALLBACK_KV and other.fits) + [f"-c {largest}"] * bool(largest)
    hint = ("; " + ", ".join(hints) + "; use " + " or ".join(use)) if use else \
        "; nothing fits: free memory, or raise --gpu-mem if more is free than was seen"
    raise MinikvError(f"{what} weights {size(p.weights)} + {p.kv} KV for {p.batch * p.ctx} tokens "
                      f"{size(p.kv_bytes)} + activations and workspace {size(p.activations + p.workspace)} "
                      f"> {size(p.budget)}{hint}")
