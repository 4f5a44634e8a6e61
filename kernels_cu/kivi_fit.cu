// KIVI quantizers with fitted parameters, bit for bit the NumPy oracles of minikv/kv/kivi.py with
// sc=8 (packing.compact_params: a log-table scale index and an int8 zero point) and/or fit=mse
// (packing.uniform_params_fit / compact_params with CLIP narrower grids: the least squared error).
// The squared errors are summed one value at a time in the oracle's order (packing.sum_sq_in_order),
// so one thread fits one set of values: a channel of a K chunk, a channel group of a V token.
// Sources and storage slots as kivi.cu (kivi::Rows, kivi::Slots); SC=16 writes fp16 scale and
// min, SC=8 uint8 scale indices and int8 zero points. table: packing.log_scales() (256 floats).
#include "kivi.cuh"

namespace kfit {

using namespace minikv::quant;

constexpr int CLIP = 6;
// packing.SHRINK: float32(2^(-k/10)), k = 1..CLIP
__device__ __constant__ float SHRINK[CLIP] = {0x1.ddb68p-1f, 0x1.bdb8cep-1f, 0x1.9fdf8cp-1f, 0x1.8406p-1f,
                                              0x1.6a09e6p-1f, 0x1.51cb46p-1f};

__device__ __forceinline__ float ld1(const float* p) { return *p; }
__device__ __forceinline__ float ld1(const __half* p) { return __half2float(*p); }

// Sum of squared errors of values x(0..n-1), in order, against the grid (scale s, min m).
template <int B, class X>
__device__ float sq_err(const X& x, int n, float s, float m) {
    const float d = s > 0.0f ? s : 1.0f;
    float acc = 0.0f, xh;
    for (int i = 0; i < n; ++i) {
        const float v = x(i);
        kivi::uniform_code<B>(v, s, d, m, xh);
        const float e = __fsub_rn(xh, v);
        acc = __fadd_rn(acc, __fmul_rn(e, e));
    }
    return acc;
}

// The parameters of one set (lo, hi: its min and max): float32 (s, m) to code with, and the
// stored pair (SC=16: fp16 bits of scale and min; SC=8: scale index and zero point).
template <int B, int SC, bool FIT, class X>
__device__ void fit(const X& x, int n, float lo, float hi, const float* __restrict__ table, float& s, float& m,
                    int& a, int& b) {
    lo = __fadd_rn(lo, 0.0f);
    hi = __fadd_rn(hi, 0.0f);
    const float nf = (float)((1 << B) - 1), half = nf * 0.5f;
    float best = 0.0f;
    if constexpr (SC == 16) {
        __half hs, hm;
        kivi::uniform_params<B>(lo, hi, hs, hm);
        s = __half2float(hs), m = __half2float(hm), a = __half_as_ushort(hs), b = __half_as_ushort(hm);
        if constexpr (FIT) {
            best = sq_err<B>(x, n, s, m);
            const float mid = __fmul_rn(__fadd_rn(hi, lo), 0.5f), s0 = s;
#pragma unroll 1
            for (int k = 0; k < CLIP; ++k) {
                const __half cs = f16_round(__fmul_rn(s0, SHRINK[k]), +1);
                const float fs = __half2float(cs);
                const __half cm = __float2half_rn(__fsub_rn(mid, __fmul_rn(half, fs)));
                const float fm = __half2float(cm), err = sq_err<B>(x, n, fs, fm);
                if (err < best) best = err, s = fs, m = fm, a = __half_as_ushort(cs), b = __half_as_ushort(cm);
            }
        }
    } else {
        const float need = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), nf), __fdiv_rn(fabsf(__fadd_rn(hi, lo)), 238.0f));
        int l = 0, r = 256;  // searchsorted(table, need, 'left'): the first entry >= need
        while (l < r) {
            const int c = (l + r) >> 1;
            if (table[c] < need) l = c + 1; else r = c;
        }
        const int e0 = min(l, 255);
#pragma unroll 1
        for (int back = 0; back <= (FIT ? CLIP : 0); ++back) {
            const int e = max(e0 - back, 0);
            const float cs = table[e];
            const float z = fminf(fmaxf(rintf(__fsub_rn(half, __fdiv_rn(__fadd_rn(hi, lo), __fadd_rn(cs, cs)))), -128.0f),
                                  127.0f);
            const float cm = __fmul_rn(-z, cs);
            const float err = FIT ? sq_err<B>(x, n, cs, cm) : 0.0f;
            if (back == 0 || err < best) best = err, s = cs, m = cm, a = e, b = (int)z;
        }
    }
}

template <int SC>
__device__ __forceinline__ void store_params(void* scale, void* mn, size_t p, int a, int b) {
    if constexpr (SC == 16) {
        reinterpret_cast<unsigned short*>(scale)[p] = (unsigned short)a;
        reinterpret_cast<unsigned short*>(mn)[p] = (unsigned short)b;
    } else {
        reinterpret_cast<unsigned char*>(scale)[p] = (unsigned char)a;
        reinterpret_cast<signed char*>(mn)[p] = (signed char)b;
    }
}

