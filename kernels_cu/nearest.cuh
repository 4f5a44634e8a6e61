// The nearest centre of each of a block's KP points, for KMeans' Lloyd steps and the flush's
// token assignment (kmeans.cuh: km_step, km_assign; oracle: the float64 distances of
// minikv/kv/patterns.py, d = (|x|^2 - 2 x.c) + |c|^2 or |c|^2 - 2 x.c). Built with --fmad=false.
//
// Tensor cores first compute every distance approximately: x as fp16 (the cache's values), each
// centre as the sum of its two nearest fp16 parts, fp32 sums. With E a bound on the error of one
// distance (below), only the centres within 2E of a point's nearest approximate one can be its
// nearest in float64; a point with one such candidate is settled with no float64 work (almost
// all of them), the others are re-decided among their candidates in float64 exactly as the
// oracle computes d (x.c one FMA chain over d = 0..D-1, as BLAS micro-kernels do).
//
// E, for |x| <= xn, |c| <= cmax, |c|^2 <= c2max (u = 2^-11: fp16 rounding):
//  * the centre's fp16 parts miss c by <= u^2 |c_i| + 2^-25 per channel (hi + lo; lo may be
//    subnormal): 2 |x.(c - hi - lo)| <= 2^-21 |x| cmax + 2^-20.5 |x|;
//  * x as fp16 when it is float32: 2 |(x - x16).c| <= 2u |x| cmax + 2^-20.5 cmax;
//  * the tensor cores' fp32 sums: products are exact, and an mma adds its 16 products and the
//    accumulator aligned to the largest term and truncated (Fasi et al. 2021, "Numerical
//    behavior of NVIDIA tensor cores", V100 / T4 / A100; Khattak and Mikaitis 2025 model the
//    H100 alike), each term losing < 1 unit of 2^-23 of the largest: <= 17 such units. Each
//    16-channel step's two mmas (hi, then lo) start from 0 and their sum is added in fp32 with
//    rounding to nearest, so the largest term is one of that step's: <= 2^-17.9 sum |x_i c_i|
//    over the steps, plus the fp32 adds' D / 16 * 2^-24; doubled;
//  * fp32 rounding of |c|^2 and of the difference: 2^-23 (c2max + 2 |x| cmax); float64 rounding
//    of the oracle's d: < 2^-40 (|x|^2 + |x| cmax + c2max).
// E = k (|x| cmax + c2max) + 2^-20 (|x| + cmax) + 2^-40 |x|^2 with k = 2^-13 (fp16 x: 13x the
// tensor cores' bound) or 2^-9 (float32 x: 2x its rounding) covers these. A non-finite
// approximation (inf or NaN inputs) makes every centre a candidate.
#pragma once
#include "mma.cuh"
#include "quant.cuh"

namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr int U = 8;    // independent loads a thread issues before using them
constexpr int CH = 32;  // centres per chunk (4 mma n-tiles; a point's candidates are one 32-bit mask)
constexpr int KP = 128; // points per tile (a block of km_step, km_assign): 4 warps x 2 m-tiles of 16

__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }  // NVRTC: no INFINITY

__device__ __forceinline__ double as_f64(double v) { return v; }
__device__ __forceinline__ double as_f64(float v) { return v; }
__device__ __forceinline__ double as_f64(__half v) { return __half2float(v); }

// numpy's tree over the 8 accumulators of a group of 8 lanes (lane k holds r[k]).
__device__ __forceinline__ double tree8(double r) {
    r = __dadd_rn(r, __shfl_xor_sync(FULL, r, 1));
    r = __dadd_rn(r, __shfl_xor_sync(FULL, r, 2));
    return __dadd_rn(r, __shfl_xor_sync(FULL, r, 4));
}

// numpy's pairwise sum over i < D of t(i)^2, by the 8 lanes of a group (all 32 lanes of the
// warp must call it): accumulators r[k] over terms k, k+8, ..., then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)),
// lane k holding r[k]. Starting r[k] at 0 is exact: squares are >= +0.
template <int D, class F>
__device__ __forceinline__ double sq8(F t) {
    double r = 0.0, v;
    for (int i = threadIdx.x & 7; i < D; i += 8) v = t(i), r = __dadd_rn(r, __dmul_rn(v, v));
    return tree8(r);
}

