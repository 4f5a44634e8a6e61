"""KV caches: the contract (base), the registry of methods, and the methods themselves."""
from .base import KVCache, KVGeometry
from .registry import KVSpec, cache_bytes, make_cache, methods, parse_kv_spec
from . import dense  # noqa: F401  (registers fp16)

__all__ = ["KVCache", "KVGeometry", "KVSpec", "cache_bytes", "make_cache", "methods", "parse_kv_spec"]
from . import kivi  # noqa: F401,E402  (registers kivi)
from . import nqkv  # noqa: F401,E402  (registers nqkv)
from . import patternkv  # noqa: F401,E402  (registers patternkv)
