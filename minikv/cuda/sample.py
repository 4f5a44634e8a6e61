"""The sampler's draw in one kernel (kernels_cu/sample.cu): top-k by radix select, then top-p,
min-p, temperature and one draw on those k, as minikv.sampler's array ops compute it."""
from __future__ import annotations

import functools

import numpy as np

from .module import check, f32, i32, kernel

KMAX, THREADS = 256, 1024  # sample.cu's SAMPLE_KMAX, SAMPLE_THREADS


def supports(V: int, top_k: int) -> bool:
    return 0 < top_k <= KMAX and top_k < V


@functools.cache
def _kernel():  # looked up once: the draw runs every token
    return kernel("sample", "sample_top")


def sample_top(logits, top_k: int, top_p: float, min_p: float, temperature: float, u: float, out):
    """logits (V,) float32 contiguous; out (1,) int32, written on the device: the drawn id, or -1
    where the logits are not all finite. Returns out[0] (a device scalar)."""
    V = check("logits", logits, np.float32).shape[0] if logits.ndim == 1 else None
    if V is None:
        raise ValueError(f"logits: expected a (V,) array, got shape {logits.shape}")
    check("out", out, np.int32, (1,))
    if not supports(V, top_k) or temperature <= 0:
        raise ValueError(f"sample_top: top_k={top_k} must be in (0, min({KMAX}, V={V})), temperature > 0")
    _kernel()((1,), (THREADS,), (logits, i32(V), i32(top_k), f32(top_p), f32(min_p), f32(temperature),
                                     f32(u), out))
    return out[0]
