"""The HTTP side of `minikv serve` (aiohttp): OpenAI's chat and text completions (streamed as
server-sent events or whole), models, health, Prometheus metrics and tokenize. The model loads
on a thread after the server starts (/health answers 503 until then); requests become engine
jobs, whose results come back through an asyncio queue per request. A client that goes away is
noticed within POLL_S and its job cancelled (its slot frees at the engine's next turn)."""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from typing import Callable

from aiohttp import web

from ..errors import MinikvError
from .engine import Engine, Finish, Job
from .protocol import ApiError, chat_messages, completion_prompt, envelope, new_id, parse_common, usage

POLL_S = 0.25


class State:
    """What the handlers share: the engine once loaded, or why loading failed."""

    def __init__(self, load: Callable[[], tuple], model_id: str, api_key: str | None):
        self.load, self.model_id, self.api_key = load, model_id, api_key
        self.engine: Engine | None = None
        self.tok = None
        self.error: str | None = None
        self.started = int(time.time())

    def start_loading(self) -> None:
        def run():
            try:
                self.engine, self.tok = self.load()
                self.engine.start()
            except MinikvError as e:
                self.error = str(e)
            except Exception as e:  # noqa: BLE001 - reported by /health and every request
                self.error = f"{type(e).__name__}: {e}"
        threading.Thread(target=run, name="minikv-load", daemon=True).start()


def build_app(state: State) -> web.Application:
    app = web.Application(middlewares=[_errors(state)], client_max_size=64 << 20)
    app["state"] = state
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)

    async def on_startup(app):
        state.start_loading()

    async def on_cleanup(app):
        if state.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, state.engine.stop)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def _errors(state: State):
    @web.middleware
    async def mw(request, handler):
        try:
            if state.api_key and request.path != "/health":
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                    raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                                   "invalid_api_key", "authentication_error")
            return await handler(request)
        except ApiError as e:
            headers = {"Retry-After": "1"} if e.status == 429 else None
            return web.json_response(e.body(), status=e.status, headers=headers)
    return mw


def _engine(request) -> Engine:
    st: State = request.app["state"]
    if st.error:
        raise ApiError(500, f"the model failed to load: {st.error}", None, None, "server_error")
    if st.engine is None:
        raise ApiError(503, "the model is loading; retry shortly", None, "loading", "server_error")
    return st.engine


async def _body(request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def health(request):
    st: State = request.app["state"]
    if st.error:
        return web.json_response({"status": "error", "message": st.error}, status=500)
    if st.engine is None:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request):
    st: State = request.app["state"]
    return web.json_response({"object": "list", "data": [
        {"id": st.model_id, "object": "model", "created": st.started, "owned_by": "minikv"}]})


async def metrics(request):
    eng = _engine(request)
    s = eng.stats
    lines = []
    for name, kind, help_, value in (
            ("requests_total", "counter", "requests accepted", s.requests),
            ("prompt_tokens_total", "counter", "prompt tokens of accepted requests", s.prompt_tokens),
            ("tokens_generated_total", "counter", "tokens generated", s.generated_tokens),
            ("queue_depth", "gauge", "requests waiting for a slot", s.queue),
            ("slots_busy", "gauge", "slots running a request", s.busy),
            ("slots_total", "gauge", "slots", len(eng.slots)),
            ("kv_bytes", "gauge", "bytes the KV cache holds for its tokens", s.kv_bytes),
            ("kv_bits_per_value", "gauge", "KV cache bits per stored value", round(s.bits_per_value, 4))):
        lines += [f"# HELP minikv_{name} {help_}", f"# TYPE minikv_{name} {kind}", f"minikv_{name} {value}"]
    return web.Response(body=("\n".join(lines) + "\n").encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def tokenize(request):
    _engine(request)
    body = await _body(request)
    text = body.get("content")
    if not isinstance(text, str):
        raise ApiError(400, "'content' must be a string", "content")
    add = body.get("add_special", False)
    if not isinstance(add, bool):
        raise ApiError(400, "'add_special' must be a boolean", "add_special")
    return web.json_response({"tokens": request.app["state"].tok.encode(text, add_special_tokens=add)})


async def chat_completions(request):
    eng = _engine(request)
    st: State = request.app["state"]
    body = await _body(request)
    req = parse_common(body, st.model_id)
    try:
        ids = st.tok.encode(st.tok.render_chat(chat_messages(body)), add_special_tokens=False)
    except MinikvError as e:
        raise ApiError(400, str(e), "messages") from None
    return await _run(request, eng, req, ids, chat=True)


async def completions(request):
    eng = _engine(request)
    st: State = request.app["state"]
    body = await _body(request)
    req = parse_common(body, st.model_id)
    return await _run(request, eng, req, completion_prompt(body, st.tok), chat=False)


async def _run(request, eng: Engine, req, ids: list[int], chat: bool):
    st: State = request.app["state"]
    if len(ids) > eng.ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but a slot holds {eng.ctx}; shorten it",
                       "messages" if chat else "prompt", "context_length_exceeded")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(ids, req.params, req.max_tokens, lambda kind, x: loop.call_soon_threadsafe(queue.put_nowait, (kind, x)),
              req.stop, req.ignore_eos)
    if not eng.submit(job):
        raise ApiError(429, "every slot is busy and the queue is full; retry later", None, "queue_full",
                       "rate_limit_error")
    rid, obj = new_id("chatcmpl" if chat else "cmpl"), "chat.completion" if chat else "text_completion"

    async def events():
        """(kind, value) from the engine; cancels the job if the client goes away meanwhile."""
        while True:
            try:
                kind, x = await asyncio.wait_for(queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    job.cancelled = True
                    return
                continue
            yield kind, x
            if kind != "text":
                return

    try:
        if req.stream:
            return await _stream(request, events(), rid, obj, st.model_id, chat, req.include_usage)
        text = []
        async for kind, x in events():
            if kind == "text":
                text.append(x)
            elif kind == "error":
                raise ApiError(500, x, None, None, "server_error")
            else:
                fin: Finish = x
                choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                           "finish_reason": fin.reason, "logprobs": None} if chat else
                          {"index": 0, "text": "".join(text), "finish_reason": fin.reason, "logprobs": None})
                return web.json_response(envelope(rid, obj, st.model_id, [choice], usage=usage(fin)))
        return web.Response(status=499)  # the client went away
    finally:
        job.cancelled = True  # no-op once finished; frees the slot if the handler was cut short


async def _stream(request, events, rid, obj, model_id, chat: bool, include_usage: bool):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def piece(text, finish=None, first=False):
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    async def send(payload):
        await resp.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    try:
        if chat:
            await send(envelope(rid, chunk_obj, model_id, [piece("", first=True)]))
        async for kind, x in events:
            if kind == "text":
                await send(envelope(rid, chunk_obj, model_id, [piece(x)]))
            elif kind == "error":
                await send({"error": {"message": x, "type": "server_error", "param": None, "code": None}})
            else:
                await send(envelope(rid, chunk_obj, model_id, [piece("", x.reason)]))
                if include_usage:
                    await send(envelope(rid, chunk_obj, model_id, [], usage=usage(x)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away: the caller cancels the job
    return resp
