"""`minikv chat` driven through stdin in a real process: turns, /reset, /exit, Ctrl-C, context."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from conftest import STORIES

CHAT = [sys.executable, "-m", "minikv", "chat", str(STORIES), "--device", "cpu"]


def test_turns_reset_and_exit():
    one_line = ["--temp", "0", "-n", "12", "--stop", "\n"]  # each reply is one line of stdout
    r = subprocess.run(CHAT + one_line, input="Once upon a time\nThen what?\n/reset\nHi\n/exit\nnot read\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 3  # three turns answered, the line after /exit never read
    assert "(conversation reset)" in r.stderr
    assert r.stderr.count("no chat template") == 1  # the ChatML fallback is announced once
    # After /reset the same first message gets the same greedy reply as a fresh process.
    fresh = subprocess.run(CHAT + one_line, input="Hi\n", capture_output=True, text=True, timeout=120)
    assert fresh.stdout.splitlines() == replies[2:3]


def test_eof_exits_cleanly():
    r = subprocess.run(CHAT, input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr


def test_conversation_outgrowing_the_context():
    r = subprocess.run(CHAT + ["--temp", "0", "-c", "64"], input="Hi\n" + "x " * 60 + "\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "context of 64 tokens is full" in r.stderr  # the first reply runs into the end
    assert "would need" in r.stderr and "/reset" in r.stderr  # the long second message does not fit


def test_ctrl_c_stops_the_reply_not_the_session():
    p = subprocess.Popen(CHAT + ["--temp", "1.0", "-c", "512", "--ignore-eos"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        p.stdin.write("Once upon a time\n")
        p.stdin.flush()
        ready, _, _ = select.select([p.stdout], [], [], 60)  # the reply has started streaming
        assert ready  # 500 tokens take ~0.3 s here: ample time for the signal to land mid-reply
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)
        p.stdin.write("/exit\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "(reply stopped)" in err and "Traceback" not in err


def test_help_notices_and_timings():
    r = subprocess.run(CHAT + ["--temp", "0", "-n", "5"], input="/help\nOnce upon a time\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "/reset starts over, /exit" in r.stderr
    assert len(r.stdout.splitlines()) == 1  # /help is answered by minikv, never sent to the model
    assert "(reply cut at -n 5 tokens)" in r.stderr
    assert "minikv: 1 reply | prompt:" in r.stderr and "generation: 5 tokens" in r.stderr
