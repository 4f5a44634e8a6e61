"""What a llama.cpp user reaches for: --version, the generate summary, BLAS threads on the CPU."""
from __future__ import annotations

import pytest

from conftest import STORIES
from minikv import __version__
from minikv.backend import get_backend
from minikv.cli.main import main
from minikv.cpu_threads import Race


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minikv {__version__}"


def test_generate_summary_names_bits_per_value_and_the_cut(capsys):
    assert main(["generate", str(STORIES), "-p", "Once upon a time", "-n", "6", "--temp", "0", "--device", "cpu",
                 "--kv", "kivi:2,g=8,r=8"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "minikv: stopped after -n 6 tokens"
    assert err[1].startswith("prompt: 5 tokens") and err[1].endswith("| kv kivi:2,g=8,r=8: 8.00 bits/value")  # (8 x 6 + 2 x 16) / 10


def test_blas_threads_per_forward_pass():
    """Prompt-sized passes run on -t threads; decode-sized ones on the count their race picks."""
    blas = get_backend("cpu", threads=2).ops.blas
    if not blas.current():
        pytest.skip("NumPy's BLAS is not one threadpoolctl can steer")
    with blas.forward(64):
        assert blas.current() == [2] * len(blas.current())
    for _ in range(3):  # untimed warm-up pass, then the race's first try of 2 threads, then 1
        with blas.forward(1):
            pass
    assert set(blas.races[1].seconds) == {1, 2} and not blas.races.get(64)
    with blas.forward(1):
        assert blas.current() == [blas.races[1].best] * len(blas.current())


def test_thread_race_backs_off_a_loser_and_switches_to_a_winner():
    race = Race(best=1, other=2)
    picks = []
    for step in range(3000):
        n = race.pick()
        picks.append(n)
        race.record(n, 1.0 if n == 1 else 3.0)  # two threads three times slower: a busy machine
    assert [i for i, n in enumerate(picks) if n == 2] == [1, 1025, 2049]  # second, then every 1024
    times = {1: 1.0, 2: 0.5}  # the machine went idle: two threads now twice as fast
    while race.pick() != 2:
        race.record(1, times[1])
    race.record(2, times[2])
    assert race.best == 2 and race.gap == Race.MIN_GAP
    for _ in range(5):  # busy again: the running count slowing past the other's time switches back
        race.record(race.pick(), 3.0 if race.best == 2 else 1.0)
    assert race.best == 1
