// PatternKV's pattern kernels (oracle: minikv/kv/patterns.py; the wrappers in
// minikv/cuda/patternkv.py give the launch shapes): KMeans mining (kmeans.cuh), then per chunk
// the min-max assignment, the Chebyshev centre and the V threshold. Built with --fmad=false,
// ops spelled _rn: minmax_assign, chebyshev_centre and v_use_residual are the oracle's float32
// ops in its order (max/min are exact in any order); ties go to the lowest index.
#include "kmeans.cuh"

// The pattern of least residual range max_d(x - c) - min_d(x - c) per token. Grid
// (ceil(T / TT), N), threads over patterns (a multiple of 32, looping when M is larger); the
// block's TT tokens sit in dynamic shared memory (TT * D floats). x (N, T, D), c (N, M, D)
// float32, D % 4 == 0; out (N, T) int64.
extern "C" __global__ void minmax_assign(const float* __restrict__ x, const float* __restrict__ c, int T, int M, int D,
                                         long long* __restrict__ out) {
    extern __shared__ float4 xs[];  // (TT, D / 4)
    __shared__ double sv[32];
    __shared__ int si[32];
    const int set = blockIdx.y, t0 = blockIdx.x * TT, D4 = D / 4, nt = min(TT, T - t0);
    const float4* xb = reinterpret_cast<const float4*>(x + ((size_t)set * T + t0) * D);
    for (int e = threadIdx.x; e < TT * D4; e += blockDim.x) xs[e] = e < nt * D4 ? xb[e] : make_float4(0, 0, 0, 0);
    __syncthreads();
    float best[TT];
    int bj[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) best[t] = inf(), bj[t] = NONE;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const float4* cj = reinterpret_cast<const float4*>(c + ((size_t)set * M + j) * D);
        float hi[TT], lo[TT];
#pragma unroll
        for (int t = 0; t < TT; ++t) hi[t] = -inf(), lo[t] = inf();
        for (int q = 0; q < D4; ++q) {
            const float4 cv = cj[q];
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                const float4 xv = xs[t * D4 + q];
                const float a = __fsub_rn(xv.x, cv.x), b = __fsub_rn(xv.y, cv.y);
                const float e = __fsub_rn(xv.z, cv.z), f = __fsub_rn(xv.w, cv.w);
                hi[t] = fmaxf(hi[t], fmaxf(fmaxf(a, b), fmaxf(e, f)));
                lo[t] = fminf(lo[t], fminf(fminf(a, b), fminf(e, f)));
            }
        }
#pragma unroll
        for (int t = 0; t < TT; ++t)
            if (__fsub_rn(hi[t], lo[t]) < best[t]) best[t] = __fsub_rn(hi[t], lo[t]), bj[t] = j;
    }
#pragma unroll 1
    for (int t = 0; t < TT; ++t) {
        double v = best[t];
        int i = bj[t];
        block_first<false>(v, i, sv, si);
        if (threadIdx.x == 0 && t < nt) out[(size_t)set * T + t0 + t] = i;
    }
}

// out (N, D) float32 = (max_t x + min_t x) * 0.5 for x (N, T, D) float32; thread per output.
extern "C" __global__ void chebyshev_centre(const float* __restrict__ x, int N, int T, int D, float* __restrict__ out) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= N * D) return;
    const float* xs = x + (size_t)(o / D) * T * D + o % D;
    float hi = xs[0], lo = xs[0];
    for (int t = 1; t < T; ++t) hi = fmaxf(hi, xs[(size_t)t * D]), lo = fminf(lo, xs[(size_t)t * D]);
    out[o] = __fmul_rn(__fadd_rn(hi, lo), 0.5f);
}

// PatternKV's V test, one warp per token: v, c (tokens, D) float32 -> out (tokens,) bool;
// k = float32(2 z / sqrt(5 D)). Grid ceil(tokens / 8), 256 threads.
extern "C" __global__ void v_use_residual(const float* __restrict__ v, const float* __restrict__ c, long long tokens,
                                          int D, float k, bool* __restrict__ out) {
    const long long tok = blockIdx.x * 8LL + (threadIdx.x >> 5);
    if (tok >= tokens) return;  // whole warps
    float vh = -inf(), vl = inf(), rh = -inf(), rl = inf();
    for (int d = threadIdx.x & 31; d < D; d += 32) {
        const float a = v[tok * D + d], r = __fsub_rn(a, c[tok * D + d]);
        vh = fmaxf(vh, a), vl = fminf(vl, a), rh = fmaxf(rh, r), rl = fminf(rl, r);
    }
    for (int o = 16; o > 0; o >>= 1) {
        vh = fmaxf(vh, __shfl_xor_sync(FULL, vh, o)), vl = fminf(vl, __shfl_xor_sync(FULL, vl, o));
        rh = fmaxf(rh, __shfl_xor_sync(FULL, rh, o)), rl = fminf(rl, __shfl_xor_sync(FULL, rl, o));
    }
    if ((threadIdx.x & 31) != 0) return;
    const float rv = __fsub_rn(vh, vl);
    const float rho = __fdiv_rn(__fsub_rn(rh, rl), rv > 0.0f ? rv : 1.0f);
    const float rho2 = __fmul_rn(rho, rho);
    out[tok] = rv > 0.0f && __fsub_rn(1.0f, rho2) >= __fmul_rn(k, __fsqrt_rn(__fadd_rn(1.0f, __fmul_rn(rho2, rho2))));
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrappers can ask for
#define INST(D)                                                                                                 \
    void *inst_prep_##D = (void*)&km_prep<D>, *inst_seed_##D = (void*)&km_seed<D>;                              \
    void *inst_step_##D = (void*)&km_step<D>, *inst_l2_##D = (void*)&km_assign<D>;
INST(64)
INST(128)
#endif
