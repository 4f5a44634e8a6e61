"""The sampler's filters (NumPy backend; the same code runs on CuPy)."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.errors import MinikvError
from minikv.sampler import Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))


def draws(n=4000, **kw):
    s = Sampler(SamplingParams(seed=0, **kw), np)
    return np.bincount([int(s(LOGITS, [])) for _ in range(n)], minlength=5) / n


def test_greedy_and_penalty():
    s = Sampler(SamplingParams(temperature=0), np)
    assert int(s(LOGITS, [])) == 0
    # a penalty of 10 on token 0 (log 0.5 < 0, multiplied) makes token 1 the argmax
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=10.0), np)
    assert int(s(LOGITS, [0, 0])) == 1
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=10.0, repeat_last_n=1), np)
    assert int(s(LOGITS, [0, 3])) == 0  # token 0 is outside the last-1 window


def test_plain_temperature_one_follows_the_distribution():
    f = draws(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)
    np.testing.assert_allclose(f, np.exp(LOGITS), atol=0.03)


def test_top_k_top_p_min_p():
    assert np.all(draws(top_k=2, top_p=1.0, min_p=0.0, temperature=1.0)[2:] == 0)
    f = draws(top_k=0, top_p=0.7, min_p=0.0, temperature=1.0)  # 0.5 + 0.2 reaches 0.7
    assert f[2:].sum() == 0 and abs(f[0] - 0.5 / 0.7) < 0.03
    f = draws(top_k=0, top_p=1.0, min_p=0.25, temperature=1.0)  # keeps p >= 0.125
    assert f[3:].sum() == 0 and f[2] > 0


def test_low_temperature_sharpens():
    assert draws(top_k=0, top_p=1.0, min_p=0.0, temperature=0.1)[0] > 0.95


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(min_p=1), dict(top_k=-2),
                                dict(repeat_penalty=0)])
def test_invalid_params(kw):
    with pytest.raises(MinikvError):
        SamplingParams(**kw)
