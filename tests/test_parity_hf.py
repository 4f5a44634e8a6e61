"""Logit parity with HF transformers on tiny random models of every supported architecture."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import CASES, hf_logits, make_hf_model, minikv_logits, rel_err, save_hf_model
from minikv.backend import get_backend
from minikv.kv import make_cache
from minikv.models import load_model

pytest.importorskip("transformers")
import torch  # noqa: E402

TOL = 1e-4  # float32 on both sides


def load_hf_float32(path):
    """HF's own load of a checkpoint, upcast (a fresh load: `.to(bf16)` would also round
    HF's rotary inv_freq buffer)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()




@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


BACKENDS = [("cpu", TOL), pytest.param("cuda", 2e-2, marks=pytest.mark.gpu)]  # fp16 activations on the GPU


@pytest.mark.parametrize("device,tol", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, device, tol, tmp_path):
    hf = make_hf_model(case)
    model = load_model(save_hf_model(hf, tmp_path / case), get_backend(device))
    ids = np.random.default_rng(1).integers(0, 300, size=(2, 40))
    ref = hf_logits(hf, ids)
    assert np.abs(ref).max() > 1.0  # the test would be blind on near-zero logits
    full = minikv_logits(model, ids)
    print(f"{case} on {device}: rel err {rel_err(full, ref):.2e}")
    assert rel_err(full, ref) < tol
    assert rel_err(minikv_logits(model, ids, chunks=[13, 1, 1, 25]), full) < tol


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-bias", "qwen3-qknorm", "llama-llama3-rope"])
def test_prefill_then_decode_equals_full_forward(case, tmp_path, cpu):
    hf = make_hf_model(case, seed=3)
    model = load_model(save_hf_model(hf, tmp_path / case), cpu)
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 48))
    full = minikv_logits(model, ids)
    assert rel_err(full, hf_logits(hf, ids)) < TOL
    stepwise = minikv_logits(model, ids, chunks=[20] + [1] * 28)
    chunked = minikv_logits(model, ids, chunks=[7, 1, 13, 27])
    assert rel_err(stepwise, full) < TOL
    assert rel_err(chunked, full) < TOL


def test_bf16_sharded_checkpoint(tmp_path, cpu):
    hf = make_hf_model("qwen2-bias", seed=5)
    path = save_hf_model(hf, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    hf_ref = load_hf_float32(path)  # the same bf16-rounded weights, upcast
    model = load_model(path, cpu)
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 32))
    assert rel_err(minikv_logits(model, ids), hf_logits(hf_ref, ids)) < TOL


def test_fp16_checkpoint(tmp_path, cpu):
    hf = make_hf_model("llama-gqa-tied", seed=6)
    path = save_hf_model(hf, tmp_path / "fp16", dtype=torch.float16)
    hf_ref = load_hf_float32(path)
    model = load_model(path, cpu)
    ids = np.random.default_rng(4).integers(0, 300, size=(1, 24))
    assert rel_err(minikv_logits(model, ids), hf_logits(hf_ref, ids)) < TOL


def test_ragged_batch_matches_single_rows(tmp_path, cpu):
    """Rows of different lengths in one batch (right-padded) give each row's own logits."""
    hf = make_hf_model("llama-gqa-tied", seed=7)
    model = load_model(save_hf_model(hf, tmp_path / "m"), cpu)
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 300, size=17), rng.integers(0, 300, size=9)
    batch = np.zeros((2, 17), dtype=np.int64)
    batch[0], batch[1, :9] = a, b
    cache = make_cache("fp16", model.kv_geometry, 2, 64, cpu)
    last = model.forward(batch, cache, n_new=[17, 9])  # (2, V) at each row's last token
    nxt = model.forward(np.array([[5], [6]]), cache)  # one decode step for both rows
    for row, ids, tok in ((0, a, 5), (1, b, 6)):
        ref = hf_logits(hf, np.concatenate([ids, [tok]])[None])[0]
        assert rel_err(last[row], ref[-2]) < TOL
        assert rel_err(nxt[row], ref[-1]) < TOL
