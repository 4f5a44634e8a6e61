// PatternKV's pattern kernels (oracle: minikv/kv/patterns.py; the wrappers in
// minikv/cuda/patternkv.py give the launch shapes): KMeans mining (kmeans.cuh), then per chunk
// the min-max assignment, the Chebyshev centre and the V threshold. Built with --fmad=false,
// ops spelled _rn: minmax_assign, chebyshev_centre and v_use_residual are the oracle's float32
// ops in its order (max/min are exact in any order); ties go to the lowest index.
#include "kivi.cuh"
#include "kmeans.cuh"

namespace pkv {

// The V test's verdict from a token's ranges: v's (vh, vl) and its residual's (rh, rl).
__device__ __forceinline__ bool use_residual(float vh, float vl, float rh, float rl, float k) {
    const float rv = __fsub_rn(vh, vl);
    const float rho = __fdiv_rn(__fsub_rn(rh, rl), rv > 0.0f ? rv : 1.0f);
    const float rho2 = __fmul_rn(rho, rho);
    return rv > 0.0f && __fsub_rn(1.0f, rho2) >= __fmul_rn(k, __fsqrt_rn(__fadd_rn(1.0f, __fmul_rn(rho2, rho2))));
}

// 4 or 8 values of a row as float32: T is __half (fp16 compute) or float (float32 compute);
// p is 8-byte (4) or 16-byte (8) aligned.
__device__ __forceinline__ void ld4(const float* p, float (&v)[4]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
__device__ __forceinline__ void ld4(const __half* p, float (&v)[4]) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    const float2 l = __half22float2(*reinterpret_cast<const __half2*>(&a.x));
    const float2 h = __half22float2(*reinterpret_cast<const __half2*>(&a.y));
    v[0] = l.x; v[1] = l.y; v[2] = h.x; v[3] = h.y;
}
template <class T>
__device__ __forceinline__ void ld8(const T* p, float (&v)[8]) {
    float a[4], b[4];
    ld4(p, a), ld4(p + 4, b);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = a[k], v[4 + k] = b[k];
}

// Token rows r = set * TS + t of S sets (one sequence's kv head each): the set's first TS of w
// tokens in x (S, w, D), its patterns pat (S, M, D) fp16, each token's pattern idx (S, TS) uint8.
// As a kivi source: the residuals x - pat[idx], rebuilt as pat[idx] + decoded residual.
template <class T>
struct Residual {
    const T* x;
    const __half* pat;
    const unsigned char* idx;
    int w, M, TS, D;
    __device__ __forceinline__ const T* xrow(size_t r) const { return x + ((r / TS) * w + r % TS) * D; }
    __device__ __forceinline__ const __half* prow(size_t r) const { return pat + ((r / TS) * M + idx[r]) * D; }
    __device__ __forceinline__ void load4(size_t r, int c, float (&v)[4]) const {
        float p[4];
        ld4(xrow(r) + c, v), ld4(prow(r) + c, p);
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = __fsub_rn(v[k], p[k]);
    }
    __device__ __forceinline__ void load8(size_t r, int c, float (&v)[8]) const {
        float p[8];
        ld8(xrow(r) + c, v), ld8(prow(r) + c, p);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = __fsub_rn(v[k], p[k]);
    }
    __device__ __forceinline__ void rebuild8(size_t r, int c, float (&xh)[8]) const {
        float p[8];
        ld8(prow(r) + c, p);
#pragma unroll
        for (int k = 0; k < 8; ++k) xh[k] = __fadd_rn(p[k], xh[k]);
    }
};

// A V token's 8 chosen pattern values (0 where it is stored raw), added back to rebuild it.
struct Chosen {
    const float (&c)[8];
    __device__ __forceinline__ void rebuild8(size_t, int, float (&xh)[8]) const {
#pragma unroll
        for (int k = 0; k < 8; ++k) xh[k] = __fadd_rn(c[k], xh[k]);
    }
};

}  // namespace pkv