// Fit one set of n values x(0..n-1) (min/max, then `fit`), store its parameters at slot p, and
// give the float32 (s, m) to code with.
template <int B, int SC, bool FIT, class X>
__device__ void fit_store(const X& x, int n, const float* __restrict__ table, void* scale, void* mn, size_t p, float& s,
                          float& m) {
    float lo = x(0), hi = lo;
    for (int i = 1; i < n; ++i) lo = fminf(lo, x(i)), hi = fmaxf(hi, x(i));
    int a, b;
    fit<B, SC, FIT>(x, n, lo, hi, table, s, m, a, b);
    store_params<SC>(scale, mn, p, a, b);
}

}  // namespace kfit

// K per channel over n chunks of L tokens per set: one block per chunk (S * n); thread ch fits
// channel ch (its L values in token order), then thread (token, octet) codes 8 channels of a token.
// Out as kivi_k_chunks (scale, mn: fp16, or uint8 / int8 for SC=8). Shared memory: 3 * D floats.
template <int B, int SC, bool FIT, class T>
__global__ void kfit_k_chunks(const T* __restrict__ x, long long xb, long long xh, long long xt, int H,
                              const int* __restrict__ rows, int cap, int off, int n, unsigned char* __restrict__ codes,
                              void* __restrict__ scale, void* __restrict__ mn, float* __restrict__ x_hat, int L, int D,
                              const float* __restrict__ table) {
    extern __shared__ float sh[];
    float *ps = sh, *pd = sh + D, *pm = pd + D;
    const kivi::Rows<T> src{x, xb, xh, xt, H};
    const int set = blockIdx.x / n, c = blockIdx.x % n, t0 = c * L;
    const size_t q = kivi::Slots{rows, H, cap, off}.at(set, c);
    for (int ch = threadIdx.x; ch < D; ch += blockDim.x) {
        const auto val = [&](int i) { return kfit::ld1(src.row(set, t0 + i) + ch); };
        float s, m;
        kfit::fit_store<B, SC, FIT>(val, L, table, scale, mn, q * D + ch, s, m);
        ps[ch] = s, pd[ch] = s > 0.0f ? s : 1.0f, pm[ch] = m;
    }
    __syncthreads();
    const int O = D >> 3;
    for (int it = threadIdx.x; it < L * O; it += blockDim.x) {
        const int i = it / O, o = it % O;
        float v[8];
        src.load8(set, t0 + i, 8 * o, v);
        kivi::code8<B>(src, set, t0 + i, 8 * o, v, ps + 8 * o, pd + 8 * o, pm + 8 * o, codes + (q * L + i) * (D * B / 8),
                       x_hat ? x_hat + ((size_t)blockIdx.x * L + i) * D : nullptr);
    }
}

// V per token in groups of GS channels: one thread per (token row, group), R = S * TS rows, TS
// per set; it fits the group's GS values in channel order and codes them. Out as kivi_v_tokens.
template <int B, int SC, bool FIT, class T>
__global__ void kfit_v_tokens(const T* __restrict__ x, long long xb, long long xh, long long xt, int H,
                              const int* __restrict__ rows, int cap, int off, int TS, unsigned char* __restrict__ codes,
                              void* __restrict__ scale, void* __restrict__ mn, float* __restrict__ x_hat, int R, int D,
                              int GS, const float* __restrict__ table) {
    const int ng = D / GS, item = blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= R * ng) return;
    const int row = item / ng, g = item % ng, set = row / TS, t = row % TS, c0 = g * GS;
    const kivi::Rows<T> src{x, xb, xh, xt, H};
    const size_t q = kivi::Slots{rows, H, cap, off}.at(set, t);
    const auto val = [&](int i) { return kfit::ld1(src.row(set, t) + c0 + i); };
    float s, m;
    kfit::fit_store<B, SC, FIT>(val, GS, table, scale, mn, q * ng + g, s, m);
    float ss[8], dd[8], mm[8], v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) ss[k] = s, dd[k] = s > 0.0f ? s : 1.0f, mm[k] = m;
    for (int c = c0; c < c0 + GS; c += 8) {
        src.load8(set, t, c, v);
        kivi::code8<B>(src, set, t, c, v, ss, dd, mm, codes + q * (D * B / 8), x_hat ? x_hat + (size_t)row * D : nullptr);
    }
}

#ifdef MINIKV_INSTANTIATE_ALL
#define INST(B, SC, FIT, T)                                                   \
    void* inst_k_##B##_##SC##_##FIT##T = (void*)&kfit_k_chunks<B, SC, FIT, T>; \
    void* inst_v_##B##_##SC##_##FIT##T = (void*)&kfit_v_tokens<B, SC, FIT, T>;
#define INST2(B, SC, FIT) INST(B, SC, FIT, float) INST(B, SC, FIT, __half)
INST2(2, 16, true)
INST2(3, 16, true)
INST2(4, 16, true)
INST2(8, 16, true)
INST2(2, 8, false)
INST2(3, 8, false)
INST2(4, 8, false)
INST2(2, 8, true)
INST2(3, 8, true)
INST2(4, 8, true)
#undef INST2
#undef INST
#endif
