"""Bad input a new user tried (issue 25): each ends in one `minikv: error:` line, exit status 2,
no traceback and nothing left on disk; or, where the input means something, it is honoured."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import STORIES, TEXT
from minikv.cli.main import main
from minikv.safetensors_io import SafetensorsFile, save_file
from test_cli_errors import assert_error, gen, run_cli

FRAG = str(TEXT / "tinystories_valid_fragment.txt")
MINIKV = [sys.executable, "-m", "minikv"]


def one_error_line(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("minikv: error:") and match in lines[0], r.stderr


@pytest.fixture
def stories_copy(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


# -- model files --------------------------------------------------------------------------------
def test_config_that_is_a_json_list(capsys, stories_copy):
    (stories_copy / "config.json").write_text("[1, 2]")
    assert_error(capsys, "not a model configuration", *gen(stories_copy))


@pytest.mark.parametrize("key,value", [("num_attention_heads", 0), ("hidden_size", -64), ("vocab_size", "512"),
                                       ("num_hidden_layers", True)])
def test_config_sizes_must_be_positive_integers(capsys, stories_copy, key, value):
    edit_config(stories_copy, **{key: value})
    assert_error(capsys, f"{key} is {value!r}; it must be a positive integer", *gen(stories_copy))


def test_config_with_absurdly_many_layers_is_refused_at_once(capsys, stories_copy):
    edit_config(stories_copy, num_hidden_layers=10**12)  # building the list of its tensors would never end
    assert_error(capsys, "the config says 1000000000000 layers", *gen(stories_copy))


def test_nan_weights_are_reported_not_printed_as_empty_text(capsys, stories_copy):
    f = stories_copy / "model.safetensors"
    st = SafetensorsFile(f)
    tensors = {n: (np.array(st.raw(n)), st.dtype(n)) for n in st.keys()}
    tensors["model.norm.weight"][0][:] = np.nan
    del st
    save_file(f, tensors)
    assert_error(capsys, "not finite", *gen(stories_copy, "--temp", "0"))
    assert_error(capsys, "not finite", "perplexity", str(stories_copy), "--text", FRAG, "--max-tokens", "64",
                 "--device", "cpu")


# -- flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (("-c", "-3"), "--ctx-size -3"),
    (("--temp", "nan"), "--temp nan: must be a finite number"),
    (("--temp", "inf"), "--temp inf: must be a finite number"),
    (("--top-p", "nan"), "--top-p nan"),
    (("-n", "-5"), "-n -5"),
    (("--seed", "-2"), "--seed -2"),
    (("--threads", "0"), "--threads 0"),
    (("--kv", "kivi:2,sink=100000"), "sink=100000"),
    (("-m", "/elsewhere"), "two models given"),
])
def test_bad_flags(capsys, argv, match):
    assert_error(capsys, match, *gen(STORIES, *argv))


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(STORIES), "-p", "x", "-n", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minikv: error: argument -n") and "--help" in err


def test_seed_minus_one_means_random(capsys):
    code, out, err = run_cli(capsys, *gen(STORIES, "--seed", "-1", "-n", "8"))
    assert code == 0 and out.strip(), err


def test_ctx_size_zero_is_the_models_maximum(capsys):
    code, out, err = run_cli(capsys, *gen(STORIES, "-c", "0", "--json", "--temp", "0"))
    assert code == 0, err
    code, out2, err = run_cli(capsys, *gen(STORIES, "-c", "512", "--json", "--temp", "0"))
    assert json.loads(out)["token_ids"] == json.loads(out2)["token_ids"]


# -- kvstats ------------------------------------------------------------------------------------
@pytest.mark.parametrize("plot,match", [("nodir/kv.png", "does not exist"), ("kv.xyz", "unknown image format 'xyz'"),
                                        ("kv", "unknown image format '(none)'")])
def test_kvstats_plot_path_is_checked_before_the_work(capsys, tmp_path, monkeypatch, plot, match):
    pytest.importorskip("matplotlib")
    import minikv.cli.args

    monkeypatch.setattr(minikv.cli.args, "load", lambda args: pytest.fail("the model was loaded"))
    assert_error(capsys, match, "kvstats", str(STORIES), "--text", FRAG, "--device", "cpu", "--plot",
                 str(tmp_path / plot))
    assert not any(tmp_path.rglob("*.*"))


@pytest.mark.parametrize("text", ["", "Once upon a time, there was a girl."])
def test_kvstats_on_too_little_text(capsys, tmp_path, text):
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert_error(capsys, "", "kvstats", str(STORIES), "--text", str(f), "--device", "cpu", "--kv", "kivi:2")


@pytest.mark.parametrize("argv,match", [(("--max-tokens", "100000"), "exceeds the model's max_position_embeddings"),
                                        (("--prefill", "0"), "--prefill 0"), (("--prefill", "5000"), "--prefill 5000"),
                                        (("--kv", "fp16"), "kvstats compares quantized caches")])
def test_kvstats_flags(capsys, argv, match):
    assert_error(capsys, match, "kvstats", str(STORIES), "--text", FRAG, "--device", "cpu", *argv)


# -- writing to disk ----------------------------------------------------------------------------
@contextmanager
def read_only_mount(d):
    """`d` as a read-only file system (root: a read-only tmpfs; others: a 0555 directory)."""
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def convert_argv(dst):
    return [*MINIKV, "convert", str(STORIES), str(dst)]


def test_convert_under_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    one_error_line(subprocess.run(convert_argv(tmp_path / "file" / "out"), capture_output=True, text=True),
                   "cannot write")


def test_convert_into_a_read_only_file_system(tmp_path):
    with read_only_mount(tmp_path / "ro") as ro:
        one_error_line(subprocess.run(convert_argv(ro / "out"), capture_output=True, text=True), "cannot write")
        assert not any(ro.iterdir())


@pytest.mark.parametrize("mode,match", [(0o555, "cannot write"), (0o000, "cannot be reached")])
def test_convert_into_a_directory_the_user_cannot_write(mode, match):
    """As a user without write permission (root runs the command as `nobody`)."""
    drop = [] if os.geteuid() != 0 else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if drop and shutil.which("setpriv") is None:
        pytest.skip("no setpriv to drop root's privileges")
    with tempfile.TemporaryDirectory() as top:  # pytest's tmp_path is private to this user
        os.chmod(top, 0o755)
        d = Path(top) / "locked"
        d.mkdir()
        d.chmod(mode)
        r = subprocess.run(drop + convert_argv(d / "out"), capture_output=True, text=True,
                           env={**os.environ, "HOME": top})
        d.chmod(0o755)
        one_error_line(r, match)
        assert not any(d.iterdir())


def test_convert_into_an_immutable_directory(tmp_path):
    d = tmp_path / "imm"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        pytest.skip("chattr +i needs root and a file system that supports it")
    try:
        one_error_line(subprocess.run(convert_argv(d / "out"), capture_output=True, text=True), "cannot write")
        assert not any(d.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_cache_on_a_read_only_file_system(tmp_path):
    with read_only_mount(tmp_path / "ro") as ro:
        r = subprocess.run([*MINIKV, "generate", "-p", "hi", "--device", "cpu"], capture_output=True, text=True,
                           env={**os.environ, "MINIKV_CACHE": str(ro / "cache")})
        one_error_line(r, "set MINIKV_CACHE to a writable directory")


# -- standard streams ---------------------------------------------------------------------------
CHAT = [*MINIKV, "chat", str(STORIES), "--device", "cpu"]


def test_chat_with_stdin_closed():
    r = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", *CHAT], capture_output=True, text=True, timeout=120)
    one_error_line(r, "standard input, which is closed")


def test_chat_with_non_utf8_input():
    r = subprocess.run(CHAT, input=b"Once upon \xff\xfe a time\n", capture_output=True, timeout=120)
    r.stderr = r.stderr.decode()
    one_error_line(r, "not UTF-8 text (byte 0xff)")


@pytest.mark.parametrize("argv", [
    ["generate", str(STORIES), "-p", "Once upon a time", "-n", "50", "--device", "cpu"],
    ["perplexity", str(STORIES), "--text", FRAG, "--max-tokens", "64", "--device", "cpu"],
    ["kvstats", str(STORIES), "--text", FRAG, "--max-tokens", "256", "--prefill", "64", "--kv", "kivi:2,g=32,r=32",
     "--device", "cpu"]], ids=["generate", "perplexity", "kvstats"])
def test_stdout_into_a_closed_pipe(argv):
    """`minikv ... | head` where head has already exited: a quiet stop, as SIGPIPE gives C tools."""
    rd, wr = os.pipe()
    os.close(rd)  # nobody reads: the first write fails
    try:
        r = subprocess.run([*MINIKV, *argv], stdout=wr, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(wr)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr and "Error" not in r.stderr
