"""`minikv bench`: llama-bench's table and JSON rows on minikv's own path (CPU here; the GPU
figures are in bench/RESULTS.md)."""
from __future__ import annotations

import json

from conftest import STORIES
from minikv.cli.main import main
from test_cli_errors import assert_error


def test_rows_for_every_method_batch_and_depth(capsys):
    assert main(["bench", str(STORIES), "-p", "32", "-n", "4", "-d", "0,64", "-b", "1,2", "--kv", "fp16",
                 "--kv", "kivi:2,g=32,r=32", "--device", "cpu", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kv"], r["batch"], r["depth"], r["test"]) for r in rows] == [
        (kv, b, d, t) for kv in ("fp16", "kivi:2,g=32,r=32") for b in (1, 2) for d in (0, 64) for t in ("pp32", "tg4")]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem"] > 0 and r["model"] == "stories260K" for r in rows)


def test_markdown_table(capsys):
    assert main(["bench", "--shape", "smollm2-135m", "-p", "16", "-n", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| model | kv | batch | depth | test | t/s |") and len(out) == 4
    assert out[2].startswith("| smollm2-135m | fp16 | 1 | 0 | pp16 |")


def test_bad_bench_arguments(capsys):
    assert_error(capsys, "max_position_embeddings", "bench", str(STORIES), "-d", "600", "--device", "cpu")
    assert_error(capsys, "not both", "bench", str(STORIES), "--shape", "smollm2-135m", "--device", "cpu")
    assert_error(capsys, "comma-separated integers", "bench", str(STORIES), "-d", "1k", "--device", "cpu")


def test_a_test_that_does_not_fit_is_refused_and_the_others_run(capsys):
    from minikv.backend import get_backend
    from minikv.bench import WARMUP
    from minikv.models import open_model
    from minikv.plan import plan, weight_bytes

    cpu, files = get_backend("cpu"), open_model(STORIES)
    w = weight_bytes(files.shapes, cpu.dtype)
    need = [plan(files.cfg, w, "fp16", d + 32 + 4 + WARMUP + 1, 512, 1, cpu, None).total for d in (0, 400)]
    budget = (need[0] + need[1]) / 2  # depth 0 fits, depth 400 does not
    assert main(["bench", str(STORIES), "-p", "32", "-n", "4", "-d", "0,400", "--device", "cpu", "--json",
                 "--gpu-mem", str(budget / 2**30)]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("test", "refused") for r in rows] == ["pp32", "tg4", "refused"]
    assert rows[2]["depth"] == 400 and "fp16 KV for 439 tokens" in rows[2]["refused"]
    assert err.count("minikv: refused: stories260K:") == 1
