"""Rotary position embedding tables in the HF rotate-half layout, with rope scaling."""
from __future__ import annotations

import math

import numpy as np

from minikv.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """(D/2,) float32 inverse frequencies, computed as transformers does (in float32)."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    f = (np.float32(1.0) / (np.float32(rope.theta) ** exps)).astype(np.float32)
    if rope.type == "linear":
        f = f / np.float32(rope.factor)
    elif rope.type == "llama3":
        f = _llama3(f, rope)
    return f.astype(np.float32)


def _llama3(f: np.ndarray, r: RopeConfig) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (transformers' _compute_llama3_parameters).
    low_wl = r.original_max_position_embeddings / r.low_freq_factor
    high_wl = r.original_max_position_embeddings / r.high_freq_factor
    wavelen = np.float32(2 * math.pi) / f
    f_l = np.where(wavelen > low_wl, f / np.float32(r.factor), f)
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
        r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * f_l / np.float32(r.factor) + smooth * f_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, f_l).astype(np.float32)


class Rope:
    def __init__(self, rope: RopeConfig, head_dim: int, xp):
        self.xp = xp
        self.inv_freq = xp.asarray(inv_freq(rope, head_dim))  # (D/2,)

    def step(self, positions) -> "RopeStep":
        """The rotation of one forward: positions (B, T) int32 on the device."""
        return RopeStep(self, positions)


class RopeStep:
    """What the ops need to rotate one forward's q and k: the positions (kernels compute the
    angles themselves) or, for the array ops, the cos/sin tables, built on first use."""

    def __init__(self, rope: Rope, positions):
        self.rope, self.positions, self.inv_freq = rope, positions, rope.inv_freq
        self._tables = None

    def device_positions(self):
        """positions (B, T) int32 on the device, shared by every layer."""
        return self.positions

    def cos_sin(self):
        """cos, sin (B, 1, T, D) float32 on the device."""
        if self._tables is None:
            xp = self.rope.xp
            freqs = self.positions.astype(np.float32)[:, :, None] * self.inv_freq[None, None, :]  # (B, T, D/2)
            emb = xp.concatenate([freqs, freqs], axis=-1)[:, None]  # (B, 1, T, D)
            self._tables = (xp.cos(emb), xp.sin(emb))
        return self._tables
