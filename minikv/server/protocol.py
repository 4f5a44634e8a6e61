"""OpenAI request bodies -> what the engine takes, and the response shapes. Every malformed field
is one ApiError naming it (HTTP 400 with OpenAI's error object); unknown fields are ignored, as
OpenAI does."""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from ..errors import MinikvError
from ..sampler import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # llama-server's extension


def _num(body: dict, key: str, lo: float, hi: float, default=None, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} from {lo} to {hi}, got {v!r}", key)
    return v


def parse_common(body: dict, served_model: str) -> Request:
    """The sampling, length, stop and stream fields shared by chat and text completions."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model != served_model):
        raise ApiError(400, f"unknown model {model!r}; this server serves {served_model!r}", "model",
                       "model_not_found")
    n = _num(body, "n", 1, 1, 1, integer=True)  # noqa: F841 - one choice per request
    d = SamplingParams()
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ApiError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    seed = _num(body, "seed", -2**63, 2**63 - 1, None, integer=True)
    try:
        params = SamplingParams(
            temperature=_num(body, "temperature", 0.0, 2.0, d.temperature),
            top_k=_num(body, "top_k", 0, 1 << 30, d.top_k, integer=True),
            top_p=_num(body, "top_p", 0.0, 1.0, d.top_p),
            min_p=_num(body, "min_p", 0.0, 1.0, d.min_p),
            repeat_penalty=_num(body, "repeat_penalty", 0.0, 10.0, d.repeat_penalty),
            repeat_last_n=_num(body, "repeat_last_n", -1, 1 << 30, d.repeat_last_n, integer=True),
            presence_penalty=_num(body, "presence_penalty", -2.0, 2.0, 0.0),
            frequency_penalty=_num(body, "frequency_penalty", -2.0, 2.0, 0.0),
            seed=None if seed is None or seed < 0 else seed)
    except MinikvError as e:  # the sampler's own range checks (top_p 0, min_p 1, ...)
        raise ApiError(400, str(e).replace("--", "").replace("temp ", "temperature "), None) from None
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, f"'ignore_eos' must be a boolean, got {ignore_eos!r}", "ignore_eos")
    return Request(params, -1 if max_tokens is None else max_tokens, tuple(stop), stream,
                   bool(opts.get("include_usage", False)), ignore_eos)


def chat_messages(body: dict) -> list[dict]:
    """The messages, their content flattened to text (text parts of a content list joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        content = m.get("content", "")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(body: dict, tok) -> list[int]:
    """prompt: a string, a list of one string, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        ids = tok.encode(p)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < tok.vocab_size for t in p):
            raise ApiError(400, f"'prompt' holds token ids outside 0..{tok.vocab_size - 1}", "prompt")
        ids = list(p)
    else:
        raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    return ids


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


def envelope(rid: str, obj: str, model: str, choices: list, **extra) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}
