// KIVI quantizers (asymmetric uniform codes), bit for bit the NumPy oracles of
// minikv/kv/kivi.py (quantize_k_chunks, quantize_v_tokens) and the packing.py steps they use.
// Every float step is one IEEE round-to-nearest float32 op in the oracle's order, spelled with
// the __f*_rn intrinsics (never contracted to FMA; the loader also passes --fmad=false);
// min/max are exact in any order; fp32 -> fp16 is __float2half_rn; rint is rintf (half-even).
// Vector loads and stores need 16-byte aligned arrays and D % 8 == 0 (the wrapper checks).
#include "quant.cuh"

namespace kivi {

using minikv::quant::f16_round;
using minikv::quant::load8;
using minikv::quant::pack8;
using minikv::quant::store8;


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

}  // namespace kivi

// K per channel over chunks. x (S, L, D) float32, S = leading dims * n chunks, L = G tokens.
// Out: codes (S, L, D*B/8) uint8 (token rows), scale, mn (S, D) fp16, x_hat (S, L, D) float32.
// One block per chunk s (any blockDim; 256). Phase 1: thread (slice j, quad q) takes min/max of
// channels 4q..4q+3 over tokens j, j+NS, ... (NS = max(1, blockDim / (D/4)) slices) into shared
// partials; phase 2: thread c folds channel c's NS partials into fp16 (scale, min); phase 3:
// thread (token, octet) codes 8 channels of a token: B packed bytes and 8 x_hat values.
// Dynamic shared memory: (2 * NS + 3) * D floats.
template <int B>
__global__ void kivi_k_chunks(const float* __restrict__ x, unsigned char* __restrict__ codes,
                              __half* __restrict__ scale, __half* __restrict__ mn,
                              float* __restrict__ x_hat, int L, int D) {
    extern __shared__ float sh[];
    const int Q = D >> 2, O = D >> 3, nthr = blockDim.x;
    const int NS = nthr / Q > 1 ? nthr / Q : 1;
    float *pmin = sh, *pmax = sh + NS * D, *ps = pmax + NS * D, *pd = ps + D, *pm = pd + D;
    const size_t chunk = blockIdx.x, base = chunk * L * D;
    const float inf = __int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < NS * Q; i += nthr) {
        const int q = i % Q, j = i / Q;
        float lo[4] = {inf, inf, inf, inf}, hi[4] = {-inf, -inf, -inf, -inf};
        for (int t = j; t < L; t += NS) {
            const float4 v = reinterpret_cast<const float4*>(x + base + (size_t)t * D)[q];
            lo[0] = fminf(lo[0], v.x); lo[1] = fminf(lo[1], v.y); lo[2] = fminf(lo[2], v.z); lo[3] = fminf(lo[3], v.w);
            hi[0] = fmaxf(hi[0], v.x); hi[1] = fmaxf(hi[1], v.y); hi[2] = fmaxf(hi[2], v.z); hi[3] = fmaxf(hi[3], v.w);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) { pmin[j * D + 4 * q + k] = lo[k]; pmax[j * D + 4 * q + k] = hi[k]; }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < D; c += nthr) {
        float lo = pmin[c], hi = pmax[c];
        for (int j = 1; j < NS; ++j) { lo = fminf(lo, pmin[j * D + c]); hi = fmaxf(hi, pmax[j * D + c]); }
        __half hs, hm;
        kivi::uniform_params<B>(lo, hi, hs, hm);
        scale[chunk * D + c] = hs;
        mn[chunk * D + c] = hm;
        const float s = __half2float(hs);
        ps[c] = s; pd[c] = s > 0.0f ? s : 1.0f; pm[c] = __half2float(hm);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < L * O; i += nthr) {
        const int t = i / O, c0 = 8 * (i % O);
        const size_t row = chunk * L + t;
        float v[8], xh[8];
        unsigned cd[8];
        kivi::load8(x + row * D + c0, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) cd[k] = kivi::uniform_code<B>(v[k], ps[c0 + k], pd[c0 + k], pm[c0 + k], xh[k]);
        kivi::pack8<B>(cd, codes + row * (D * B / 8) + c0 / 8 * B);
        kivi::store8(x_hat + row * D + c0, xh);
    }
}

// V per token in groups of GS channels. x (R, D) float32, R = leading dims * T tokens,
// GS % 8 == 0 and GS | D. Out: codes (R, D*B/8) uint8, scale, mn (R, D/GS) fp16, x_hat (R, D).
// A block holds RB whole rows: blockDim = RB * O (O = D/8), one thread per (row, octet). Each
// thread loads its 8 values and puts their min/max in shared memory; after one barrier it folds
// the GS/8 partials of its group (every thread of a group gets the same params; the group's
// first thread stores them) and codes its 8 values. Dynamic shared memory: 2 * blockDim floats.
template <int B>
__global__ void kivi_v_tokens(const float* __restrict__ x, unsigned char* __restrict__ codes,
                              __half* __restrict__ scale, __half* __restrict__ mn,
                              float* __restrict__ x_hat, int R, int D, int GS) {
    extern __shared__ float sh[];
    float *pmin = sh, *pmax = sh + blockDim.x;
    const int O = D >> 3, o = threadIdx.x % O;
    const size_t row = (size_t)blockIdx.x * (blockDim.x / O) + threadIdx.x / O;
    const bool ok = row < (size_t)R;
    const float inf = __int_as_float(0x7f800000);
    float v[8], lo = inf, hi = -inf;
    if (ok) {
        kivi::load8(x + row * D + 8 * o, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) { lo = fminf(lo, v[k]); hi = fmaxf(hi, v[k]); }
    }
    pmin[threadIdx.x] = lo;
    pmax[threadIdx.x] = hi;
    __syncthreads();
    if (!ok) return;
    const int go = GS >> 3, first = threadIdx.x - o % go;
    for (int k = 0; k < go; ++k) { lo = fminf(lo, pmin[first + k]); hi = fmaxf(hi, pmax[first + k]); }
    __half hs, hm;
    kivi::uniform_params<B>(lo, hi, hs, hm);
    if (o % go == 0) {
        const size_t p = row * (D / GS) + o / go;
        scale[p] = hs;
        mn[p] = hm;
    }
    const float s = __half2float(hs), d = s > 0.0f ? s : 1.0f, m = __half2float(hm);
    float xh[8];
    unsigned cd[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) cd[k] = kivi::uniform_code<B>(v[k], s, d, m, xh[k]);
    kivi::pack8<B>(cd, codes + row * (D * B / 8) + o * B);
    kivi::store8(x_hat + row * D + 8 * o, xh);
}

#ifdef MINIKV_INSTANTIATE_ALL
#define INST(B)                                          \
    void* inst_k_##B = (void*)&kivi_k_chunks<B>; \
    void* inst_v_##B = (void*)&kivi_v_tokens<B>;
INST(2)
INST(3)
INST(4)
INST(8)
INST(16)
#undef INST
#endif