// The oracle's float64 distance of x (D values, fp16 or float32) to centre cj (float64, float32 or
// fp16) with |c|^2 = c2 (KM: |x|^2 = xx and d = (xx - 2 x.c) + c2; else d = c2 - 2 x.c).
template <int D, bool KM, class T, class C>
__device__ __forceinline__ double exact_d(const T* __restrict__ xp, const C* __restrict__ cj, double xx, double c2) {
    double acc = 0.0;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
        float xv[4];
        minikv::quant::ld4(xp + d, xv);
        const double c0 = as_f64(cj[d]), c1 = as_f64(cj[d + 1]), c2_ = as_f64(cj[d + 2]), c3 = as_f64(cj[d + 3]);
        acc = __fma_rn(xv[3], c3, __fma_rn(xv[2], c2_, __fma_rn(xv[1], c1, __fma_rn(xv[0], c0, acc))));
    }
    const double t = __dmul_rn(2.0, acc);
    return KM ? __dadd_rn(__dsub_rn(xx, t), c2) : __dsub_rn(c2, t);
}

template <int D>
struct NearSmem {
    __half c16[2][CH][D + 8];  // the chunk's centres as fp16 hi and lo parts (+8: conflict-free B loads)
    double c2[CH];             // their |c|^2, float64 (numpy's pairwise sum)
    unsigned mask[KP];         // per point: its candidate centres in the chunk (bit j: centre j0 + j)
};

// Two fp16 channels of a row as an mma operand word (float32 rows are rounded to fp16).
__device__ __forceinline__ uint32_t h2_word(const __half* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t h2_word(const float* p) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    const __half2 h = __floats2half2_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// The chunk's mc centres cen (mc, D) into s, zeros up to CH: 8 lanes per centre (sq8's order).
template <int D, class C>
__device__ __forceinline__ void stage_chunk(const C* __restrict__ cen, int mc, NearSmem<D>& s) {
    for (int j = threadIdx.x >> 3; j < CH; j += blockDim.x >> 3) {
        double v[D / 8], r = 0.0;
#pragma unroll
        for (int u = 0; u < D / 8; ++u) v[u] = j < mc ? as_f64(cen[(size_t)j * D + (threadIdx.x & 7) + 8 * u]) : 0.0;
#pragma unroll
        for (int u = 0; u < D / 8; ++u) {
            const int i = (threadIdx.x & 7) + 8 * u;
            r = __dadd_rn(r, __dmul_rn(v[u], v[u]));
            const __half hi = __double2half(v[u]);
            s.c16[0][j][i] = hi;
            s.c16[1][j][i] = __double2half(__dsub_rn(v[u], (double)__half2float(hi)));
        }
        r = tree8(r);
        if ((threadIdx.x & 7) == 0) s.c2[j] = r;
    }
}

// s.mask for the block's points against the staged chunk (mc centres): warp w holds points
// 32 w + 16 t + (0..15) as m-tile t; row(i) is point i's row (a real one, also for padding).
template <int D, class T, class Row>
__device__ __forceinline__ void candidates(Row row, int mc, NearSmem<D>& s) {
    constexpr float K = sizeof(T) == 2 ? 0x1p-13f : 0x1p-9f;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const T* xr[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t) xr[t][0] = row(32 * w + 16 * t + g), xr[t][1] = row(32 * w + 16 * t + 8 + g);
    float acc[2][4][4] = {}, sq[2][2] = {};
    uint32_t a[D / 16][2][4];  // every A fragment's load in flight at once (one trip to L2, not D / 16)
#pragma unroll
    for (int k = 0; k < D / 16; ++k)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int q = 0; q < 4; ++q) a[k][t][q] = h2_word(xr[t][q & 1] + 16 * k + 2 * c + 8 * (q >> 1));
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&a[k][t][q]));
                sq[t][q & 1] += f.x * f.x + f.y * f.y;
            }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            float st[2][4] = {};  // this step's sums, from 0 (the error bound above)
