"""The memory planner: exact KV accounting without allocating, refusals before the weights load,
-c 0 as the largest context that fits."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import STORIES
from minikv.backend import get_backend
from minikv.cli.main import main
from minikv.kv import cache_bytes, make_cache
from minikv.models import load_model, open_model
from minikv.plan import largest_ctx, plan, weight_bytes
from test_cli_errors import assert_error, gen

CPU = get_backend("cpu")


@pytest.mark.parametrize("spec", ["fp16", "kivi:2", "kivi:3,vbits=4,sink=4", "nqkv:2,kaxis=channel,bs=8",
                                  "patternkv:2,g=32,r=48"])
def test_cache_bytes_are_the_buffers_a_cache_allocates(spec):
    geom = load_model(STORIES, CPU).kv_geometry
    cache = make_cache(spec, geom, 2, 300, CPU)
    held = sum(a.nbytes for k, v in vars(cache).items()  # the per-layer storage (not the step's row info)
               if isinstance(v, list) and v and isinstance(v[0], np.ndarray) and not k.startswith("_") for a in v)
    assert cache_bytes(spec, geom, 2, 300, CPU) == cache.allocated_bytes == held


def test_refused_before_the_weights_load(capsys, monkeypatch):
    import minikv.models

    monkeypatch.setattr(minikv.models, "build_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    line = assert_error(capsys, "> 50 MB; nothing fits", *gen(STORIES, "--gpu-mem", str(50e6 / 2**30)))
    assert line.startswith("minikv: error: stories260K: weights 1 MB + fp16 KV for 512 tokens")


def test_ctx_zero_is_the_largest_that_fits(capsys):
    files = open_model(STORIES)
    w = weight_bytes(files.shapes, CPU.dtype)
    budget = plan(files.cfg, w, "fp16", 256, 512, 1, CPU, None).total + (1 << 20)  # 256 tokens fit, not 512
    ctx = largest_ctx(files.cfg, w, "fp16", 512, 1, CPU, budget, 512)
    assert ctx == 256 and plan(files.cfg, w, "fp16", ctx, 512, 1, CPU, budget).fits
    assert not plan(files.cfg, w, "fp16", ctx + 256, 512, 1, CPU, budget).fits
    assert main([*gen(STORIES, "-c", "0", "-v", "--gpu-mem", str(budget / 2**30))]) == 0
    assert "fp16 KV for 1 x 256 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("gpu_mem", ["0", "-1", "nan"])
def test_gpu_mem_must_be_positive(capsys, gpu_mem):
    assert_error(capsys, f"--gpu-mem {gpu_mem}", *gen(STORIES, "--gpu-mem", gpu_mem))


def test_ubatch_counts_the_tokens_of_all_rows(monkeypatch):
    """-ub is the most tokens one forward takes over all its rows (llama.cpp's meaning): 4 prompts
    go 16 tokens a row at -ub 64, and the planner charges one 64-token forward for any batch."""
    from minikv.stepper import Stepper

    model = load_model(STORIES, CPU)
    widths, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **k: (widths.append(ids.shape), forward(ids, *a, **k))[1])
    Stepper(model, make_cache("fp16", model.kv_geometry, 4, 128, CPU), 64, graphs=False).feed(np.ones((4, 40)))
    assert widths == [(4, 16), (4, 16), (4, 8)]
    files = open_model(STORIES)
    w = weight_bytes(files.shapes, CPU.dtype)
    one = plan(files.cfg, w, "fp16", 512, 64, 1, CPU, None).activations
    assert plan(files.cfg, w, "fp16", 512, 64, 8, CPU, None).activations == one
    assert plan(files.cfg, w, "fp16", 16, 64, 2, CPU, None).activations < one  # 32 tokens in all
