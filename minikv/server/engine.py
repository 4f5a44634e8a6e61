"""The server's engine: one thread owns the model and a cache of N slots (one batch row each)
and runs continuous batching. Each turn of its loop it admits queued jobs into free slots,
feeds a piece of every pending prompt (all pending slots in one forward of at most `ubatch`
tokens), then runs one decode step for every generating slot together; a job leaves its slot the moment it ends
or its client goes away. A slot keeps the tokens its row holds after its job, so a follow-up
turn of the same conversation, given the slot with the longest shared prefix, prefills only
what is new.

HTTP never blocks on it: jobs come in through `submit` (bounded), results go out through each
job's `emit` callback (called on this thread; the HTTP side hands them to its event loop).
"""
from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import NON_FINITE, MinikvError
from ..generate import StopStrings
from ..kv import make_cache
from ..sampler import Sampler, SamplingParams
from ..stepper import Stepper
from ..tokenizer import TextStream


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int  # -1: until EOS or the slot's context is full
    emit: Callable[[str, object], None]  # ("text", str), then ("done", Finish) or ("error", str)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    cancelled: bool = False  # set by the HTTP side when its client goes away


@dataclass
class Finish:
    reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens the slot already held


@dataclass
class Slot:
    tokens: list[int] = field(default_factory=list)  # ids the slot's cache row holds
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt ids still to prefill
    next_token: int | None = None  # sampled, to be fed by the next decode step
    sampler: Sampler | None = None
    stream: TextStream | None = None
    stops: StopStrings | None = None
    history: list[int] = field(default_factory=list)
    n_gen: int = 0
    cached: int = 0


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue: int = 0
    busy: int = 0
    kv_bytes: int = 0
    bits_per_value: float = 0.0


