"""`patternkv`: pattern-aligned residual quantization (PatternKV, KVQUANT.md section 3).

Per (layer, sequence, kv head), K and V each keep up to Mmax fp16 pattern vectors. The first
flush of a sequence mines M0 patterns with KMeans over its window (the prefill; past `kmpoints`
tokens, over that many evenly spaced ones, token 0 included, which bounds the prefill cost)
and assigns those chunks by L2; every later chunk adds its Chebyshev centre (while under the
budget) and is assigned by min-max distance. K residuals k - C[a] are quantized as kivi K;
V residuals as kivi V, per token only where the residual is narrower enough (the V adaptive
threshold, a 1-bit mask), else the raw V.

Per layer (B sequences, Hkv heads, NC chunks, T = NC*G token slots), besides kivi's arrays:
  kidx, vidx (B, Hkv, T) uint8     vmask (B, Hkv, T/8) uint8 (bit t%8 of byte t//8)
  kpat, vpat (B, Hkv, Mmax, D) fp16, and the pattern count per (layer, sequence).
"""
from __future__ import annotations

import numpy as np

from .kivi import KiviCache
from .patterns import token_patterns
from .registry import register


@register("patternkv")
class PatternKVCache(KiviCache):
    method = "patternkv"
    BITS = (2, 3, 4)
    INT_OPTIONS = {**KiviCache.INT_OPTIONS, "m": 32, "mmax": 256, "kmpoints": 1024}

    @classmethod
    def check_settings(cls, s, bad):
        if s["sc"] != 16 or s["fit"] != "minmax":
            raise bad("sc=8 and fit=mse are kivi's alone: patternkv stores fp16 min/max scales and mins")
        if not 1 <= s["m"] <= s["mmax"] <= 256:
            raise bad(f"need 1 <= m <= mmax <= 256 (an index is one byte), got m={s['m']} mmax={s['mmax']}")
        if s["kmpoints"] and s["kmpoints"] < s["m"]:  # KMeans needs at least m points
            raise bad(f"kmpoints={s['kmpoints']} must be 0 (every prefill token) or >= m={s['m']}")

    def allocate(self):
        super().allocate()
        xp, g, B = self.xp, self.geom, self.batch
        H, D, T, M = g.n_kv_heads, g.head_dim, self.n_chunks_max * self.G, self.s["mmax"]
        self.kidx = self.per_layer((B, H, T), np.uint8)
        self.vidx = self.per_layer((B, H, T), np.uint8)
        self.vmask = self.per_layer((B, H, T // 8), np.uint8)
        self.kpat = self.per_layer((B, H, M, D), np.float16)
        self.vpat = self.per_layer((B, H, M, D), np.float16)
        self.count = np.zeros((g.n_layers, B), dtype=np.int64)  # patterns per (layer, sequence)
        self.pm = self.quantizers("minikv.kv.patterns", "minikv.cuda.patternkv")  # mining functions

    ROW_STATE = KiviCache.ROW_STATE + (("count", 1),)

    def reset(self, rows=None):
        super().reset(rows)
        self.count[:, slice(None) if rows is None else rows] = 0

    # The prefill's KMeans is latency-bound (a few sets per layer): batching layers fills the GPU.
    FIRST_FLUSH_BATCH_BYTES = 256 << 20

    def _first_flushes(self, layers, rows, n, xks, xvs):
        """One KMeans over every layer's sets (they are independent: each layer gets the centres
        it would get alone), then each layer's assignment and packing."""
        cs = self._mine(xks, xvs)
        return [self._flush(layer, rows, 0, n, xk, xv, c) for layer, xk, xv, c in zip(layers, xks, xvs, cs)]

    def _mine(self, xks, xvs):
        """KMeans centres of first flushes: xks, xvs [(nb, H, w, D)] -> [(nb, 2H, m, D) float32]
        (K centres, then V), over at most kmpoints evenly spaced tokens (token 0 first)."""
        xp = self.xp
        nb, H, w, D = xks[0].shape
        m, cap = min(self.s["m"], w), self.s["kmpoints"]
        pick = slice(None) if not cap or w <= cap else xp.arange(cap) * w // cap
        kv = xp.concatenate([x[:, :, pick] for pair in zip(xks, xvs) for x in pair], axis=1)  # (nb, L*2H, P, D)
        kv = kv.reshape(nb, len(xks), 2 * H, -1, D).transpose(1, 0, 2, 3, 4)  # fp16 on the GPU: half the bytes
        c = self.pm.kmeans(xp, xp.ascontiguousarray(kv).reshape(-1, kv.shape[3], D), m)
        return list(c.reshape(len(xks), nb, 2 * H, m, D))

    def _assign(self, layer, rows, c0, n, k, v, centres=None):
        """Store the pattern indices of the n chunks' tokens (kidx, vidx), updating the patterns;
        k, v (nb, H, w >= n*G, D); centres: the first flush's, if already mined."""
        xp, G, r, L = self.xp, self.G, self._ix(rows), layer
        nb, H, w, D = k.shape
        kp, vp, t0 = self.kpat[L], self.vpat[L], c0 * G
        if c0 == 0:  # first flush of these sequences: mine their window (the prefill)
            c = centres if centres is not None else self._mine([k], [v])[0]
            m = c.shape[2]
            kp[r, :, :m], vp[r, :, :m] = c[:, :H].astype(np.float16), c[:, H:].astype(np.float16)
            self.count[L, rows] = m
            self.pm.store_nearest(xp, k, n * G, kp, m, self.kidx[L], rows, 0)
            self.pm.store_nearest(xp, v, n * G, vp, m, self.vidx[L], rows, 0)
            return
        for i in range(n):  # chunk by chunk: each may add the pattern the next ones use
            ck, cv = (x[:, :, i * G:(i + 1) * G].astype(np.float32).reshape(nb * H, G, D) for x in (k, v))
            m = int(self.count[L, rows[0]])  # rows in one flush group share their state
            if m < self.s["mmax"]:
                kp[r, :, m] = self.pm.chebyshev_centre(ck).reshape(nb, H, D).astype(np.float16)
                vp[r, :, m] = self.pm.chebyshev_centre(cv).reshape(nb, H, D).astype(np.float16)
                m += 1
                self.count[L, rows] = m
            pk = kp[r, :, :m].astype(np.float32).reshape(nb * H, m, D)
            pv = vp[r, :, :m].astype(np.float32).reshape(nb * H, m, D)
            ti = t0 + i * G
            self.kidx[L][r, :, ti:ti + G] = self.pm.minmax_assign(xp, ck, pk).reshape(nb, H, G).astype(np.uint8)
            self.vidx[L][r, :, ti:ti + G] = self.pm.minmax_assign(xp, cv, pv).reshape(nb, H, G).astype(np.uint8)

    def _flush(self, layer, rows, c0, n, xk, xv, centres=None):
        xp, G, L = self.xp, self.G, layer
        self._assign(L, rows, c0, n, xk, xv, centres)
        hat = self.fused is None  # only the reference attention reads the rebuilt tokens
        k_hat = self.pm.store_k_residuals(xp, xk, n, G, self.s["kbits"], (self.kc[L], self.ks[L], self.km[L]),
                                          self.kpat[L], self.kidx[L], rows, c0, hat)
        v_hat = self.pm.store_v_residuals(xp, xv, n * G, self.s["vbits"], self.vgroup,
                                          (self.vc[L], self.vs[L], self.vm[L], self.vmask[L]), self.vpat[L],
                                          self.vidx[L], rows, c0 * G, hat)
        return k_hat, v_hat

    def pattern_counts(self):
        return self.count

    def kernel_storage(self, layer):
        from ..cuda.patternkv import PatternStorage

        return PatternStorage(**self._uniform_arrays(layer), kidx=self.kidx[layer], vidx=self.vidx[layer],
                              vmask=self.vmask[layer], kpat=self.kpat[layer], vpat=self.vpat[layer], mmax=self.s["mmax"])

    def dequantize(self, layer):
        """K^, V^ (B, Hkv, NC*G, D) float32 rebuilt from the packed storage alone:
        the kivi reconstruction of the residuals plus each token's pattern."""
        xp = self.xp
        rk, rv = super().dequantize(layer)
        pk = token_patterns(xp, self.kpat[layer], self.kidx[layer])
        pv = token_patterns(xp, self.vpat[layer], self.vidx[layer])
        mask = (self.vmask[layer][..., None] >> xp.arange(8, dtype=np.uint8)) & 1  # (B, H, T/8, 8)
        mask = mask.reshape(rv.shape[:3])[..., None].astype(bool)
        return pk + rk, xp.where(mask, pv, np.float32(0.0)) + rv

    def quantized_bytes(self):
        g = self.geom
        per_token = g.n_kv_heads * (2 + 1 / 8)  # K and V pattern indices, the V mask bit
        patterns = int(self.count.sum()) * g.n_kv_heads * g.head_dim * 2 * 2  # K and V, fp16
        tokens = int(self.n_chunks.sum()) * self.G * g.n_layers
        return super().quantized_bytes() + int(tokens * per_token) + patterns
