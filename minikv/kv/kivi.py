"""`kivi`: asymmetric uniform quantization (KIVI). K per channel over each chunk of G tokens
(K has outlier channels: per-channel ranges keep them from widening everyone's), V per token
in groups of min(D, 128) channels. Scales and mins fp16; codes packed token-major.

Per layer (B sequences, Hkv heads, NC chunks):
  kc (B, Hkv, NC, G, D*kb/8) uint8   ks, km (B, Hkv, NC, D) fp16
  vc (B, Hkv, NC*G, D*vb/8) uint8    vs, vm (B, Hkv, NC*G, D/gs) fp16
"""
from __future__ import annotations

import numpy as np

from .chunked import ChunkedQuantCache
from .packing import pack, row_index, uniform_codes, uniform_dequant, uniform_params, unpack
from .registry import register


def quantize_k_chunks(xp, x, bits: int):
    """x (..., n, G, D) float32 -> packed codes (..., n, G, D*b/8), scale, min (..., n, D),
    and the dequantized values (..., n, G, D)."""
    scale, mn = uniform_params(xp, x, axis=-2, bits=bits)  # (..., n, 1, D)
    codes = uniform_codes(xp, x, scale, mn, bits)
    return pack(xp, codes, bits), scale[..., 0, :], mn[..., 0, :], uniform_dequant(codes, scale, mn)


def quantize_v_tokens(xp, x, bits: int, group: int):
    """x (..., T, D) float32 -> packed codes (..., T, D*b/8), scale, min (..., T, D/group),
    and the dequantized values (..., T, D)."""
    *lead, T, D = x.shape
    xg = x.reshape(*lead, T, D // group, group)
    scale, mn = uniform_params(xp, xg, axis=-1, bits=bits)  # (..., T, D/group, 1)
    codes = uniform_codes(xp, xg, scale, mn, bits).reshape(*lead, T, D)
    x_hat = uniform_dequant(codes.reshape(xg.shape), scale, mn).reshape(*lead, T, D)
    return pack(xp, codes, bits), scale[..., 0], mn[..., 0], x_hat


def store_k_chunks(xp, x, n: int, G: int, bits: int, out, rows, c0: int, hat: bool = True):
    """Quantize chunks 0..n-1 (G tokens each) of x (nb, H, w >= n*G, D) and store them as chunks
    c0.. of batch rows `rows` in out = (codes (B, H, NC, G, D*b/8), scale, min (B, H, NC, D)).
    Returns x_hat (nb, H, n*G, D) float32 if hat, else None."""
    nb, H, _, D = x.shape
    kc, ks, km, k_hat = quantize_k_chunks(xp, x[:, :, :n * G].astype(np.float32).reshape(nb, H, n, G, D), bits)
    r = row_index(xp, rows)
    for dst, a in zip(out, (kc, ks, km)):
        dst[r, :, c0:c0 + n] = a
    return k_hat.reshape(nb, H, n * G, D) if hat else None


def store_v_tokens(xp, x, T: int, bits: int, group: int, out, rows, t0: int, hat: bool = True):
    """Quantize tokens 0..T-1 of x (nb, H, w >= T, D) per token in groups of `group` channels and
    store them as tokens t0.. of batch rows `rows` in out = (codes (B, H, cap, D*b/8), scale, min
    (B, H, cap, D/group)). Returns x_hat (nb, H, T, D) float32 if hat, else None."""
    vc, vs, vm, v_hat = quantize_v_tokens(xp, x[:, :, :T].astype(np.float32), bits, group)
    r = row_index(xp, rows)
    for dst, a in zip(out, (vc, vs, vm)):
        dst[r, :, t0:t0 + T] = a
    return v_hat if hat else None


@register("kivi")
class KiviCache(ChunkedQuantCache):
    method = "kivi"
    BITS = (2, 3, 4, 8, 16)  # 16: a diagnostic setting that must reproduce the fp16 cache
    DEFAULT_BITS = 2

    def allocate(self):
        xp, g, B = self.xp, self.geom, self.batch
        H, D, G, NC = g.n_kv_heads, g.head_dim, self.G, self.n_chunks_max
        kb, vb = self.s["kbits"], self.s["vbits"]
        self.vgroup = min(D, 128)
        self.q = self.quantizers("minikv.kv.kivi", "minikv.cuda.kivi")
        self.kc = self.per_layer((B, H, NC, G, D * kb // 8), np.uint8)
        self.ks = self.per_layer((B, H, NC, D), np.float16)
        self.km = self.per_layer((B, H, NC, D), np.float16)
        self.vc = self.per_layer((B, H, NC * G, D * vb // 8), np.uint8)
        self.vs = self.per_layer((B, H, NC * G, D // self.vgroup), np.float16)
        self.vm = self.per_layer((B, H, NC * G, D // self.vgroup), np.float16)

    def _flush(self, layer, rows, c0, n, xk, xv):
        xp, G, L, hat = self.xp, self.G, layer, self.fused is None  # only the reference attention reads x_hat
        k_hat = self.q.store_k_chunks(xp, xk, n, G, self.s["kbits"], (self.kc[L], self.ks[L], self.km[L]), rows, c0, hat)
        v_hat = self.q.store_v_tokens(xp, xv, n * G, self.s["vbits"], self.vgroup, (self.vc[L], self.vs[L], self.vm[L]),
                                      rows, c0 * G, hat)
        return k_hat, v_hat

    def kernel_storage(self, layer):
        from ..cuda.attention import Storage

        return Storage(self.method, self.s["kbits"], self.s["vbits"], self.kc[layer], self.ks[layer], self.km[layer],
                       self.vc[layer], self.vs[layer], self.vm[layer], self.n_chunks_max, self.G)

    def dequantize(self, layer):
        """K^, V^ (B, Hkv, NC*G, D) float32 rebuilt from the packed storage alone."""
        xp, D, G = self.xp, self.geom.head_dim, self.G
        B, H, NC = self.kc[layer].shape[:3]
        kcodes = unpack(xp, self.kc[layer], self.s["kbits"], D)  # (B, H, NC, G, D)
        k = uniform_dequant(kcodes, self.ks[layer][:, :, :, None], self.km[layer][:, :, :, None])
        vcodes = unpack(xp, self.vc[layer], self.s["vbits"], D).reshape(B, H, NC * G, D // self.vgroup, -1)
        v = uniform_dequant(vcodes, self.vs[layer][..., None], self.vm[layer][..., None])
        return k.reshape(B, H, NC * G, D), v.reshape(B, H, NC * G, D)

    def quantized_bytes(self):
        g, G = self.geom, self.G
        D, kb, vb = g.head_dim, self.s["kbits"], self.s["vbits"]
        per_chunk = G * D * kb // 8 + 2 * D * 2 + G * D * vb // 8 + G * (D // self.vgroup) * 2 * 2
        return int(self.n_chunks.sum()) * g.n_layers * g.n_kv_heads * per_chunk