#pragma unroll
            for (int part = 0; part < 2; ++part) {
                const __half* cr = &s.c16[part][8 * nt + g][16 * k + 2 * c];
                const uint32_t b[2] = {h2_word(cr), h2_word(cr + 8)};
                minikv::mma16816(st[0], a[k][0], b);
                minikv::mma16816(st[1], a[k][1], b);
            }
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[t][nt][e] += st[t][e];
        }
    }
    float c2max = 0.0f;
    for (int j = 0; j < mc; ++j) c2max = fmaxf(c2max, (float)s.c2[j]);
    c2max *= 1.0f + 0x1p-20f;
    const float cmax = sqrtf(c2max) * (1.0f + 0x1p-20f);
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // row 16 t + 8 h + g: entries 2 h + e of acc[t][nt], centre 8 nt + 2 c + e
            float x2 = sq[t][h];
            x2 += __shfl_xor_sync(FULL, x2, 1);
            x2 += __shfl_xor_sync(FULL, x2, 2);
            const float xn = sqrtf(x2) * 1.001f;  // |x| from fp32 squares, rounded up past their error
            const float E = K * (xn * cmax + c2max) + 0x1p-20f * (xn + cmax) + 0x1p-40f * x2;
            float av[8], amin = inf();
            bool bad = !(E <= 3.0e38f);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int j = 8 * (i >> 1) + 2 * c + (i & 1);
                av[i] = j < mc ? (float)s.c2[j] - 2.0f * acc[t][i >> 1][2 * h + (i & 1)] : inf();
                if (j < mc) bad |= !(fabsf(av[i]) <= 3.0e38f), amin = fminf(amin, av[i]);
            }
            amin = fminf(amin, __shfl_xor_sync(FULL, amin, 1));
            amin = fminf(amin, __shfl_xor_sync(FULL, amin, 2));
            int nf = bad;  // the row's 4 lanes agree
            nf |= __shfl_xor_sync(FULL, nf, 1);
            nf |= __shfl_xor_sync(FULL, nf, 2);
            const float lim = amin + 2.0f * E;
            unsigned mk = 0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int j = 8 * (i >> 1) + 2 * c + (i & 1);
                if (j < mc && (nf || av[i] <= lim)) mk |= 1u << j;
            }
            mk |= __shfl_xor_sync(FULL, mk, 1);
            mk |= __shfl_xor_sync(FULL, mk, 2);
            if (c == 0) s.mask[32 * w + 16 * t + 8 * h + g] = mk;
        }
}

// The index of the nearest of the first M centres cen (M, D) to this thread's point (tile point
// threadIdx.x: row(threadIdx.x); ok: a real point; KM as exact_d, xx its |x|^2). Every thread
// of the block calls it (it syncs). Ties go to the lowest index, as numpy's argmin. staged: the
// block's previous call staged the same centres and M <= CH (s holds them still).
template <int D, bool KM, class T, class C, class Row>
__device__ __forceinline__ int nearest(Row row, bool ok, const C* __restrict__ cen, int M, double xx, NearSmem<D>& s,
                                       bool staged = false) {
    const T* xp = row(threadIdx.x);
    double best = inf();
    int bj = 0;
    for (int j0 = 0; j0 < M; j0 += CH) {
        const int mc = min(CH, M - j0);
        __syncthreads();  // the previous chunk and masks are done with
        if (!staged) {
            stage_chunk<D>(cen + (size_t)j0 * D, mc, s);
            __syncthreads();
        }
        candidates<D, T>(row, mc, s);
        __syncwarp();  // a point's mask comes from lanes of its own warp
        unsigned mk = s.mask[threadIdx.x];
        if (M <= CH && __popc(mk) == 1) {  // one chunk, one candidate: the nearest
            bj = __ffs(mk) - 1;
            continue;
        }
        for (; ok && mk; mk &= mk - 1) {  // in index order: strict < keeps the lowest of equal ones
            const int j = __ffs(mk) - 1;
            const double d = exact_d<D, KM>(xp, cen + (size_t)(j0 + j) * D, xx, s.c2[j]);
            if (d < best) best = d, bj = j0 + j;
        }
    }
    return bj;
}

}  // namespace
