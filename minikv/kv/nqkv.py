"""`nqkv`: normal-quantile block quantization (NQKV). Blocks of `bs` values (default 64),
each scaled by its fp16 absmax and mapped to the nearest of 2^b NormalFloat levels (KV
values within a block are close to normal, so quantile levels beat uniform ones).

K and V blocks run along head_dim of one token (kaxis=token, the paper's choice). With
kaxis=channel, K blocks instead run along `bs` tokens of one channel within a chunk (a
measured option for models with outlier K channels or large k biases).

Per layer (B sequences, Hkv heads, NC chunks, T = NC*G token slots):
  kc (B, Hkv, T, D*kb/8) uint8   ka (B, Hkv, T, D/bs) fp16, or (B, Hkv, NC, G/bs, D) for kaxis=channel
  vc (B, Hkv, T, D*vb/8) uint8   va (B, Hkv, T, D/bs) fp16
"""
from __future__ import annotations

import numpy as np

from ..errors import MinikvError
from .chunked import ChunkedQuantCache
from .packing import nf_codes, nf_dequant, nf_levels, nf_params, pack, unpack
from .registry import register


def quantize_token_blocks(xp, x, bits: int, bs: int):
    """x (..., T, D) float32 -> packed codes (..., T, D*b/8), absmax (..., T, D/bs), x_hat."""
    *lead, T, D = x.shape
    xb = x.reshape(*lead, T, D // bs, bs)
    a = nf_params(xp, xb, axis=-1)  # (..., T, D/bs, 1)
    codes = nf_codes(xp, xb, a, bits)
    x_hat = nf_dequant(xp, codes, a, bits).reshape(*lead, T, D)
    return pack(xp, codes.reshape(*lead, T, D), bits), a[..., 0], x_hat


def quantize_channel_blocks(xp, x, bits: int, bs: int):
    """x (..., n, G, D) float32 -> packed codes (..., n, G, D*b/8), absmax (..., n, G/bs, D), x_hat."""
    *lead, n, G, D = x.shape
    xb = x.reshape(*lead, n, G // bs, bs, D)
    a = nf_params(xp, xb, axis=-2)  # (..., n, G/bs, 1, D)
    codes = nf_codes(xp, xb, a, bits)
    x_hat = nf_dequant(xp, codes, a, bits).reshape(*lead, n, G, D)
    return pack(xp, codes.reshape(*lead, n, G, D), bits), a[..., 0, :], x_hat


@register("nqkv")
class NqkvCache(ChunkedQuantCache):
    method = "nqkv"
    BITS = (2, 3, 4)
    DEFAULT_BITS = 2
    INT_OPTIONS = {**ChunkedQuantCache.INT_OPTIONS, "bs": 64}
    STR_OPTIONS = {**ChunkedQuantCache.STR_OPTIONS, "kaxis": ("token", "channel")}

    @classmethod
    def check_settings(cls, s, bad):
        if s["bs"] < 8 or s["bs"] % 8:
            raise bad(f"bs={s['bs']} must be a positive multiple of 8")
        if s["kaxis"] == "channel" and s["g"] % s["bs"]:
            raise bad(f"with kaxis=channel, bs={s['bs']} must divide g={s['g']}")

    def allocate(self):
        xp, g, B = self.xp, self.geom, self.batch
        H, D, G, NC = g.n_kv_heads, g.head_dim, self.G, self.n_chunks_max
        self.bs = min(self.s["bs"], D)  # blocks along head_dim cannot be longer than it
        if D % self.bs:
            raise MinikvError(f"--kv {self.spec}: bs={self.bs} does not divide head_dim {D}")
        kb, vb, T = self.s["kbits"], self.s["vbits"], NC * G
        self.channel = self.s["kaxis"] == "channel"
        self.q = self.quantizers("minikv.kv.nqkv", "minikv.cuda.nqkv")
        # the K and V code levels as the fused kernel reads them (plan-only caches never attend)
        self._levels = None if self.plan_only else tuple(self.xp.asarray(nf_levels(self.s[k])) for k in ("kbits", "vbits"))
        ka_shape = (B, H, NC, G // self.s["bs"], D) if self.channel else (B, H, T, D // self.bs)
        self.kc = self.per_layer((B, H, T, D * kb // 8), np.uint8)
        self.ka = self.per_layer(ka_shape, np.float16)
        self.vc = self.per_layer((B, H, T, D * vb // 8), np.uint8)
        self.va = self.per_layer((B, H, T, D // self.bs), np.float16)

    def _flush(self, layer, rows, c0, n, xk, xv):
        xp, G, r = self.xp, self.G, self._ix(rows)
        nb, H, _, D = xk.shape
        t0, t1 = c0 * G, (c0 + n) * G
        k = xp.ascontiguousarray(xk[:, :, :n * G], dtype=np.float32)  # xk may be a view into the projection
        if self.channel:
            kc, ka, k_hat = self.q.quantize_channel_blocks(xp, k.reshape(nb, H, n, G, D), self.s["kbits"], self.s["bs"])
            self.kc[layer][r, :, t0:t1] = kc.reshape(nb, H, n * G, -1)
            self.ka[layer][r, :, c0:c0 + n] = ka
            k_hat = k_hat.reshape(nb, H, n * G, D)
        else:
            kc, ka, k_hat = self.q.quantize_token_blocks(xp, k, self.s["kbits"], self.bs)
            self.kc[layer][r, :, t0:t1] = kc
            self.ka[layer][r, :, t0:t1] = ka
        vc, va, v_hat = self.q.quantize_token_blocks(xp, xp.ascontiguousarray(xv[:, :, :n * G], dtype=np.float32),
                                                    self.s["vbits"], self.bs)
        self.vc[layer][r, :, t0:t1] = vc
        self.va[layer][r, :, t0:t1] = va
        return k_hat, v_hat

    def kernel_storage(self, layer):
        from ..cuda.nqkv import NormalStorage

        return NormalStorage(kbits=self.s["kbits"], vbits=self.s["vbits"], kc=self.kc[layer], ka=self.ka[layer],
                             vc=self.vc[layer], va=self.va[layer], n_chunks_cap=self.n_chunks_max, G=self.G,
                             bs=self.s["bs"], levels_k=self._levels[0], levels_v=self._levels[1], channel=self.channel)

    def dequantize(self, layer):
        """K^, V^ (B, Hkv, NC*G, D) float32 rebuilt from the packed storage alone."""
        xp, D, G = self.xp, self.geom.head_dim, self.G
        B, H, T = self.kc[layer].shape[:3]
        kcodes = unpack(xp, self.kc[layer], self.s["kbits"], D)
        if self.channel:
            bs = self.s["bs"]
            ka = self.ka[layer][:, :, :, :, None, :]  # (B, H, NC, G/bs, 1, D)
            k = nf_dequant(xp, kcodes.reshape(B, H, T // G, G // bs, bs, D), ka, self.s["kbits"])
        else:
            k = nf_dequant(xp, kcodes.reshape(B, H, T, D // self.bs, self.bs), self.ka[layer][..., None],
                           self.s["kbits"])
        vcodes = unpack(xp, self.vc[layer], self.s["vbits"], D).reshape(B, H, T, D // self.bs, self.bs)
        v = nf_dequant(xp, vcodes, self.va[layer][..., None], self.s["vbits"])
        return k.reshape(B, H, T, D), v.reshape(B, H, T, D)

    def quantized_bytes(self):
        g, G = self.geom, self.G
        D, kb, vb = g.head_dim, self.s["kbits"], self.s["vbits"]
        k_scales = (G // self.s["bs"]) * D if self.channel else G * (D // self.bs)
        per_chunk = G * D * (kb + vb) // 8 + 2 * (k_scales + G * (D // self.bs))
        return int(self.n_chunks.sum()) * g.n_layers * g.n_kv_heads * per_chunk
