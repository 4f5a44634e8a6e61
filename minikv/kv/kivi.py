"""`kivi`: asymmetric uniform quantization (KIVI). K per channel over each chunk of G tokens
(K has outlier channels: per-channel ranges keep them from widening everyone's), V per token
in groups of min(D, 128) channels. Scales and mins fp16 (sc=16), or an 8-bit log scale and an
int8 zero point (sc=8, packing.compact_params: half the parameter bytes); codes packed token-major.

Per layer (B sequences, Hkv heads, NC chunks):
  kc (B, Hkv, NC, G, D*kb/8) uint8   ks, km (B, Hkv, NC, D) fp16
  vc (B, Hkv, NC*G, D*vb/8) uint8    vs, vm (B, Hkv, NC*G, D/gs) fp16
  (sc=8: ks, vs uint8 scale indices; km, vm int8 zero points)
"""
from __future__ import annotations

import numpy as np

from .chunked import ChunkedQuantCache
from .packing import (CLIP, compact_params, compact_scale_min, pack, row_index, uniform_codes, uniform_dequant,
                      uniform_params, uniform_params_fit, unpack)
from .registry import register


def params(xp, x, axis: int, bits: int, sc: int, fit: str):
    """The stored (scale, min) pair over `axis` of x (fp16, or sc=8's uint8 scale index and int8
    zero point), and the same as the float32 (scale, min) the codes are made against. fit=minmax:
    the grid spans min..max; fit=mse: the least squared error of it and narrower grids."""
    clip = CLIP if fit == "mse" else 0
    if sc == 16:
        scale, mn = uniform_params_fit(xp, x, axis, bits, clip) if clip else uniform_params(xp, x, axis, bits)
        return (scale, mn), (scale, mn)
    e, z = compact_params(xp, x, axis, bits, clip)
    return (e, z), compact_scale_min(xp, e, z)


def float_params(xp, a, b, sc: int):
    """float32 (scale, min) of stored parameters."""
    return (a.astype(np.float32), b.astype(np.float32)) if sc == 16 else compact_scale_min(xp, a, b)


def quantize_k_chunks(xp, x, bits: int, sc: int = 16, fit: str = "minmax"):
    """x (..., n, G, D) float32 -> packed codes (..., n, G, D*b/8), scale, min (..., n, D),
    and the dequantized values (..., n, G, D)."""
    (a, b), (scale, mn) = params(xp, x, -2, bits, sc, fit)  # (..., n, 1, D)
    codes = uniform_codes(xp, x, scale, mn, bits)
    return pack(xp, codes, bits), a[..., 0, :], b[..., 0, :], uniform_dequant(codes, scale, mn)


