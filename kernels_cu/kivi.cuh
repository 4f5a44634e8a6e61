// KIVI's quantizer bodies (oracle: minikv/kv/kivi.py, packing.py), templated on where the values
// come from: kivi.cu quantizes K/V rows as they are, patternkv.cu the residuals x - C[idx] against
// each token's pattern; fp16 or float32 rows read in place, codes written straight into the
// method's storage (Slots). Every float step is
// one IEEE round-to-nearest float32 op in the oracle's order (__f*_rn, built with --fmad=false);
// min/max are exact in any order; fp32 -> fp16 is __float2half_rn; rint is rintf (half-even).
#pragma once
#include "quant.cuh"

namespace kivi {

using namespace minikv::quant;  // f16_round, ld4, ld8, pack8, store8

// packing.uniform_params of one (min, max): min rounded down, (max - min) / (2^B - 1) rounded up.
// Adding +0 first makes -0 +0: a reduction over +0 and -0 may return either, in any order.
template <int B>
__device__ __forceinline__ void uniform_params(float lo, float hi, __half& hs, __half& hm) {
    lo = __fadd_rn(lo, 0.0f);
    hi = __fadd_rn(hi, 0.0f);
    hm = f16_round(lo, -1);
    hs = f16_round(__fdiv_rn(__fsub_rn(hi, __half2float(hm)), (float)((1 << B) - 1)), +1);
}

// packing.uniform_codes + uniform_dequant of one value: s = fp16 scale, d = s > 0 ? s : 1, m = min.
template <int B>
__device__ __forceinline__ unsigned uniform_code(float v, float s, float d, float m, float& xh) {
    float q = rintf(__fdiv_rn(__fsub_rn(v, m), d));
    q = fminf(fmaxf(q, 0.0f), (float)((1 << B) - 1));
    const unsigned c = (unsigned)q;
    xh = __fadd_rn(__fmul_rn((float)c, s), m);
    return c;
}

// Where a flush's items live in a method's storage. The flush covers S = nb * H sets (sequence b
// of the flush, kv head h: s = b * H + h); item t of set s (a token, or a chunk) is slot
// base(s) * cap + off + t, base(s) = rows[b] * H + h (rows: the sequences' batch rows).
struct Slots {
    const int* rows;
    int H, cap, off;
    __device__ __forceinline__ size_t base(int s) const { return (size_t)rows[s / H] * H + s % H; }
    __device__ __forceinline__ size_t at(int s, int t) const { return base(s) * cap + off + t; }
};

// Values as they are: token t of set s at x + b * xb + h * xh + t * xt (elements; rows contiguous
// and 16-byte aligned, any strides: a view into the model's qkv projection is read in place).
template <class T>
struct Rows {
    const T* x;
    long long xb, xh, xt;
    int H;
    __device__ __forceinline__ const T* row(int s, int t) const { return x + (s / H) * xb + (s % H) * xh + t * xt; }
    __device__ __forceinline__ void load8(int s, int t, int c, float (&v)[8]) const { ld8(row(s, t) + c, v); }
    __device__ __forceinline__ void rebuild8(int, int, int, float (&)[8]) const {}
};

// The 8 codes of a token's channels c0..c0+7 against per-channel (s, d, m): B packed bytes into
// crow (the token's codes row), and x_hat row xrow (skipped where null) as src rebuilds it.
template <int B, class Src>
__device__ __forceinline__ void code8(const Src& src, int set, int t, int c0, const float (&v)[8], const float* s,
                                      const float* d, const float* m, unsigned char* crow, float* xrow) {
    float xh[8];
    unsigned cd[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) cd[k] = uniform_code<B>(v[k], s[k], d[k], m[k], xh[k]);
    pack8<B>(cd, crow + c0 / 8 * B);
    if (xrow) {
        src.rebuild8(set, t, c0, xh);
        store8(xrow + c0, xh);
    }
}

constexpr int KU = 4;  // token rows a thread of k_chunks loads before using them

// K per channel over chunks of L tokens: block k of S * n is chunk c = k % n of set s = k / n,
// its tokens c * L + i (i < L) of src. Out at chunk slot q = slots.at(s, c): codes (q, L, D*B/8)
// uint8 (token rows), scale, mn (q, D) fp16; x_hat ((s * n + c) * L + i, D) float32 or null.
// Phase 1: thread (slice j, octet o) takes min/max of channels 8o..8o+7 over tokens j, j + NS,
// ... (NS = blockDim / (D/8) slices, KU rows in flight) into shared partials; phase 2: thread c
// folds channel c's NS partials into fp16 (scale, min); phase 3: thread (token, octet) codes 8
// channels of a token. blockDim a multiple of D/8; dynamic shared memory (2 * NS + 3) * D floats.
template <int B, class Src>
__device__ void k_chunks(const Src& src, Slots slots, int n, unsigned char* __restrict__ codes,
                         __half* __restrict__ scale, __half* __restrict__ mn, float* __restrict__ x_hat, int L, int D) {
    extern __shared__ float sh[];
    const int O = D >> 3, nthr = blockDim.x, NS = nthr / O, o = threadIdx.x % O, j = threadIdx.x / O;
    float *pmin = sh, *pmax = sh + NS * D, *ps = pmax + NS * D, *pd = ps + D, *pm = pd + D;
    const int set = blockIdx.x / n, c = blockIdx.x % n, t0 = c * L;
    const size_t q = slots.at(set, c);
    const float inf = __int_as_float(0x7f800000);
    float lo[8], hi[8], v[KU][8];
#pragma unroll
    for (int k = 0; k < 8; ++k) lo[k] = inf, hi[k] = -inf;
    for (int t = j; t < L; t += KU * NS) {
#pragma unroll
        for (int u = 0; u < KU; ++u)
            if (t + u * NS < L) src.load8(set, t0 + t + u * NS, 8 * o, v[u]);
#pragma unroll
        for (int u = 0; u < KU; ++u)
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (t + u * NS < L) lo[k] = fminf(lo[k], v[u][k]), hi[k] = fmaxf(hi[k], v[u][k]);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) pmin[j * D + 8 * o + k] = lo[k], pmax[j * D + 8 * o + k] = hi[k];
    __syncthreads();
    for (int ch = threadIdx.x; ch < D; ch += nthr) {
        float a = pmin[ch], b = pmax[ch];
        for (int i = 1; i < NS; ++i) a = fminf(a, pmin[i * D + ch]), b = fmaxf(b, pmax[i * D + ch]);
        __half hs, hm;
        uniform_params<B>(a, b, hs, hm);
        scale[q * D + ch] = hs;
        mn[q * D + ch] = hm;
        const float s = __half2float(hs);
        ps[ch] = s; pd[ch] = s > 0.0f ? s : 1.0f; pm[ch] = __half2float(hm);
    }
    __syncthreads();
    for (int t = j; t < L; t += KU * NS) {
#pragma unroll
        for (int u = 0; u < KU; ++u)
            if (t + u * NS < L) src.load8(set, t0 + t + u * NS, 8 * o, v[u]);
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            const int i = t + u * NS;
            if (i < L)
                code8<B>(src, set, t0 + i, 8 * o, v[u], ps + 8 * o, pd + 8 * o, pm + 8 * o, codes + (q * L + i) * (D * B / 8),
                         x_hat ? x_hat + ((size_t)blockIdx.x * L + i) * D : nullptr);
        }
    }
}

