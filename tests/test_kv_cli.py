"""`minikv perplexity` and `minikv kvstats` from the command line."""
from __future__ import annotations

import json

import pytest

from minikv.errors import MinikvError

from conftest import STORIES, TEXT
from minikv.cli.main import main

FRAG = str(TEXT / "tinystories_valid_fragment.txt")


def test_perplexity_json_rows_on_the_same_tokens(capsys):
    assert main(["perplexity", str(STORIES), "--text", FRAG, "--max-tokens", "300", "--prefill", "64",
                 "--device", "cpu", "--kv", "fp16", "--kv", "kivi:2,g=32,r=32", "--kv", "patternkv:2,g=32,r=32",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kv"] for r in rows] == ["fp16", "kivi:2,g=32,r=32", "patternkv:2,g=32,r=32"]
    assert {r["tokens"] for r in rows} == {299}
    assert set(rows[0]) == {"kv", "ppl", "tokens", "kv_bytes", "bits_per_value"}
    fp, kivi, pkv = (r["ppl"] for r in rows)
    assert fp < min(kivi, pkv) and max(kivi, pkv) < 2 * fp
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"] / 4


def test_presets_run_as_the_spec_they_name(capsys):
    """--kv q2/q3/q4 are the specs PRESETS names: the output shows the spec, and scores as it does."""
    from minikv.kv.registry import PRESETS

    argv = ["perplexity", str(STORIES), "--text", FRAG, "--max-tokens", "300", "--device", "cpu", "--json"]
    for name, spec in PRESETS.items():
        assert main(argv + ["--kv", name, "--kv", spec]) == 0
        named, spelled = (json.loads(line) for line in capsys.readouterr().out.splitlines())
        assert named == spelled and named["kv"] == spec


def test_generate_reports_the_spec_a_preset_names(capsys):
    from minikv.kv.registry import PRESETS

    argv = ["generate", str(STORIES), "-p", "Once upon a time", "-n", "3", "--temp", "0", "--device", "cpu", "--json"]
    assert main(argv + ["--kv", "q3,sink=2"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"] == PRESETS["q3"].replace("sink=32", "sink=2")


def test_preset_options_override_its_own():
    from minikv.kv import parse_kv_spec

    s = parse_kv_spec("Q2,sink=4,fit=mse")
    assert (s.method, s.bits, s.options["sink"], s.options["fit"], s.options["rot"]) == ("kivi", 2, "4", "mse", "kv")
    assert str(s) == "kivi:2,g=64,rot=kv,sink=4,fit=mse"  # each option once, what the outputs show
    with pytest.raises(MinikvError, match="unknown option 'm'"):
        parse_kv_spec("q3,m=3")


def test_perplexity_table(capsys):
    assert main(["perplexity", str(STORIES), "--text", FRAG, "--max-tokens", "100", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["kv", "ppl", "tokens", "KV", "MiB", "bits/value"] and out[1].startswith("fp16")


@pytest.mark.parametrize("argv,match", [
    (["--text", "/nonexistent.txt"], "cannot read"),
    (["--text", FRAG, "--kv", "kivi:9"], "bits=9"),
    (["--text", FRAG, "--max-tokens", "1"], "use 2 or more"),
    (["--text", FRAG, "--max-tokens", "0"], "use 2 or more"),
    (["--text", FRAG, "--max-tokens", "-7"], "use 2 or more"),
    (["--text", FRAG, "-c", "100000"], "exceeds the model's max_position_embeddings"),
    (["--text", FRAG, "-c", "-3"], "-c -3"),
    (["--text", FRAG, "--prefill", "-5"], "--prefill -5: use 1 to"),
    (["--text", FRAG, "--prefill", "0"], "--prefill 0: use 1 to"),
    (["--text", FRAG, "--prefill", "10000"], "--prefill 10000: use 1 to 511"),
    (["--text", FRAG, "-c", "64", "--prefill", "64"], "use 1 to 63")])
def test_perplexity_errors(capsys, argv, match):
    assert main(["perplexity", str(STORIES), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_perplexity_in_windows_of_c_tokens(capsys):
    """-c scores the text in independent windows (llama-perplexity's chunks), each behind a BOS:
    every token but the first is still scored once, and less context means higher perplexity."""
    base = ["perplexity", str(STORIES), "--text", FRAG, "--max-tokens", "300", "--device", "cpu", "--json"]
    assert main(base) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(base + ["-c", "128", "--prefill", "16"]) == 0
    windowed = json.loads(capsys.readouterr().out)
    assert whole["tokens"] == windowed["tokens"] == 299
    assert windowed["ppl"] > whole["ppl"] * 1.01


def test_kvstats_table_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kv.png"
    assert main(["kvstats", str(STORIES), "--text", FRAG, "--max-tokens", "256", "--prefill", "64",
                 "--device", "cpu", "--kv", "kivi:2,g=32,r=32", "--kv", "patternkv:2,g=32,r=32", "--plot", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [l.split() for l in out if len(l.split()) > 1 and l.split()[1] == "all"]
    assert len(rows) == 5  # one per layer
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["kvstats", str(STORIES), "--text", FRAG, "--max-tokens", "256", "--prefill", "64",
                 "--device", "cpu", "--heads"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if len(l.split()) > 1 and l.split()[1].isdigit()]
    assert len(rows) == 5 * 4  # layers x kv heads