def quantize_v_tokens(xp, x, bits: int, group: int, sc: int = 16, fit: str = "minmax"):
    """x (..., T, D) float32 -> packed codes (..., T, D*b/8), scale, min (..., T, D/group),
    and the dequantized values (..., T, D)."""
    *lead, T, D = x.shape
    xg = x.reshape(*lead, T, D // group, group)
    (a, b), (scale, mn) = params(xp, xg, -1, bits, sc, fit)  # (..., T, D/group, 1)
    codes = uniform_codes(xp, xg, scale, mn, bits).reshape(*lead, T, D)
    x_hat = uniform_dequant(codes.reshape(xg.shape), scale, mn).reshape(*lead, T, D)
    return pack(xp, codes, bits), a[..., 0], b[..., 0], x_hat


def store_k_chunks(xp, x, n: int, G: int, bits: int, out, rows, c0: int, hat: bool = True, sc: int = 16,
                   fit: str = "minmax"):
    """Quantize chunks 0..n-1 (G tokens each) of x (nb, H, w >= n*G, D) and store them as chunks
    c0.. of batch rows `rows` in out = (codes (B, H, NC, G, D*b/8), scale, min (B, H, NC, D)).
    Returns x_hat (nb, H, n*G, D) float32 if hat, else None."""
    nb, H, _, D = x.shape
    kc, ks, km, k_hat = quantize_k_chunks(xp, x[:, :, :n * G].astype(np.float32).reshape(nb, H, n, G, D), bits, sc, fit)
    r = row_index(xp, rows)
    for dst, a in zip(out, (kc, ks, km)):
        dst[r, :, c0:c0 + n] = a
    return k_hat.reshape(nb, H, n * G, D) if hat else None


def store_v_tokens(xp, x, T: int, bits: int, group: int, out, rows, t0: int, hat: bool = True, sc: int = 16,
                   fit: str = "minmax"):
    """Quantize tokens 0..T-1 of x (nb, H, w >= T, D) per token in groups of `group` channels and
    store them as tokens t0.. of batch rows `rows` in out = (codes (B, H, cap, D*b/8), scale, min
    (B, H, cap, D/group)). Returns x_hat (nb, H, T, D) float32 if hat, else None."""
    vc, vs, vm, v_hat = quantize_v_tokens(xp, x[:, :, :T].astype(np.float32), bits, group, sc, fit)
    r = row_index(xp, rows)
    for dst, a in zip(out, (vc, vs, vm)):
        dst[r, :, t0:t0 + T] = a
    return v_hat if hat else None


@register("kivi")
class KiviCache(ChunkedQuantCache):
    method = "kivi"
    BITS = (2, 3, 4, 8, 16)  # 16: a diagnostic setting that must reproduce the fp16 cache
    DEFAULT_BITS = 2
    INT_OPTIONS = {**ChunkedQuantCache.INT_OPTIONS, "sc": 16}  # bits of a (scale, min) value: 16 or 8
    # the grid: min..max, or least squared error for K and V (mse), K alone (k) or V alone (v)
    STR_OPTIONS = {**ChunkedQuantCache.STR_OPTIONS, "fit": ("minmax", "mse", "k", "v")}

    @classmethod
    def check_settings(cls, s, bad):
        if s["sc"] not in (16, 8):
            raise bad(f"sc={s['sc']} must be 16 (fp16 scales and mins) or 8 (log scale, int8 zero point)")
        if s["sc"] == 8 and max(s["kbits"], s["vbits"]) > 4:
            raise bad("sc=8 takes codes of at most 4 bits")

    def kernel_supports(self) -> bool:
        return self.s["sc"] == 16  # sc=8 has no kernel tile decoder yet

    def allocate(self):
        xp, g, B = self.xp, self.geom, self.batch
        H, D, G, NC = g.n_kv_heads, g.head_dim, self.G, self.n_chunks_max
        kb, vb = self.s["kbits"], self.s["vbits"]
        self.vgroup, sc = min(D, 128), self.s["sc"]
        self.q = self.quantizers("minikv.kv.kivi", "minikv.cuda.kivi")
        st, mt = (np.float16, np.float16) if sc == 16 else (np.uint8, np.int8)
        self.kc = self.per_layer((B, H, NC, G, D * kb // 8), np.uint8)
        self.ks = self.per_layer((B, H, NC, D), st)
        self.km = self.per_layer((B, H, NC, D), mt)
        self.vc = self.per_layer((B, H, NC * G, D * vb // 8), np.uint8)
        self.vs = self.per_layer((B, H, NC * G, D // self.vgroup), st)
        self.vm = self.per_layer((B, H, NC * G, D // self.vgroup), mt)

    def _flush(self, layer, rows, c0, n, xk, xv):
        xp, G, L, hat = self.xp, self.G, layer, self.fused is None  # only the reference attention reads x_hat
        sc, fit = self.s["sc"], self.s["fit"]
        kfit, vfit = ("mse" if fit in ("mse", t) else "minmax" for t in ("k", "v"))
        k_hat = self.q.store_k_chunks(xp, xk, n, G, self.s["kbits"], (self.kc[L], self.ks[L], self.km[L]), rows, c0, hat,
                                      sc, kfit)
        v_hat = self.q.store_v_tokens(xp, xv, n * G, self.s["vbits"], self.vgroup, (self.vc[L], self.vs[L], self.vm[L]),
                                      rows, c0 * G, hat, sc, vfit)
        return k_hat, v_hat

    def kernel_storage(self, layer):
        from ..cuda.kivi import UniformStorage

        return UniformStorage(**self._uniform_arrays(layer))

    def _uniform_arrays(self, layer) -> dict:
        return dict(kbits=self.s["kbits"], vbits=self.s["vbits"], kc=self.kc[layer], ks=self.ks[layer],
                    km=self.km[layer], vc=self.vc[layer], vs=self.vs[layer], vm=self.vm[layer],
                    n_chunks_cap=self.n_chunks_max, G=self.G)

    def dequantize(self, layer):
        """K^, V^ (B, Hkv, NC*G, D) float32 rebuilt from the packed storage alone."""
        xp, D, G = self.xp, self.geom.head_dim, self.G
        B, H, NC = self.kc[layer].shape[:3]
        kcodes = unpack(xp, self.kc[layer], self.s["kbits"], D)  # (B, H, NC, G, D)
        k = uniform_dequant(kcodes, *float_params(xp, self.ks[layer][:, :, :, None], self.km[layer][:, :, :, None],
                                                   self.s["sc"]))
        vcodes = unpack(xp, self.vc[layer], self.s["vbits"], D).reshape(B, H, NC * G, D // self.vgroup, -1)
        v = uniform_dequant(vcodes, *float_params(xp, self.vs[layer][..., None], self.vm[layer][..., None], self.s["sc"]))
        return k.reshape(B, H, NC * G, D), v.reshape(B, H, NC * G, D)

    def quantized_bytes(self):
        g, G = self.geom, self.G
        D, kb, vb = g.head_dim, self.s["kbits"], self.s["vbits"]
        pb = self.s["sc"] // 8  # bytes of one scale or min
        per_chunk = G * D * kb // 8 + 2 * D * pb + G * D * vb // 8 + G * (D // self.vgroup) * 2 * pb
        return int(self.n_chunks.sum()) * g.n_layers * g.n_kv_heads * per_chunk
