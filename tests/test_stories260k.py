"""The real tiny model: greedy text must equal the known output exactly (CPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import STORIES
from minikv.backend import get_backend
from minikv.generate import Result, Session
from minikv.kv import make_cache
from minikv.models import load_model
from minikv.sampler import SamplingParams
from minikv.tokenizer import Tokenizer

EXPECTED = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily")


def test_prompt_tokens_include_bos():
    assert Tokenizer.from_dir(STORIES).encode("Once upon a time") == [1, 403, 407, 261, 378]


def test_greedy_60_tokens_exact():
    model = load_model(STORIES, get_backend("cpu"))
    tok = Tokenizer.from_dir(STORIES)
    session = Session(model, tok)
    res = Result()
    text = "".join(session.generate(tok.encode("Once upon a time"), SamplingParams(temperature=0), 60, result=res))
    assert len(res.token_ids) == 60
    assert "Once upon a time" + text == EXPECTED
    assert tok.decode([1, 403, 407, 261, 378] + res.token_ids) == EXPECTED


def test_cli_generate_greedy_exact():
    """The installed console entry point, in a subprocess: stdout holds only the generated text."""
    out = subprocess.run([sys.executable, "-m", "minikv", "generate", str(STORIES), "-p", "Once upon a time",
                          "-n", "60", "--temp", "0", "--device", "cpu"], capture_output=True, text=True, check=True)
    assert "Once upon a time" + out.stdout.rstrip("\n") == EXPECTED
    assert "tokens/s" in out.stderr and "tokens/s" not in out.stdout


def test_cli_json(capsys):
    from minikv.cli.main import main

    assert main(["generate", str(STORIES), "-p", "Once upon a time", "-n", "60", "--temp", "0",
                 "--device", "cpu", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert "Once upon a time" + obj["text"] == EXPECTED
    assert obj["tokens"] == 60 and obj["prompt_tokens"] == 5
    assert obj["timings"]["gen_tokens"] == 60 and obj["timings"]["gen_tokens_per_s"] > 0


def test_sampling_is_seeded_and_varies():
    model = load_model(STORIES, get_backend("cpu"))
    tok = Tokenizer.from_dir(STORIES)
    ids = tok.encode("Once upon a time")

    def run(seed, **kw):
        res = Result()
        list(Session(model, tok).generate(ids, SamplingParams(temperature=1.0, seed=seed, **kw), 40, result=res))
        return res.token_ids

    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in range(5)}) > 1
    # top-k 1 is greedy whatever the temperature and seed
    greedy = Result()
    list(Session(model, tok).generate(ids, SamplingParams(temperature=0), 40, result=greedy))
    assert run(3, top_k=1) == greedy.token_ids


def test_chat_turns_reuse_the_cache():
    """A second turn prefills only the new tokens; the reply equals a fresh session's."""
    model = load_model(STORIES, get_backend("cpu"))
    tok = Tokenizer.from_dir(STORIES)
    s = Session(model, tok)
    p = SamplingParams(temperature=0)
    first = tok.encode("Once upon a time")
    r1 = Result()
    list(s.generate(first, p, 10, result=r1))
    second = first + r1.token_ids + tok.encode(" The end.", add_special_tokens=False)
    r2, fresh = Result(), Result()
    list(s.generate(second, p, 10, result=r2))
    assert r2.timings.prompt_tokens < len(second) // 2
    list(Session(model, tok).generate(second, p, 10, result=fresh))
    assert r2.token_ids == fresh.token_ids
    np.testing.assert_equal(s.cache.lengths, [len(second) + 9])


def test_pipelined_steps_keep_the_session_and_cache_in_step():
    """generate queues the step feeding each drawn id before it reads the id: the text is a
    plain greedy loop's, and however generation ends (length, a stop string, a full context),
    the session's token list is what the cache holds."""
    model, tok = load_model(STORIES, get_backend("cpu")), Tokenizer.from_dir(STORIES)
    ids = tok.encode("Once upon a time")
    cache = make_cache("fp16", model.kv_geometry, 1, 512, model.backend)
    logits, want = model.forward(np.asarray([ids]), cache)[0], []
    for _ in range(60):
        want.append(int(np.argmax(logits)))
        logits = model.forward(np.asarray([want[-1:]]), cache)[0]
    greedy = SamplingParams(temperature=0)
    for ctx, n, stop, reason in ((512, 60, (), "length"), (512, 200, ("ball",), "stop"), (30, -1, (), "context")):
        s, res = Session(model, tok, ctx_size=ctx), Result()
        list(s.generate(ids, greedy, n, stop=stop, result=res))
        assert res.stop_reason == reason and res.token_ids == want[:len(res.token_ids)]
        assert int(s.cache.lengths[0]) == len(s.tokens) and s.tokens[:len(ids) + len(res.token_ids) - 1] == ids + res.token_ids[:-1]
    assert len(s.tokens) == 30 and len(res.token_ids) == 30 - len(ids) + 1
