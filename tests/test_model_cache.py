"""A .gguf file given as MODEL is converted into minikv's cache once; a damaged cached model
(the default one works the same way) is converted again instead of failing forever."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gguf_helpers import write_gguf
from helpers import make_hf_model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(make_hf_model("llama-gqa-tied"), tmp_path_factory.mktemp("g") / "tiny.gguf", "llama")


def generate(model, cache, *extra):
    """Greedy ids of a short completion; `model`: a path, or a list of arguments naming it."""
    model = [str(model)] if not isinstance(model, list) else model
    r = subprocess.run([sys.executable, "-m", "minikv", "generate", *model, "-p", "eat tea", "-n", "8", "--temp",
                        "0", "--device", "cpu", "--json", *extra], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MINIKV_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token_ids"], r.stderr


def test_gguf_as_model_is_converted_once(gguf_file, tmp_path):
    first, err = generate(gguf_file, tmp_path)
    assert "converting tiny.gguf into" in err
    [d] = (tmp_path / "models").iterdir()
    assert d.name.startswith("tiny-") and (d / "minikv-manifest.json").is_file()
    again, err = generate(gguf_file, tmp_path)
    assert again == first and "converting" not in err
    same, _ = generate(["-m", str(d)], tmp_path)  # -m: llama.cpp's spelling of MODEL
    assert same == first


def test_damaged_cached_model_is_converted_again(gguf_file, tmp_path):
    first, _ = generate(gguf_file, tmp_path)
    [d] = (tmp_path / "models").iterdir()
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:] = b"\x7f" * 64  # same size, other values: only the checksum can tell
    f.write_bytes(bytes(data))
    again, err = generate(gguf_file, tmp_path)
    assert "is damaged (model.safetensors does not match its checksum); converting it again" in err
    assert again == first
    (d / "minikv-manifest.json").unlink()  # e.g. a conversion killed before its manifest was written
    _, err = generate(gguf_file, tmp_path)
    assert "has no manifest of its files; converting it again" in err
