"""The real tiny model and the sampler on CuPy (HF parity on the GPU is in test_parity_hf.py)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import STORIES
from minikv.backend import get_backend
from minikv.models import load_model

pytestmark = pytest.mark.gpu


def test_gpu_stories260k_greedy():
    from minikv.generate import Result, Session
    from minikv.sampler import SamplingParams
    from minikv.tokenizer import Tokenizer
    from test_stories260k import EXPECTED

    tok = Tokenizer.from_dir(STORIES)
    model = load_model(STORIES, get_backend("cuda"))
    res = Result()
    text = "".join(Session(model, tok).generate(tok.encode("Once upon a time"), SamplingParams(temperature=0),
                                                60, result=res))
    print("GPU greedy:", repr("Once upon a time" + text))
    assert "Once upon a time" + text == EXPECTED


def test_gpu_sampling_runs_on_device():
    """Top-k/top-p/min-p sampling on CuPy arrays returns a device scalar within the kept set."""
    import cupy as cp

    from minikv.sampler import Sampler, SamplingParams

    logits = cp.asarray(np.random.default_rng(0).normal(size=5000).astype(np.float32))
    s = Sampler(SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=1), cp)
    top20 = set(np.argsort(-logits.get())[:20].tolist())
    picks = [s(logits, [1, 2, 3]) for _ in range(50)]
    assert all(isinstance(p, cp.ndarray) for p in picks)
    assert {int(p) for p in picks} <= top20


def test_sample_kernel_draws_what_the_array_ops_draw():
    """The one-launch sampler (kernels_cu/sample.cu) against the Sampler's array ops on NumPy with
    the same seed (so the same uniform): top-k 1..256 over real vocabulary sizes, top-p, min-p,
    temperature; and -1 for NaN, +inf or no finite logit."""
    import cupy as cp

    from minikv.cuda import sample
    from minikv.sampler import Sampler, SamplingParams

    rng = np.random.default_rng(0)
    differ = []
    for trial in range(120):
        V = int(rng.choice([1000, 49152, 128256]))
        logits = (rng.standard_normal(V) * rng.uniform(0.5, 4)).astype(np.float32)
        p = SamplingParams(temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.choice([1, 5, 40, 256])),
                           top_p=float(rng.choice([1.0, 0.9, 0.5])), min_p=float(rng.choice([0.0, 0.05, 0.2])),
                           seed=trial)
        assert sample.supports(V, p.top_k)
        want = int(Sampler(p, np)(logits, []))
        u = np.random.default_rng(trial).random()  # the Sampler's first uniform with this seed
        got = sample.sample_top(cp.asarray(logits), p.top_k, p.top_p, p.min_p, p.temperature, u, cp.empty(1, np.int32))
        if int(got) != want:
            differ.append((trial, int(got), want))
    assert len(differ) <= 1, differ  # float sums in another order may move one draw across a boundary
    s = Sampler(SamplingParams(seed=0), cp)
    assert isinstance(s(cp.asarray(logits), []), cp.ndarray) and s.kernel is not None  # the Sampler draws with the kernel
    for bad in (np.nan, np.inf):
        x = cp.zeros(5000, np.float32)
        x[123] = bad
        assert int(s(x, [])) == -1
    assert int(s(cp.full(5000, -np.inf, np.float32), [])) == -1
    x = cp.full(5000, -np.inf, np.float32)
    x[7] = 1.0
    assert int(s(x, [])) == 7  # -inf logits are never drawn


def test_readback_returns_each_draw_while_later_work_is_queued():
    """Readback hands out each id as drawn, though the copy is waited on after more work (that
    overwrites the drawn array's buffer) was queued behind it, slots taking turns."""
    import cupy as cp

    be = get_backend("cuda")
    rb = be.readback()
    x = cp.zeros(1 << 24, np.float32)
    ids = cp.zeros(3, np.int64)
    want, tickets = [], []
    for i in range(6):
        ids[...] = cp.arange(3) * 10 + i  # the "draw"
        tickets.append(rb.start(ids))
        want.append([i, 10 + i, 20 + i])
        for _ in range(20):  # the "next step": queued work the copy must not wait for
            x += 1
        ids[...] = -1
        if len(tickets) == 2:
            assert rb.wait(tickets.pop(0)).tolist() == want.pop(0)
    assert rb.wait(tickets.pop(0)).tolist() == want.pop(0)
    drawn = cp.asarray(np.int32(7)).reshape(())  # a 0-d int32 id (the sampling kernel's)
    assert int(rb.wait(rb.start(drawn))) == 7
