"""Perplexity of a text as a real session sees it, for any KV cache method.

The first P tokens are one prefill (attending to each other in full precision); the rest is
fed in teacher-forced chunks that end where the cache flushes, so every query reads
quantized history + the fp16 window + its own chunk causally, exactly as decoding one token
at a time would (`chunked=False` does that, for checking).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import NON_FINITE, MinikvError
from .kv import make_cache, parse_kv_spec


@dataclass
class PerplexityResult:
    kv: str
    ppl: float
    tokens: int  # tokens scored (predicted)
    kv_bytes: int
    bits_per_value: float

    def as_dict(self) -> dict:
        return {"kv": self.kv, "ppl": round(self.ppl, 4), "tokens": self.tokens, "kv_bytes": self.kv_bytes,
                "bits_per_value": round(self.bits_per_value, 4)}


def _nll(xp, logits, targets):
    """logits (n, V) float32 on the device, targets (n,) host ints -> (n,) float32 NLL on the host."""
    m = logits.max(-1, keepdims=True)
    lse = xp.log(xp.exp(logits - m).sum(-1)) + m[:, 0]
    picked = logits[xp.arange(len(targets)), xp.asarray(targets)]
    out = lse - picked
    return out.get() if hasattr(out, "get") else np.asarray(out)


def windows(n_tokens: int, ctx: int, bos: int | None) -> list[tuple[int, int]]:
    """[start, end) spans of the text scored independently, `ctx` tokens each (llama-perplexity's
    chunks); every window after the first is scored behind a BOS when the model uses one, so it
    begins as a text does. Windows of fewer than 2 tokens score nothing and are dropped."""
    spans, t = [], 0
    while t < n_tokens:
        take = ctx if t == 0 or bos is None else ctx - 1
        spans.append((t, min(n_tokens, t + take)))
        t += take
    return [(a, b) for a, b in spans if b - a + (a > 0 and bos is not None) >= 2]


def perplexity(model, ids, kv: str = "fp16", prefill: int = 512, chunked: bool = True,
               cache=None, ctx: int | None = None, bos: int | None = None, ubatch: int | None = None,
               progress: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Score `ids` (host ints, BOS included if the tokenizer adds one) in windows of `ctx`
    tokens (default: the whole text, which must fit the model). The prefill is fed in pieces
    of `ubatch` tokens (default: one piece), as a session feeds a long prompt.
    `progress(tokens, ppl)` is called after each forward with the running totals."""
    ids = np.asarray(ids, dtype=np.int64)
    N = len(ids)
    if N < 2:
        raise MinikvError("the text is too short to score (fewer than 2 tokens)")
    ctx = ctx or N
    if ctx > model.cfg.max_position_embeddings:
        raise MinikvError(f"{ctx} tokens exceed the model's context of {model.cfg.max_position_embeddings}; "
                          f"score in windows with -c {model.cfg.max_position_embeddings} or fewer tokens")
    spec = parse_kv_spec(kv)
    cache = cache or make_cache(spec, model.kv_geometry, 1, ctx, model.backend)
    nll, kv_bytes, bits, total, count = [], None, None, 0.0, 0
    for a, b in windows(N, ctx, bos):
        cache.reset()
        w = ids[a:b] if a == 0 or bos is None else np.concatenate([[bos], ids[a:b]])
        for piece in _score(model, w, cache, max(1, prefill), ubatch or max(1, prefill), chunked):
            nll.append(piece)
            total, count = total + float(piece.sum(dtype=np.float64)), count + len(piece)
            if progress is not None:
                progress(count, math.exp(total / count))
        if kv_bytes is None:  # the first window is the longest: its footprint is the one reported
            kv_bytes, bits = cache.nbytes(), cache.bits_per_value()
    scored = np.concatenate(nll).astype(np.float64)
    if not np.isfinite(scored).all():
        raise MinikvError(NON_FINITE)
    return PerplexityResult(str(spec), math.exp(scored.mean()), len(scored), kv_bytes, bits)


def _score(model, ids, cache, prefill, ubatch, chunked):
    """Yield the NLL (host float32) of ids[1:] given what precedes each, forward by forward,
    fed as a session would."""
    xp, N, t = model.backend.xp, len(ids), 0
    while t < N - 1:  # the last token predicts nothing and is never fed
        if t < prefill:
            step = min(prefill - t, ubatch)
        else:
            step = cache.tokens_until_flush() if chunked else 1
        n = min(step, N - 1 - t)
        logits = model.forward(ids[None, t:t + n], cache, logits="all")[0]  # (n, V)
        yield _nll(xp, logits, ids[t + 1:t + 1 + n])  # positions t..t+n-1 predict t+1..t+n
        t += n
