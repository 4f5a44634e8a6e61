"""`minikv serve`: the engine (continuous batching) and its OpenAI-compatible HTTP side."""
