"""Cache methods register here by name; `--kv SPEC` strings are parsed here."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MinikvError

_METHODS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        _METHODS[name] = cls
        return cls
    return deco


def methods() -> list[str]:
    return sorted(_METHODS)


@dataclass(frozen=True)
class KVSpec:
    """Parsed `METHOD[:BITS][,key=value...]`, e.g. `patternkv:2,sink=4`."""
    method: str
    bits: int | None = None
    options: dict = field(default_factory=dict)
    text: str = ""

    def __str__(self):
        return self.text or self.method


# Named presets: the best spec found per bit budget (SmolLM2-135M over nine texts, bench/RESULTS.md
# "Fitted grids"). A preset name is replaced by its spec, which is what every output then shows.
PRESETS = {
    "q2": "kivi:2,g=64,rot=kv,sink=16",  # fit=mse / fit=v: better perplexity, fewer passkeys (RESULTS)
    "q3": "kivi:2,kbits=3,g=64,rot=kv,sink=32,fit=v",
    "q4": "kivi:4,vbits=3,rot=kv,sink=16",
}


def parse_kv_spec(text: str) -> KVSpec:
    # a preset, alone or with options that override its own (q2,sink=4)
    name, comma, rest = text.strip().partition(",")
    preset = PRESETS.get(name.strip().lower())
    if preset:
        text = preset + comma + rest
    head, *opts = [p.strip() for p in text.strip().split(",")]
    method, _, bits = head.partition(":")
    method = method.lower()
    if method not in _METHODS:
        raise MinikvError(f"--kv {text!r}: unknown method {method!r}; available: {', '.join(methods())}, "
                          f"or a preset: {', '.join(f'{k} ({v})' for k, v in PRESETS.items())}")
    options = {}
    for o in opts:
        key, eq, val = o.partition("=")
        if not eq or not key:
            raise MinikvError(f"--kv {text!r}: option {o!r} is not key=value")
        options[key.strip()] = val.strip()
    try:
        nbits = int(bits) if bits else None
    except ValueError:
        raise MinikvError(f"--kv {text!r}: bits {bits!r} is not an integer") from None
    if preset and comma:  # show the preset's spec once, overrides in place
        text = head + "".join(f",{k}={v}" for k, v in options.items())
    spec = KVSpec(method, nbits, options, text.strip())
    _METHODS[method].validate(spec)
    return spec


def make_cache(spec: KVSpec | str, geom, batch: int, capacity: int, backend, attention: str = "auto"):
    """attention: "auto" (the fused CUDA kernel where it applies), "reference" (array ops)."""
    if isinstance(spec, str):
        spec = parse_kv_spec(spec)
    return _METHODS[spec.method](geom, batch, capacity, backend, spec, attention=attention)


def method_class(spec: KVSpec) -> type:
    return _METHODS[spec.method]


def cache_bytes(spec: KVSpec | str, geom, batch: int, capacity: int, backend) -> int:
    """Bytes a cache of `spec` allocates for `capacity` tokens per sequence, counted by the
    method's own constructor without allocating anything."""
    if isinstance(spec, str):
        spec = parse_kv_spec(spec)
    return _METHODS[spec.method](geom, batch, capacity, backend, spec, plan_only=True).allocated_bytes
