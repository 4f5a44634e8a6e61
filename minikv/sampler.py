"""Token sampling on the device: one chosen token id is all that crosses to the host.

Chain (as llama.cpp): repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
top-p and min-p act on the untempered distribution; temperature 0 means greedy.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .errors import MinikvError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalties look at (-1: all)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each recent token's logit
    frequency_penalty: float = 0.0  # and this times how often it occurred
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise MinikvError(f"--temp {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise MinikvError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise MinikvError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise MinikvError(f"--min-p {self.min_p}: must be in [0, 1)")
        if self.repeat_penalty <= 0:
            raise MinikvError(f"--repeat-penalty {self.repeat_penalty}: must be > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a draw reads the token history (repetition, presence or frequency penalty)."""
        return self.repeat_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)


class Sampler:
    def __init__(self, params: SamplingParams, xp):
        self.p, self.xp = params, xp
        # The uniform draw comes from the host RNG (a scalar kernel argument, no transfer), so
        # a seed gives the same stream on CPU and GPU.
        self.rng = np.random.default_rng(params.seed)
        self.kernel = None  # on the GPU the draw is one kernel (minikv/cuda/sample.py) where top-k bounds it
        if xp is not np:
            from .cuda import sample

            self.kernel = sample

    def __call__(self, logits, history: list[int]):
        """logits: (V,) float32 on the device; history: ids so far. Returns a device scalar id,
        or -1 if the logits are not all finite (checked on the device: no extra transfer)."""
        token, checked = self._draw(logits, history)
        return token if checked else self.xp.where(self.xp.isfinite(logits.max()), token, -1)

    def _draw(self, logits, history: list[int]):
        """(the id, whether the finiteness check is done already)."""
        xp, p = self.xp, self.p
        if p.penalized and history:
            recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
            uniq, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
            ids = xp.asarray(uniq)
            seen = logits[ids]
            logits = logits.copy()
            seen = xp.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
            penalty = p.presence_penalty + p.frequency_penalty * counts.astype(np.float32)  # llama.cpp's order
            logits[ids] = seen - xp.asarray(penalty, dtype=np.float32)
        if p.greedy:
            return xp.argmax(logits), False
        V = logits.shape[0]
        if self.kernel is not None and self.kernel.supports(V, p.top_k):
            u = self.rng.random()
            try:
                return self.kernel.sample_top(xp.ascontiguousarray(logits, dtype=np.float32), p.top_k, p.top_p,
                                              p.min_p, p.temperature, u, xp.empty(1, np.int32)), True
            except Exception as e:  # the kernel does not build or launch here: say so once, draw with array ops
                self.kernel = None
                print(f"minikv: warning: the sampling kernel failed ({type(e).__name__}: {e}); "
                      "sampling with array ops", file=sys.stderr)
                return self._chain(logits, u), False
        return self._chain(logits, self.rng.random()), False

    def _chain(self, logits, u: float):
        """top-k -> top-p -> min-p -> temperature -> the draw with uniform u, in array ops."""
        xp, p = self.xp, self.p
        V = logits.shape[0]
        if 0 < p.top_k < V:
            cand = xp.argpartition(-logits, p.top_k - 1)[:p.top_k]  # (k,) unordered
        else:
            cand = xp.arange(V)
        order = xp.argsort(-logits[cand])
        cand = cand[order]  # (k,) by descending logit
        lg = logits[cand]
        probs = xp.exp(lg - lg[0])
        probs /= probs.sum()
        keep = xp.ones(cand.shape[0], dtype=bool)
        if p.top_p < 1.0:  # smallest prefix whose mass reaches top_p (always >= 1 token)
            keep &= (xp.cumsum(probs) - probs) < p.top_p
        if p.min_p > 0.0:
            keep &= probs >= p.min_p * probs[0]
        w = xp.where(keep, xp.exp((lg - lg[0]) / p.temperature), 0.0)
        c = xp.cumsum(w)
        i = xp.searchsorted(c, c[-1:] * u, side="right")[0]
        return cand[xp.minimum(i, cand.shape[0] - 1)]