class Engine:
    def __init__(self, model, tokenizer, kv: str, slots: int, ctx: int, ubatch: int, queue_size: int = 64,
                 graphs: bool = True):
        self.model, self.tok, self.ctx, self.ubatch, self.queue_size = model, tokenizer, ctx, ubatch, queue_size
        self.cache = make_cache(kv, model.kv_geometry, slots, ctx, model.backend)
        self.stepper = Stepper(model, self.cache, ubatch, graphs)
        self.slots = [Slot() for _ in range(slots)]
        self.queue: deque[Job] = deque()
        self.cv = threading.Condition()
        self.stats = Stats()
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="minikv-engine", daemon=True)

    # -- the HTTP side -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when every slot is taken and queue_size jobs already wait (the
        caller answers 429)."""
        with self.cv:
            if len(self.queue) >= self.queue_size + sum(s.job is None for s in self.slots):
                return False
            self.queue.append(job)
            self.stats.requests += 1
            self.stats.queue = len(self.queue)
            self.cv.notify()
            return True

    def stop(self) -> None:
        with self.cv:
            self._stopping = True
            self.cv.notify()
        self.thread.join()

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._stopping and not self.queue and not any(s.job for s in self.slots):
                    self.cv.wait()
                if self._stopping:
                    return
                self._admit()
            try:
                self._turn()
            except Exception as e:  # noqa: BLE001 - one failing step must not take the engine down
                msg = str(e) if isinstance(e, MinikvError) else f"internal error: {type(e).__name__}: {e}"
                if not isinstance(e, MinikvError):
                    traceback.print_exc(file=sys.stderr)
                for b, s in enumerate(self.slots):
                    if s.job is not None:
                        s.job.emit("error", msg)
                    self._free(b, forget=True)
                self.cache.reset()  # a step cut short may have left any row half-written

    def _admit(self) -> None:
        """Queued jobs into free slots, each into the free slot sharing the longest prefix."""
        free = [b for b, s in enumerate(self.slots) if s.job is None]
        while self.queue and free:
            job = self.queue.popleft()
            if job.cancelled:
                continue
            b = max(free, key=lambda i: common_prefix(self.slots[i].tokens, job.prompt))
            free.remove(b)
            s = self.slots[b]
            n = common_prefix(s.tokens, job.prompt[:-1])  # at least one token to prefill: its logits
            if n < len(s.tokens):
                if self.cache.can_truncate(n, b):
                    self.cache.truncate(n, b)
                else:
                    self.cache.reset(b)
                    n = 0
                s.tokens = s.tokens[:n]
            s.job, s.pending, s.cached, s.n_gen, s.next_token = job, job.prompt[n:], n, 0, None
            s.sampler = Sampler(job.params, self.model.xp)
            s.stream, s.stops, s.history = TextStream(self.tok, job.prompt), StopStrings(job.stop), list(job.prompt)
            self.stats.prompt_tokens += len(job.prompt)
        self.stats.queue = len(self.queue)
        self.stats.busy = sum(s.job is not None for s in self.slots)

    def _turn(self) -> None:
        for b, s in enumerate(self.slots):
            if s.job is not None and s.job.cancelled:
                self._free(b)
        self._prefill()
        self._decode()
        self.stats.kv_bytes = self.cache.nbytes()  # once per turn: bits/value from the same count
        n = self.cache.n_values()
        self.stats.bits_per_value = 8.0 * self.stats.kv_bytes / n if n else 0.0

    def _prefill(self) -> None:
        """A piece of every pending prompt in one forward over the rows from the first pending
        slot to the last (a row view of the cache: idle slots outside it cost nothing), the
        pieces of ubatch / rows tokens, so one slot's prompt alone goes ubatch tokens at a time."""
        rows = [b for b, s in enumerate(self.slots) if s.job is not None and s.pending]
        if not rows:
            return
        b0, b1 = rows[0], rows[-1] + 1
        piece = max(1, self.ubatch // (b1 - b0))
        pieces = {b: self.slots[b].pending[:piece] for b in rows}
        T = max(len(p) for p in pieces.values())
        ids, n_new = np.zeros((b1 - b0, T), np.int64), np.zeros(b1 - b0, np.int64)
        for b, p in pieces.items():
            ids[b - b0, :len(p)], n_new[b - b0] = p, len(p)
        done = [b for b in rows if len(pieces[b]) == len(self.slots[b].pending)]
        with self.cache.row_range(b0, b1) as view:
            logits = self.model.forward(ids, view, n_new=n_new, logits="last" if done else "none")
        for b, p in pieces.items():
            s = self.slots[b]
            s.tokens.extend(p)
            s.pending = s.pending[len(p):]
        self._sampled(done, logits, b0)

    def _decode(self) -> None:
        rows = [b for b, s in enumerate(self.slots) if s.next_token is not None]
        if not rows:
            return
        tokens, n_new = np.zeros(len(self.slots), np.int64), np.zeros(len(self.slots), np.int64)
        for b in rows:
            tokens[b], n_new[b] = self.slots[b].next_token, 1
        logits = self.stepper.decode(tokens, n_new)
        for b in rows:
            s = self.slots[b]
            s.tokens.append(s.next_token)
            s.next_token = None
        self._sampled(rows, logits)

    def _sampled(self, rows: list[int], logits, b0: int = 0) -> None:
        """Draw the next token of each slot in rows from logits[b - b0] and hand it to its job.
        Greedy slots without penalties take one argmax over their rows, the others their own
        sampler's draw; the ids then cross to the host in one transfer."""
        xp = self.model.xp
        plain = [b for b in rows if self.slots[b].sampler.p.greedy and not self.slots[b].sampler.p.penalized]
        others = [b for b in rows if b not in plain]
        ids = []
        if plain:
            lg = logits[xp.asarray([b - b0 for b in plain])]  # (n, V)
            ids.append(xp.where(xp.isfinite(lg.max(axis=-1)), lg.argmax(axis=-1), -1))  # -1: not finite, as Sampler
        if others:  # each a device scalar: no transfer until all are drawn
            ids.append(xp.stack([xp.asarray(self.slots[b].sampler(logits[b - b0], self.slots[b].history), np.int64)
                                 for b in others]))
        if not ids:
            return
        drawn = self.model.backend.to_host(xp.concatenate(ids) if len(ids) > 1 else ids[0]).tolist()
        for b, token in zip(plain + others, drawn):
            self._accept(b, token)

    def _accept(self, b: int, token: int) -> None:
        """Slot b drew `token`: stream it, or end the job."""
        s = self.slots[b]
        if token < 0:
            raise MinikvError(NON_FINITE)
        if token in self.tok.eos_ids and not s.job.ignore_eos:
            return self._finish(b, "stop")
        s.history.append(token)
        s.n_gen += 1
        self.stats.generated_tokens += 1
        text, hit = s.stops.feed(s.stream.push(token))
        if text:
            s.job.emit("text", text)
        if hit:
            return self._finish(b, "stop", flush=False)
        if s.n_gen == s.job.max_tokens or len(s.tokens) >= self.ctx:
            return self._finish(b, "length")
        s.next_token = token

    def _finish(self, b: int, reason: str, flush: bool = True) -> None:
        s, job = self.slots[b], self.slots[b].job
        tail = s.stops.flush() if flush else ""
        if tail:
            job.emit("text", tail)
        done = Finish(reason, len(job.prompt), s.n_gen, s.cached)
        self._free(b)  # the slot is free (and /metrics says so) before the client hears it is done
        job.emit("done", done)

    def _free(self, b: int, forget: bool = False) -> None:
        """Slot b takes no more steps; its row keeps its tokens for a later prefix unless `forget`."""
        s = self.slots[b]
        s.job, s.pending, s.next_token, s.sampler, s.stream, s.stops = None, [], None, None, None, None
        self.stats.busy = sum(s.job is not None for s in self.slots)  # before the job's client can ask
        if forget:
            self.cache.reset(b)
            s.tokens = []


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