// V per token in groups of GS channels, after a thread (token t of set s, octet o) put its 8
// values' min/max in pmin/pmax[threadIdx.x] and the block synchronised: fold the group's GS/8
// partials (every thread of a group gets the same params; its first thread stores them) and code
// the 8 values. Out at token slot q: codes (q, D*B/8) uint8, scale, mn (q, D/GS) fp16; x_hat row
// xrow (D floats) or null.
template <int B, class Src>
__device__ __forceinline__ void v_group_code(const Src& src, int set, int t, size_t q, int o, const float (&v)[8],
                                             const float* pmin, const float* pmax, int D, int GS,
                                             unsigned char* __restrict__ codes, __half* __restrict__ scale,
                                             __half* __restrict__ mn, float* __restrict__ xrow) {
    const int go = GS >> 3, first = threadIdx.x - o % go;
    float lo = pmin[first], hi = pmax[first];
    for (int k = 1; k < go; ++k) { lo = fminf(lo, pmin[first + k]); hi = fmaxf(hi, pmax[first + k]); }
    __half hs, hm;
    uniform_params<B>(lo, hi, hs, hm);
    if (o % go == 0) {
        const size_t p = q * (D / GS) + o / go;
        scale[p] = hs;
        mn[p] = hm;
    }
    const float s = __half2float(hs), d = s > 0.0f ? s : 1.0f, m = __half2float(hm);
    float ss[8], dd[8], mm[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) ss[k] = s, dd[k] = d, mm[k] = m;
    code8<B>(src, set, t, 8 * o, v, ss, dd, mm, codes + q * (D * B / 8), xrow);
}

}  // namespace kivi