// PatternKV's K residuals as kivi K (minikv.kv.patterns.pack_k_residuals): one block per chunk
// of L tokens of S * TS / L; x, pat, idx as pkv::Residual. Out: codes (S*TS, D*B/8) uint8, scale,
// mn (S*TS/L, D) fp16, x_hat (S*TS, D) float32 (pattern + decoded residual) or null. Launch and
// shared memory as kivi_k_chunks.
template <int B, class T>
__global__ void pkv_k_chunks(const T* __restrict__ x, const __half* __restrict__ pat, const unsigned char* __restrict__ idx,
                             unsigned char* __restrict__ codes, __half* __restrict__ scale, __half* __restrict__ mn,
                             float* __restrict__ x_hat, int w, int M, int TS, int L, int D) {
    kivi::k_chunks<B>(pkv::Residual<T>{x, pat, idx, w, M, TS, D}, codes, scale, mn, x_hat, L, D);
}

// PatternKV's V tokens (minikv.kv.patterns.pack_v_residuals): per token the V test on v and
// v - C[idx], then kivi V of the residual where it passes, of v itself where not. Rows r < R =
// S * TS, one thread per (row, octet) as kivi_v_tokens. Out: codes (R, D*B/8) uint8, scale, mn
// (R, D/GS) fp16, use (R,) bool, x_hat (R, D) float32 (chosen pattern + decoded) or null.
// kt = float32(2 z / sqrt(5 D)). Dynamic shared memory: 4 * blockDim floats.
template <int B, class T>
__global__ void pkv_v_tokens(const T* __restrict__ x, const __half* __restrict__ pat, const unsigned char* __restrict__ idx,
                             unsigned char* __restrict__ codes, __half* __restrict__ scale, __half* __restrict__ mn,
                             bool* __restrict__ use, float* __restrict__ x_hat, int R, int w, int M, int TS, int D,
                             int GS, float kt) {
    extern __shared__ float sh[];
    const int O = D >> 3, o = threadIdx.x % O, n = blockDim.x, t = threadIdx.x;
    const size_t row = (size_t)blockIdx.x * (n / O) + t / O;
    const bool ok = row < (size_t)R;
    const pkv::Residual<T> src{x, pat, idx, w, M, TS, D};
    float a[8], c[8], vh = -inf(), vl = inf(), rh = -inf(), rl = inf();
    if (ok) {
        pkv::ld8(src.xrow(row) + 8 * o, a), pkv::ld8(src.prow(row) + 8 * o, c);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float r = __fsub_rn(a[k], c[k]);
            vh = fmaxf(vh, a[k]), vl = fminf(vl, a[k]), rh = fmaxf(rh, r), rl = fminf(rl, r);
        }
    }
    sh[t] = vh, sh[n + t] = vl, sh[2 * n + t] = rh, sh[3 * n + t] = rl;
    __syncthreads();
    bool u = false;
    float v[8], lo = inf(), hi = -inf();
    if (ok) {
        for (int k = t - o; k < t - o + O; ++k)
            vh = fmaxf(vh, sh[k]), vl = fminf(vl, sh[n + k]), rh = fmaxf(rh, sh[2 * n + k]), rl = fminf(rl, sh[3 * n + k]);
        u = pkv::use_residual(vh, vl, rh, rl, kt);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            c[k] = u ? c[k] : 0.0f;
            v[k] = __fsub_rn(a[k], c[k]);
            lo = fminf(lo, v[k]), hi = fmaxf(hi, v[k]);
        }
    }
    __syncthreads();  // every row has read the test's partials
    sh[t] = lo, sh[n + t] = hi;
    __syncthreads();
    if (!ok) return;
    if (o == 0) use[row] = u;
    kivi::v_group_code<B>(pkv::Chosen{c}, row, o, v, sh, sh + n, D, GS, codes, scale, mn, x_hat);
}

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
    if ((threadIdx.x & 31) == 0) out[tok] = pkv::use_residual(vh, vl, rh, rl, k);
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrappers can ask for
#define INST(D)                                                                                                 \
    void *inst_prep_##D = (void*)&km_prep<D>, *inst_seed_##D = (void*)&km_seed<D>;                              \
    void *inst_step_##D = (void*)&km_step<D>, *inst_l2_##D = (void*)&km_assign<D>;
INST(64)
INST(128)
#undef INST
#define INST(B, T)                                                                                              \
    void *inst_pk_##B##T = (void*)&pkv_k_chunks<B, T>, *inst_pv_##B##T = (void*)&pkv_v_tokens<B, T>;
INST(2, __half)
INST(3, __half)
INST(4, __half)
INST(2, float)
INST(3, float)
INST(4, float)
#endif
