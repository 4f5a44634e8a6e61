"""Every user error gives one line on stderr, exit status 2, and no traceback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import STORIES
from minikv.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(capsys, match, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("minikv: error:"), err
    assert match in lines[0], lines[0]
    assert out == ""
    return lines[0]


@pytest.fixture
def stories_copy(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    return d


def gen(model_dir, *extra):
    return ("generate", str(model_dir), "-p", "Once upon a time", "-n", "4", "--device", "cpu", *extra)


def test_missing_path(capsys, tmp_path):
    assert_error(capsys, "no such file or directory", *gen(tmp_path / "nope"))


def test_float16_on_the_cpu(capsys):
    assert_error(capsys, "--dtype float16 needs a GPU", *gen(STORIES, "--dtype", "float16"))


def test_dtype_float32_on_the_cpu_runs(capsys):  # the companion of the error above
    code, out, err = run_cli(capsys, *gen(STORIES, "--dtype", "float32", "--temp", "0"))
    assert code == 0 and out.startswith(", there was a"), (code, out, err)


def test_directory_without_config(capsys, tmp_path):
    assert_error(capsys, "no config.json", *gen(tmp_path))


def test_directory_without_weights(capsys, stories_copy):
    (stories_copy / "model.safetensors").unlink()
    assert_error(capsys, "no safetensors weights", *gen(stories_copy))


def test_broken_gguf_as_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert_error(capsys, "corrupt or truncated GGUF", *gen(f))
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-converted is cached


def test_unsupported_architecture(capsys, stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (stories_copy / "config.json").write_text(json.dumps(cfg))
    line = assert_error(capsys, "model_type 'gpt2' is not supported", *gen(stories_copy))
    assert "llama" in line and "qwen3" in line


def test_unsupported_rope_scaling(capsys, stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    (stories_copy / "config.json").write_text(json.dumps(cfg))
    assert_error(capsys, "rope scaling 'longrope' is not supported", *gen(stories_copy))


def test_corrupt_config(capsys, stories_copy):
    (stories_copy / "config.json").write_text("{not json")
    assert_error(capsys, "not valid JSON", *gen(stories_copy))


def test_truncated_safetensors(capsys, stories_copy):
    f = stories_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_error(capsys, "truncated", *gen(stories_copy))


def test_corrupt_safetensors_header(capsys, stories_copy):
    f = stories_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    assert_error(capsys, "corrupt", *gen(stories_copy))


def test_garbage_safetensors(capsys, stories_copy):
    (stories_copy / "model.safetensors").write_bytes(b"\x00\x01")
    assert_error(capsys, "corrupt or truncated", *gen(stories_copy))


def test_wrong_shape_in_checkpoint(capsys, stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (stories_copy / "config.json").write_text(json.dumps(cfg))
    assert_error(capsys, "has shape", *gen(stories_copy))


def test_missing_tensor(capsys, stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (stories_copy / "config.json").write_text(json.dumps(cfg))
    assert_error(capsys, "model.layers.5.", *gen(stories_copy))


def test_missing_tokenizer(capsys, stories_copy):
    (stories_copy / "tokenizer.json").unlink()
    assert_error(capsys, "no tokenizer.json", *gen(stories_copy))


def test_prompt_longer_than_context(capsys):
    assert_error(capsys, "context", "generate", str(STORIES), "-p", "Once upon a time " * 20, "-c", "32",
                 "--device", "cpu")


def test_ctx_size_above_model_maximum(capsys):
    assert_error(capsys, "max_position_embeddings", *gen(STORIES, "-c", "100000"))


@pytest.mark.parametrize("spec,match", [("bogus", "unknown method 'bogus'"), ("fp16:4", "takes no bits"),
                                        ("fp16,x", "not key=value")])
def test_bad_kv_spec(capsys, spec, match):
    assert_error(capsys, match, *gen(STORIES, "--kv", spec))


@pytest.mark.parametrize("flag,value", [("--temp", "-1"), ("--top-p", "0"), ("--min-p", "1.5")])
def test_bad_sampling_flags(capsys, flag, value):
    assert_error(capsys, flag, *gen(STORIES, flag, value))


def test_cuda_requested_without_gpu(capsys):
    pytest.importorskip("numpy")
    try:
        import cupy  # noqa: F401
        pytest.skip("a GPU stack is installed")
    except ImportError:
        pass
    assert_error(capsys, "--device cpu", *gen(STORIES, "--device", "cuda"))


def test_real_process_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minikv", "generate", str(tmp_path / "nope"), "-p", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
