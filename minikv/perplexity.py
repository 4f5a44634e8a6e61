"""Perplexity of a text as a real session sees it, for any KV cache method.

The first P tokens are one prefill (attending to each other in full precision); the rest is
fed in teacher-forced chunks that end where the cache flushes, so every query reads
quantized history + the fp16 window + its own chunk causally, exactly as decoding one token
at a time would (`chunked=False` does that, for checking).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinikvError
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


def perplexity(model, ids, kv: str = "fp16", prefill: int = 512, chunked: bool = True,
               cache=None) -> PerplexityResult:
    """Score `ids` (host ints, BOS included if the tokenizer adds one)."""
    ids = np.asarray(ids, dtype=np.int64)
    N = len(ids)
    if N < 2:
        raise MinikvError("the text is too short to score (fewer than 2 tokens)")
    if N > model.cfg.max_position_embeddings:
        raise MinikvError(f"{N} tokens exceed the model's context of {model.cfg.max_position_embeddings}; "
                          "use --max-tokens")
    spec = parse_kv_spec(kv)
    cache = cache or make_cache(spec, model.kv_geometry, 1, N, model.backend)
    xp = model.backend.xp
    nll = []
    t = 0
    while t < N - 1:  # the last token predicts nothing and is never fed
        step = max(1, prefill) if t == 0 else (cache.tokens_until_flush() if chunked else 1)
        n = min(step, N - 1 - t)
        logits = model.forward(ids[None, t:t + n], cache, logits="all")[0]  # (n, V)
        nll.append(_nll(xp, logits, ids[t + 1:t + 1 + n]))  # positions t..t+n-1 predict t+1..t+n
        t += n
    total = np.concatenate(nll).astype(np.float64)
    return PerplexityResult(str(spec), math.exp(total.mean()), len(total), cache.nbytes(), cache.bits_per_value())
