"""A generation session: one model, its tokenizer and a KV cache holding a token history.

The session owns the cache (the model only receives it) and reuses whatever prefix of a
new prompt the cache already holds, so a chat turn only prefills what is new.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import NON_FINITE, MinikvError
from .kv import make_cache, parse_kv_spec
from .sampler import Sampler, SamplingParams
from .stepper import Stepper
from .tokenizer import TextStream, Tokenizer


@dataclass
class Timings:
    prompt_tokens: int = 0  # tokens actually prefilled (a reused prefix is not counted)
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0

    def as_dict(self) -> dict:
        rate = lambda n, s: round(n / s, 2) if s > 0 else None  # noqa: E731
        return {"prompt_tokens": self.prompt_tokens, "prompt_s": round(self.prompt_s, 4),
                "prompt_tokens_per_s": rate(self.prompt_tokens, self.prompt_s),
                "gen_tokens": self.gen_tokens, "gen_s": round(self.gen_s, 4),
                "gen_tokens_per_s": rate(self.gen_tokens, self.gen_s)}

    def add(self, other: "Timings") -> None:
        """Accumulate another run's timings (a chat's turns)."""
        self.prompt_tokens += other.prompt_tokens
        self.prompt_s += other.prompt_s
        self.gen_tokens += other.gen_tokens
        self.gen_s += other.gen_s

    def summary(self) -> str:
        d = self.as_dict()
        return (f"prompt: {d['prompt_tokens']} tokens, {d['prompt_tokens_per_s']} tokens/s | "
                f"generation: {d['gen_tokens']} tokens, {d['gen_tokens_per_s']} tokens/s")


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""  # eos | stop | length | context | interrupted
    timings: Timings = field(default_factory=Timings)


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts at the first match."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def default_ubatch(backend) -> int:
    """llama.cpp's physical batch on the CPU; larger on a GPU, where a prompt piece of 2048 tokens
    still keeps an 8B model's activations under a gigabyte."""
    return 2048 if backend.is_gpu else 512


class Session:
    def __init__(self, model, tokenizer: Tokenizer, kv: str = "fp16", ctx_size: int | None = None,
                 ubatch: int | None = None, graphs: bool = True):
        """ubatch: the most tokens one forward takes; a longer prompt is fed in chunks of it, so
        its activations do not grow with it (default: 2048 on the GPU, 512 on the CPU).
        graphs: replay decode steps from CUDA graphs on the GPU (False: --no-graph)."""
        self.model, self.tok = model, tokenizer
        self.backend = model.backend
        cfg = model.cfg
        ctx = min(cfg.max_position_embeddings, 4096) if ctx_size is None else ctx_size
        if ctx < 0:
            raise MinikvError(f"--ctx-size {ctx}: use a number of tokens, or 0 for the model's maximum "
                              f"({cfg.max_position_embeddings})")
        ctx = ctx or cfg.max_position_embeddings
        if ctx > cfg.max_position_embeddings:
            raise MinikvError(f"--ctx-size {ctx} exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings})")
        if cfg.sliding_window and ctx > cfg.sliding_window:
            raise MinikvError(f"--ctx-size {ctx} exceeds the model's sliding window ({cfg.sliding_window}), "
                              "which minikv does not implement; use --ctx-size "
                              f"{cfg.sliding_window} or less")
        self.ctx_size = ctx
        if ubatch is not None and ubatch < 1:
            raise MinikvError(f"--ubatch-size {ubatch}: use 1 or more tokens")
        self.ubatch = ubatch or default_ubatch(self.backend)
        self.cache = make_cache(parse_kv_spec(kv), model.kv_geometry, 1, ctx, self.backend)
        self.stepper = Stepper(model, self.cache, self.ubatch, graphs)
        self.readback = self.backend.readback()  # drawn ids to the host, one step behind the GPU
        self.tokens: list[int] = []  # ids whose keys/values the cache holds

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    def feed(self, ids: list[int]):
        """Append ids to the cache; returns the float32 logits (V,) after the last one."""
        if len(self.tokens) + len(ids) > self.ctx_size:
            raise MinikvError(f"the prompt needs {len(self.tokens) + len(ids)} tokens but the context "
                              f"holds {self.ctx_size}; shorten it or raise --ctx-size")
        logits = self.stepper.feed(np.asarray([ids]))
        self.tokens.extend(ids)
        return logits[0]

    def prefill(self, ids: list[int]):
        """Make the cache hold exactly `ids`, reusing the longest prefix it already holds."""
        if not ids:
            raise MinikvError("the prompt is empty")
        n = 0
        for a, b in zip(self.tokens, ids[:-1]):  # keep at least one token to produce logits
            if a != b:
                break
            n += 1
        if n < len(self.tokens):
            if self.cache.can_truncate(n):
                self.cache.truncate(n)
                self.tokens = self.tokens[:n]
            else:
                self.reset()
                n = 0
        return self.feed(ids[n:]), len(ids) - n

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int = -1,
                 stop: tuple[str, ...] = (), should_stop: Callable[[], bool] = lambda: False,
                 result: Result | None = None, ignore_eos: bool = False) -> Iterator[str]:
        """Stream the text of a continuation of `prompt_ids`; details land in `result`."""
        res = result if result is not None else Result()
        t0 = time.perf_counter()
        logits, res.timings.prompt_tokens = self.prefill(prompt_ids)
        self.backend.synchronize()
        t1 = time.perf_counter()
        res.timings.prompt_s = t1 - t0
        sampler = Sampler(params, self.backend.xp)
        stream, stops = TextStream(self.tok, prompt_ids), StopStrings(stop)
        history = list(prompt_ids)
        res.stop_reason = "length"
        drawn = sampler(logits, history)  # a device scalar id
        ticket = self.readback.start(drawn)
        # Pipelined (no penalties: a draw does not need the previous id on the host): the step
        # feeding a drawn id is queued before the id is read, so the GPU runs it while the host
        # reads, checks and prints the id (whose copy was queued before that step). When the id
        # ends the text, that step was spent, and the cache holds the id (self.tokens says so).
        ahead = not params.penalized
        while max_tokens < 0 or len(res.token_ids) < max_tokens:
            fed = ahead and (max_tokens < 0 or len(res.token_ids) + 1 < max_tokens) and len(self.tokens) < self.ctx_size
            if fed:
                following = sampler(self.stepper.decode(drawn.reshape(1))[0], history)
                following_ticket = self.readback.start(following)
            token = int(self.readback.wait(ticket))  # the one device -> host transfer per token
            if fed:
                self.tokens.append(token)
            if token < 0:
                raise MinikvError(NON_FINITE)
            if token in self.tok.eos_ids and not ignore_eos:
                res.stop_reason = "eos"
                break
            history.append(token)
            res.token_ids.append(token)
            text, hit = stops.feed(stream.push(token))
            if text:
                res.text += text
                yield text
            if hit:
                res.stop_reason = "stop"
                break
            if should_stop():
                res.stop_reason = "interrupted"
                break
            if max_tokens >= 0 and len(res.token_ids) >= max_tokens:
                break
            if not fed and len(self.tokens) >= self.ctx_size:
                res.stop_reason = "context"
                break
            if fed:
                drawn, ticket = following, following_ticket
            else:
                drawn = sampler(self.feed([token]), history)
                ticket = self.readback.start(drawn)
        if res.stop_reason != "stop":
            tail = stops.flush()
            if tail:
                res.text += tail
                yield tail
        res.timings.gen_tokens = len(res.token_ids)
        res.timings.gen_s = time.perf_counter() - t1
        return res
