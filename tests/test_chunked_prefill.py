"""Chunked prefill (-ub): a prompt fed in pieces of at most `ubatch` tokens. With an fp16 cache it
gives the one-shot logits; with a quantized cache it is exactly the pieces fed as successive steps
(later pieces read the history the earlier ones quantized, as llama.cpp's do)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import STORIES, TEXT
from helpers import rel_err
from minikv.backend import get_backend
from minikv.errors import MinikvError
from minikv.generate import Session
from minikv.kv import make_cache
from minikv.models import load_model
from minikv.perplexity import perplexity
from minikv.tokenizer import Tokenizer

CPU = get_backend("cpu")


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES, CPU)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(STORIES)


@pytest.fixture(scope="module")
def ids(tok):
    return tok.encode((TEXT / "tinystories_valid_fragment.txt").read_text())[:300]


def prefill(model, tok, kv, ubatch, ids):
    s = Session(model, tok, kv=kv, ctx_size=512, ubatch=ubatch)
    return s.feed(ids), s


@pytest.mark.parametrize("ubatch", [1, 7, 64, 299])
def test_fp16_chunked_prefill_gives_the_one_shot_logits(model, tok, ids, ubatch):
    whole, _ = prefill(model, tok, "fp16", 4096, ids)
    chunked, s = prefill(model, tok, "fp16", ubatch, ids)
    assert rel_err(chunked, whole) < 1e-5
    assert s.tokens == ids and int(s.cache.lengths[0]) == len(ids)


@pytest.mark.parametrize("spec", ["kivi:2,g=32,r=32", "patternkv:2,g=32,r=48,sink=4", "nqkv:2,g=32,r=32"])
@pytest.mark.parametrize("ubatch", [20, 32, 50])  # boundaries inside, on and across quantization chunks
def test_quantized_chunked_prefill_is_the_pieces_fed_as_steps(model, tok, ids, spec, ubatch):
    chunked, _ = prefill(model, tok, spec, ubatch, ids)
    cache = make_cache(spec, model.kv_geometry, 1, 512, CPU)
    for a in range(0, len(ids), ubatch):
        steps = model.forward(np.asarray([ids[a:a + ubatch]]), cache)[0]
    np.testing.assert_array_equal(chunked, steps)
    whole, _ = prefill(model, tok, spec, 4096, ids)
    assert rel_err(chunked, whole) > 1e-4  # later pieces attended to quantized history


def test_the_lm_head_runs_once(model, tok, ids, monkeypatch):
    calls = []
    linear = model.ops.linear
    monkeypatch.setattr(model.ops, "linear", lambda x, w, b=None: (calls.append(w is model.lm_head), linear(x, w, b))[1])
    prefill(model, tok, "fp16", 64, ids)
    assert sum(calls) == 1


def test_ubatch_must_be_positive(model, tok):
    with pytest.raises(MinikvError, match="--ubatch-size 0"):
        Session(model, tok, ubatch=0)


def test_perplexity_prefill_in_pieces(model, ids):
    """--prefill P -ub U: the same tokens scored; fp16 unchanged, a quantized cache moved a little."""
    for spec, same in (("fp16", True), ("kivi:2,g=32,r=32", False)):
        one = perplexity(model, ids, spec, prefill=200)
        pieces = perplexity(model, ids, spec, prefill=200, ubatch=64)
        assert one.tokens == pieces.tokens == len(ids) - 1
        assert (abs(pieces.ppl / one.ppl - 1) < 1e-5) == same
