"""The real default model, SmolLM2-135M-Instruct, from its GGUF through `minikv convert`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TEXT
from helpers import hf_logits, rel_err
from minikv.backend import get_backend
from minikv.kv import make_cache
from minikv.models import load_model
from minikv.tokenizer import Tokenizer

torch = pytest.importorskip("torch")


def test_converted_logits_match_hf_on_real_text(smollm2_dir):
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_dir(smollm2_dir)
    text = (TEXT / "austen_prideprejudice.txt").read_text(encoding="utf-8")[5000:7000]
    ids = np.asarray([tok.encode(text)[:300]])
    assert ids.shape[1] == 300
    model = load_model(smollm2_dir, get_backend("cpu"))
    ours = model.forward(ids, make_cache("fp16", model.kv_geometry, 1, 512, model.backend), logits="all")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ref = hf_logits(hf, ids)
    assert rel_err(ours, ref) < 1e-4
    # and the model is real: it predicts the next word of Austen far better than chance
    x = ref[0, :-1] - ref[0, :-1].max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))  # (299, V) log-softmax
    assert np.exp(-logp[np.arange(299), ids[0, 1:]].mean()) < 100


def test_tokenizer_matches_hf_gguf_loader(smollm2_dir, smollm2_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = Tokenizer.from_dir(smollm2_dir)
    for f in ["austen_emma.txt", "shakespeare_macbeth.md", "tinystories_valid_fragment.txt"]:
        text = (TEXT / f).read_text(encoding="utf-8")[:20000]
        assert tok.encode(text) == ref.encode(text), f


def test_capital_of_france_is_paris(smollm2_dir):
    r = subprocess.run([sys.executable, "-m", "minikv", "generate", str(smollm2_dir), "--chat", "-p",
                        "What is the capital of France?", "--temp", "0", "-n", "30", "--device", "cpu", "--json"],
                       capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    assert "Paris" in out["text"] and out["stop_reason"] == "eos"


def test_default_model_when_no_model_dir(smollm2_dir):
    """No MODEL_DIR: the cached default model is used (the same one the fixture converted)."""
    r = subprocess.run([sys.executable, "-m", "minikv", "chat", "--temp", "0", "-n", "20", "--device", "cpu"],
                       input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_default_model_offline_fails_clearly(tmp_path):
    env = {**os.environ, "MINIKV_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    r = subprocess.run([sys.executable, "-m", "minikv", "generate", "-p", "hi", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "could not download" in r.stderr and "offline" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_conversion_leaves_nothing(smollm2_gguf, tmp_path, sig):
    dst = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "minikv", "convert", str(smollm2_gguf), str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the output is being written, then interrupt
        if list(tmp_path.glob(".out.partial-*")):  # (the weights file appears in one write: too late to wait for)
            break
        time.sleep(0.01)
    else:
        pytest.fail("the conversion never started writing")
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and not dst.exists()
    if sig == signal.SIGKILL:  # nothing can clean up after SIGKILL: the next run removes the leftovers
        assert list(tmp_path.glob(".out.partial-*"))
        subprocess.run([sys.executable, "-m", "minikv", "convert", str(smollm2_gguf), str(dst)], check=True,
                       capture_output=True)
        assert (dst / "config.json").is_file()
    else:
        assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if sig == signal.SIGKILL else [])
