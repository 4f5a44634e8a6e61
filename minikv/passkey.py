"""Passkey retrieval: a number hidden at a given depth of filler text, asked for at the end.

Perplexity averages over every token and hides a cache that loses one fact far back; this asks
for exactly such a fact. The prompt (the classic one of the passkey tests): an instruction,
filler sentences, the needle at `depth` (a fraction of the filler) and the question; the
answer is greedy, and counts when its first number is the key.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .generate import Result, Session
from .sampler import SamplingParams

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8


def min_length(tok) -> int:
    """The shortest prompt with some filler: the fixed parts and one filler unit."""
    return len(passkey_prompt(tok, 1 << 20, 0.0, 99999, reps=1))


def passkey_prompt(tok, n_tokens: int, depth: float, key: int, reps: int | None = None) -> list[int]:
    """About n_tokens ids (never more): INTRO, filler with the needle after `depth` of it (on a
    sentence boundary of the filler), QUESTION."""
    intro, filler = tok.encode(INTRO), tok.encode(FILLER, add_special_tokens=False)
    needle = tok.encode(NEEDLE.format(key=key), add_special_tokens=False)
    question = tok.encode(QUESTION, add_special_tokens=False)
    if reps is None:  # as many filler units as fit
        reps = (n_tokens - len(intro) - len(needle) - len(question)) // len(filler)
    at = round(depth * reps)
    return intro + filler * at + needle + filler * (reps - at) + question


@dataclass
class PasskeyRow:
    kv: str
    length: int  # prompt tokens asked for
    found: int = 0
    tried: int = 0
    answers: list = field(default_factory=list)  # (depth, key, answer text) per trial

    def as_dict(self) -> dict:
        return asdict(self)


def answer_number(text: str) -> int | None:
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else None


def passkey(model, tok, kv: str, lengths, depths, trials: int = 1, seed: int = 0, ubatch=None,
            graphs: bool = True, progress=lambda: None) -> list[PasskeyRow]:
    """For each length: the trials (one per depth and repeat, a fresh random 5-digit key each)
    whose greedy answer begins with the key. The keys depend only on the seed, so every kv
    method gets the same prompts."""
    session = Session(model, tok, kv=kv, ctx_size=max(lengths) + ANSWER_TOKENS, ubatch=ubatch, graphs=graphs)
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        row = PasskeyRow(kv, n)
        for depth in depths:
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                res = Result()
                session.reset()  # no reuse across prompts: each is answered from its own prefill
                text = "".join(session.generate(passkey_prompt(tok, n, depth, key), SamplingParams(temperature=0),
                                                ANSWER_TOKENS, result=res))
                row.tried += 1
                row.found += answer_number(text) == key
                row.answers.append((depth, key, text))
                progress()
        rows.append(row)
    return rows
