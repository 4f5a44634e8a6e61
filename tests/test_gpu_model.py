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
