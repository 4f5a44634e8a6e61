"""minikv: a small LLM inference runtime with 2-4 bit quantized KV caches."""

__version__ = "0.1.0"
