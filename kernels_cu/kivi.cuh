// KIVI's quantizer bodies (oracle: minikv/kv/kivi.py, packing.py), templated on where the values
// come from: kivi.cu quantizes float32 rows as they are, patternkv.cu the residuals x - C[idx]
// of fp16 (or float32) K/V rows against each token's pattern, read in place. Every float step is
// one IEEE round-to-nearest float32 op in the oracle's order (__f*_rn, built with --fmad=false);
// min/max are exact in any order; fp32 -> fp16 is __float2half_rn; rint is rintf (half-even).
#pragma once
#include "quant.cuh"

namespace kivi {

using namespace minikv::quant;  // f16_round, load8, pack8, store8

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

// Values as they are: x (rows, D) float32, 16-byte aligned rows. rebuild: x_hat is the decoded value.
struct Rows {
    const float* x;
    int D;
    __device__ __forceinline__ void load4(size_t row, int c, float (&v)[4]) const {
        const float4 a = *reinterpret_cast<const float4*>(x + row * D + c);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    }
    __device__ __forceinline__ void load8(size_t row, int c, float (&v)[8]) const { kivi::load8(x + row * D + c, v); }
    __device__ __forceinline__ void rebuild8(size_t, int, float (&)[8]) const {}
};

// The 8 codes of a token's channels c0..c0+7 against per-channel (s, d, m): B packed bytes, and
// x_hat (skipped where null) as src rebuilds it.
template <int B, class Src>
__device__ __forceinline__ void code8(const Src& src, size_t row, int c0, const float (&v)[8], const float* s,
                                      const float* d, const float* m, int D, unsigned char* codes, float* x_hat) {
    float xh[8];
    unsigned cd[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) cd[k] = uniform_code<B>(v[k], s[k], d[k], m[k], xh[k]);
    pack8<B>(cd, codes + row * (D * B / 8) + c0 / 8 * B);
    if (x_hat) {
        src.rebuild8(row, c0, xh);
        store8(x_hat + row * D + c0, xh);
    }
}

// K per channel over chunks of L tokens: chunk blockIdx.x holds rows chunk * L + t of src.
// Out: codes (chunks, L, D*B/8) uint8 (token rows), scale, mn (chunks, D) fp16, x_hat (chunks,
// L, D) float32 or null. Phase 1: thread (slice j, quad q) takes min/max of channels 4q..4q+3
// over tokens j, j+NS, ... (NS = max(1, blockDim / (D/4)) slices) into shared partials; phase 2:
// thread c folds channel c's NS partials into fp16 (scale, min); phase 3: thread (token, octet)
// codes 8 channels of a token. Dynamic shared memory: (2 * NS + 3) * D floats.
template <int B, class Src>
__device__ void k_chunks(const Src& src, unsigned char* __restrict__ codes, __half* __restrict__ scale,
                         __half* __restrict__ mn, float* __restrict__ x_hat, int L, int D) {
    extern __shared__ float sh[];
    const int Q = D >> 2, O = D >> 3, nthr = blockDim.x;
    const int NS = nthr / Q > 1 ? nthr / Q : 1;
    float *pmin = sh, *pmax = sh + NS * D, *ps = pmax + NS * D, *pd = ps + D, *pm = pd + D;
    const size_t chunk = blockIdx.x;
    const float inf = __int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < NS * Q; i += nthr) {
        const int q = i % Q, j = i / Q;
        float lo[4] = {inf, inf, inf, inf}, hi[4] = {-inf, -inf, -inf, -inf}, v[4];
        for (int t = j; t < L; t += NS) {
            src.load4(chunk * L + t, 4 * q, v);
#pragma unroll
            for (int k = 0; k < 4; ++k) lo[k] = fminf(lo[k], v[k]), hi[k] = fmaxf(hi[k], v[k]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) { pmin[j * D + 4 * q + k] = lo[k]; pmax[j * D + 4 * q + k] = hi[k]; }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < D; c += nthr) {
        float lo = pmin[c], hi = pmax[c];
        for (int j = 1; j < NS; ++j) { lo = fminf(lo, pmin[j * D + c]); hi = fmaxf(hi, pmax[j * D + c]); }
        __half hs, hm;
        uniform_params<B>(lo, hi, hs, hm);
        scale[chunk * D + c] = hs;
        mn[chunk * D + c] = hm;
        const float s = __half2float(hs);
        ps[c] = s; pd[c] = s > 0.0f ? s : 1.0f; pm[c] = __half2float(hm);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < L * O; i += nthr) {
        const int t = i / O, c0 = 8 * (i % O);
        const size_t row = chunk * L + t;
        float v[8];
        src.load8(row, c0, v);
        code8<B>(src, row, c0, v, ps + c0, pd + c0, pm + c0, D, codes, x_hat);
    }
}

// V per token in groups of GS channels, after a thread (row, octet o) put its 8 values' min/max
// in pmin/pmax[threadIdx.x] and the block synchronised: fold the group's GS/8 partials (every
// thread of a group gets the same params; its first thread stores them) and code the 8 values.
// Out: codes (rows, D*B/8) uint8, scale, mn (rows, D/GS) fp16, x_hat (rows, D) float32 or null.
template <int B, class Src>
__device__ __forceinline__ void v_group_code(const Src& src, size_t row, int o, const float (&v)[8], const float* pmin,
                                             const float* pmax, int D, int GS, unsigned char* __restrict__ codes,
                                             __half* __restrict__ scale, __half* __restrict__ mn,
                                             float* __restrict__ x_hat) {
    const int go = GS >> 3, first = threadIdx.x - o % go;
    float lo = pmin[first], hi = pmax[first];
    for (int k = 1; k < go; ++k) { lo = fminf(lo, pmin[first + k]); hi = fmaxf(hi, pmax[first + k]); }
    __half hs, hm;
    uniform_params<B>(lo, hi, hs, hm);
    if (o % go == 0) {
        const size_t p = row * (D / GS) + o / go;
        scale[p] = hs;
        mn[p] = hm;
    }
    const float s[1] = {__half2float(hs)}, d[1] = {s[0] > 0.0f ? s[0] : 1.0f}, m[1] = {__half2float(hm)};
    float ss[8], dd[8], mm[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) ss[k] = s[0], dd[k] = d[0], mm[k] = m[0];
    code8<B>(src, row, 8 * o, v, ss, dd, mm, D, codes, x_hat);
}

}  // namespace kivi
