"""`minikv passkey`: the prompts (length, needle depth), the scoring, and the command's output."""
from __future__ import annotations

import json

import pytest

from conftest import STORIES
from minikv.passkey import answer_number, passkey_prompt
from minikv.tokenizer import Tokenizer
from test_cli_errors import assert_error


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(STORIES)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.9, 1.0])
def test_the_needle_sits_at_its_depth_of_the_filler(tok, depth):
    ids = passkey_prompt(tok, 480, depth, 12345)
    assert 480 - 40 < len(ids) <= 480 and ids[0] == tok.bos_id
    text = tok.decode(ids)
    assert text.count("12345") == 2 and text.rstrip().endswith("The pass key is")
    before, total = text[:text.index("The pass key is 12345")].count("The grass"), text.count("The grass")
    assert total >= 4 and before == round(depth * total)


def test_an_answer_counts_when_its_first_number_is_the_key():
    assert answer_number(" 12345. Remember") == 12345 and answer_number("12345") == 12345
    assert answer_number(" the number 12345") is None and answer_number("") is None


def test_command_gives_every_method_the_same_keys(capsys):
    from minikv.cli.main import main

    assert main(["passkey", str(STORIES), "--device", "cpu", "--lengths", "300,400", "--depths", "20,80",
                 "--trials", "2", "--kv", "fp16", "--kv", "kivi:2,g=32", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kv"], r["length"], r["tried"]) for r in rows] == [("fp16", 300, 4), ("fp16", 400, 4),
                                                                  ("kivi:2,g=32", 300, 4), ("kivi:2,g=32", 400, 4)]
    keys = [[a[1] for a in r["answers"]] for r in rows]
    assert keys[:2] == keys[2:] and len(set(sum(keys, []))) == 8
    assert all(r["found"] == sum(answer_number(a[2]) == a[1] for a in r["answers"]) for r in rows)


def test_lengths_too_short_for_the_prompt(capsys):
    assert_error(capsys, "needs", "passkey", str(STORIES), "--device", "cpu", "--lengths", "100")
    assert_error(capsys, "--lengths", "passkey", str(STORIES), "--device", "cpu", "--depths", "120")
