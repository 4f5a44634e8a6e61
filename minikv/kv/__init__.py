"""KV caches: the contract (base), the registry of methods, and the methods themselves."""
from .base import KVCache, KVGeometry
from .registry import KVSpec, make_cache, methods, parse_kv_spec
from . import dense  # noqa: F401  (registers fp16)

__all__ = ["KVCache", "KVGeometry", "KVSpec", "make_cache", "methods", "parse_kv_spec"]
