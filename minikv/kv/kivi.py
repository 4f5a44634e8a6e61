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
from .packing import pack, uniform_codes, uniform_dequant, uniform_params, unpack
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
        L = range(g.n_layers)
        self.kc = [xp.zeros((B, H, NC, G, D * kb // 8), np.uint8) for _ in L]
        self.ks = [xp.zeros((B, H, NC, D), np.float16) for _ in L]
        self.km = [xp.zeros((B, H, NC, D), np.float16) for _ in L]
        self.vc = [xp.zeros((B, H, NC * G, D * vb // 8), np.uint8) for _ in L]
        self.vs = [xp.zeros((B, H, NC * G, D // self.vgroup), np.float16) for _ in L]
        self.vm = [xp.zeros((B, H, NC * G, D // self.vgroup), np.float16) for _ in L]

    def _flush(self, layer, rows, c0, n, xk, xv):
        xp, G, r = self.xp, self.G, self._ix(rows)
        nb, H, _, D = xk.shape
        k = xk[:, :, :n * G].astype(np.float32).reshape(nb, H, n, G, D)
        kc, ks, km, k_hat = self.q.quantize_k_chunks(xp, k, self.s["kbits"])
        self.kc[layer][r, :, c0:c0 + n] = kc
        self.ks[layer][r, :, c0:c0 + n] = ks
        self.km[layer][r, :, c0:c0 + n] = km
        v = xv[:, :, :n * G].astype(np.float32)
        vc, vs, vm, v_hat = self.q.quantize_v_tokens(xp, v, self.s["vbits"], self.vgroup)
        t0 = c0 * G
        self.vc[layer][r, :, t0:t0 + n * G] = vc
        self.vs[layer][r, :, t0:t0 + n * G] = vs
        self.vm[layer][r, :, t0:t0 + n * G] = vm
        return k_hat.reshape(nb, H, n * G, D), v_hat

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
