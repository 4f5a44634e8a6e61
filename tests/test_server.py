"""`minikv serve` against real clients: the `openai` package and raw HTTP, on 127.0.0.1 with
stories260K on the CPU."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, STORIES

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "minikv", "serve", str(STORIES), "--device", "cpu",
                                      "--port", str(self.port), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for _ in range(300):
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            time.sleep(0.1)
        raise RuntimeError("the server did not come up")

    def get(self, path, headers=None):
        return self.request("GET", path, None, headers)

    def request(self, method, path, body=None, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server():
    s = Server("-np", "4", "-c", "2048")
    yield s
    s.stop()


def test_completions_greedy_equal_generate(server):
    from test_stories260k import EXPECTED

    c = server.client()
    r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=60, temperature=0)
    assert "Once upon a time" + r.choices[0].text == EXPECTED
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=60,
                                       temperature=0, stream=True))
    assert "Once upon a time" + "".join(ch.choices[0].text for ch in chunks) == EXPECTED


def test_chat_streaming_and_not(server):
    c = server.client()
    msgs = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat"}]
    whole = c.chat.completions.create(model="stories260K", messages=msgs, max_tokens=24, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 5 and whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    parts = list(c.chat.completions.create(model="stories260K", messages=msgs, max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == 24 and parts[-2].choices[0].finish_reason == "length"
    # a follow-up turn prefills only its new tokens
    msgs += [{"role": "assistant", "content": whole.choices[0].message.content}, {"role": "user", "content": "More"}]
    again = c.chat.completions.create(model="stories260K", messages=msgs, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > whole.usage.prompt_tokens // 2


def test_sixteen_concurrent_clients(server):
    c = server.client()
    prompts = [f"Once upon a time, {name}" for name in ("Tim", "Sue", "a dog", "the sun")] * 4
    alone = {p: c.completions.create(model="stories260K", prompt=p, max_tokens=30, temperature=0).choices[0].text
             for p in set(prompts)}
    got = [None] * len(prompts)

    def ask(i):
        got[i] = c.completions.create(model="stories260K", prompt=prompts[i], max_tokens=30,
                                      temperature=0).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [alone[p] for p in prompts]
    status, text, _ = server.get("/metrics")
    assert status == 200 and "minikv_slots_busy 0" in text and "minikv_requests_total" in text


def test_sampled_and_greedy_slots_decode_together(server):
    """Seeded sampled requests and greedy ones in the same steps (their ids cross to the host in
    one transfer) give each request the text it gets alone."""
    c = server.client()
    asks = [dict(prompt=f"Once upon a time, {n}", max_tokens=24, temperature=t, seed=i)
            for i, (n, t) in enumerate([("Tim", 0.8), ("Sue", 0), ("a dog", 1.0), ("the sun", 0)] * 2)]
    alone = [c.completions.create(model="stories260K", **a).choices[0].text for a in asks]
    got = [None] * len(asks)

    def ask(i):
        got[i] = c.completions.create(model="stories260K", **asks[i]).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone and len(set(alone[::2])) > 1  # the sampled texts differ by seed


def test_models_tokenize_health(server):
    assert [m.id for m in server.client().models.list()] == ["stories260K"]
    status, body, _ = server.request("POST", "/tokenize", {"content": "Once upon a time"})
    assert status == 200 and len(json.loads(body)["tokens"]) == 4


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "x " * 700}, "prompt"),  # past a slot's 512 tokens
])
def test_bad_completion_requests(server, body, param):
    status, text, _ = server.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    err = json.loads(text)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_chat_requests(server):
    for body in ({"messages": []}, {"messages": "hi"}, {"messages": [{"content": "no role"}]}):
        status, text, _ = server.request("POST", "/v1/chat/completions", body)
        assert status == 400 and json.loads(text)["error"]["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="stories260K", messages=[], max_tokens=2)


def test_api_key_queue_limit_cancel_and_drain():
    s = Server("-np", "1", "--queue-size", "0", "--api-key", "sekrit", "-c", "512")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.get("/health")[0] == 200  # health needs no key
        c = s.client("sekrit")
        stream = c.completions.create(model="stories260K", prompt="Once", max_tokens=500,
                                      temperature=0.8, stream=True)
        next(iter(stream))  # the one slot is busy
        status, text, headers = s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                                          {"Authorization": "Bearer sekrit"})
        assert status == 429 and headers.get("Retry-After") and json.loads(text)["error"]["code"] == "queue_full"
        stream.close()  # the client goes away mid-stream: its slot frees within a moment
        t0 = time.time()
        while "minikv_slots_busy 0" not in s.get("/metrics", {"Authorization": "Bearer sekrit"})[1]:
            assert time.time() - t0 < 5, "the cancelled stream kept its slot"
            time.sleep(0.05)
        r = c.completions.create(model="stories260K", prompt="Once", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        # SIGTERM lets an in-flight stream finish, then the server exits
        stream = c.completions.create(model="stories260K", prompt="Once", max_tokens=200, temperature=0, stream=True)
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        text = "".join(ch.choices[0].text for ch in it)
        assert len(text) > 100
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_bad_flags_are_one_line():
    r = subprocess.run([sys.executable, "-m", "minikv", "serve", str(STORIES), "--device", "cpu", "-np", "0"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and r.stderr.startswith("minikv: error:") and r.stderr.count("\n") == 1


def test_health_while_loading_then_failed_load():
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from minikv.errors import MinikvError
    from minikv.server.api import State, build_app

    gate = threading.Event()

    def load():
        gate.wait(10)
        raise MinikvError("the weights are damaged")

    async def main():
        async with TestClient(TestServer(build_app(State(load, "m", None)))) as c:
            r = await c.get("/health")
            assert r.status == 503 and (await r.json())["status"] == "loading"
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status == 503
            gate.set()
            for _ in range(100):
                r = await c.get("/health")
                if r.status != 503:
                    break
                await asyncio.sleep(0.02)
            assert r.status == 500 and "damaged" in (await r.json())["message"]
    asyncio.run(main())


def test_a_failing_step_does_not_take_the_engine_down():
    from minikv.backend import get_backend
    from minikv.models import load_model
    from minikv.sampler import SamplingParams
    from minikv.server.engine import Engine, Job
    from minikv.tokenizer import Tokenizer

    model = load_model(STORIES, get_backend("cpu"))
    eng = Engine(model, Tokenizer.from_dir(STORIES), "kivi:2,g=32", 2, 256, 64)
    real, calls = model.forward, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a device fault")
        return real(*a, **k)
    model.forward = flaky
    eng.start()
    try:
        results = []
        for _ in range(2):
            done = threading.Event()
            events = []
            eng.submit(Job([1, 400, 500], SamplingParams(temperature=0), 5,
                           lambda kind, x, ev=events, d=done: (ev.append((kind, x)), kind != "text" and d.set())))
            assert done.wait(30)
            results.append(events)
        assert results[0] == [("error", "internal error: RuntimeError: a device fault")]
        assert results[1][-1][0] == "done" and results[1][-1][1].completion_tokens == 5
    finally:
        eng.stop()


def test_one_prompt_is_prefilled_alone_in_ubatch_pieces():
    """A prompt in a server with idle slots runs only its own row, ubatch tokens a forward (not
    ubatch / N tokens over every slot's row), and continues as `minikv generate` does."""
    from minikv.backend import get_backend
    from minikv.generate import Session
    from minikv.models import load_model
    from minikv.sampler import SamplingParams
    from minikv.server.engine import Engine, Job
    from minikv.tokenizer import Tokenizer

    model, tok = load_model(STORIES, get_backend("cpu")), Tokenizer.from_dir(STORIES)
    prompt = tok.encode("Once upon a time there was a little dog who liked to run in the park. " * 6)[:150]
    eng = Engine(model, tok, "fp16", 4, 256, 64)
    real, shapes = model.forward, []
    model.forward = lambda ids, cache, **k: (shapes.append(ids.shape), real(ids, cache, **k))[1]
    eng.start()
    try:
        done, events = threading.Event(), []
        eng.submit(Job(prompt, SamplingParams(temperature=0), 8,
                       lambda kind, x: (events.append((kind, x)), kind != "text" and done.set())))
        assert done.wait(30)
    finally:
        eng.stop()
        model.forward = real
    assert len(prompt) > 128 and shapes[:3] == [(1, 64), (1, 64), (1, len(prompt) - 128)]
    want = "".join(Session(model, tok, ctx_size=256).generate(prompt, SamplingParams(temperature=0), 8))
    assert "".join(x for kind, x in events if kind == "text") == want
