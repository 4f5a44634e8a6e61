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

// The residuals x - pat[idx] of token rows (kivi::Rows) as a kivi source, rebuilt as pattern +
// decoded residual. Token t of set s has its pattern index at idx[tok.at(s, t)] (the method's
// (B, H, cap) index storage) and the pattern at pat[(tok.base(s) * M + idx) * D] ((B, H, M, D)).
template <class T>
struct Residual {
    kivi::Rows<T> x;
    const __half* pat;
    const unsigned char* idx;
    kivi::Slots tok;
    int M, D;
    __device__ __forceinline__ const __half* prow(int s, int t) const {
        return pat + (tok.base(s) * M + idx[tok.at(s, t)]) * D;
    }
    __device__ __forceinline__ void load8(int s, int t, int c, float (&v)[8]) const {
        float p[8];
        minikv::quant::ld8(x.row(s, t) + c, v), minikv::quant::ld8(prow(s, t) + c, p);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = __fsub_rn(v[k], p[k]);
    }
    __device__ __forceinline__ void rebuild8(int s, int t, int c, float (&xh)[8]) const {
        float p[8];
        minikv::quant::ld8(prow(s, t) + c, p);
#pragma unroll
        for (int k = 0; k < 8; ++k) xh[k] = __fadd_rn(p[k], xh[k]);
    }
};

// A V token's 8 chosen pattern values (0 where it is stored raw), added back to rebuild it.
struct Chosen {
    const float (&c)[8];
    __device__ __forceinline__ void rebuild8(int, int, int, float (&xh)[8]) const {
#pragma unroll
        for (int k = 0; k < 8; ++k) xh[k] = __fadd_rn(c[k], xh[k]);
    }
};

}  // namespace pkv

// The source and index arguments of the pkv kernels: token rows x (kivi::Rows), the pattern
// tables pat (B, H, M, D) fp16 and pattern indices idx (B, H, tcap) uint8 of the flush's rows,
// its first token at toff.
#define PKV_SRC_ARGS                                                                                             \
    const T *__restrict__ x, long long xb, long long xh, long long xt, int H, const int *__restrict__ rows,        \
        const __half *__restrict__ pat, int M, const unsigned char *__restrict__ idx, int tcap, int toff
#define PKV_SRC pkv::Residual<T>{kivi::Rows<T>{x, xb, xh, xt, H}, pat, idx, kivi::Slots{rows, H, tcap, toff}, M, D}

// PatternKV's K residuals as kivi K (minikv.kv.patterns.pack_k_residuals): n chunks of L tokens
// per set, one block per chunk. Out at chunk slots (cap, off): codes, scale, mn as kivi_k_chunks;
// x_hat (S * n * L, D) float32 (pattern + decoded residual) or null. Launch and shared memory as
// kivi_k_chunks.
template <int B, class T>
__global__ void pkv_k_chunks(PKV_SRC_ARGS, int cap, int off, int n, unsigned char* __restrict__ codes,
                             __half* __restrict__ scale, __half* __restrict__ mn, float* __restrict__ x_hat, int L, int D) {
    kivi::k_chunks<B>(PKV_SRC, kivi::Slots{rows, H, cap, off}, n, codes, scale, mn, x_hat, L, D);
}

// PatternKV's V tokens (minikv.kv.patterns.pack_v_residuals): per token the V test on v and
// v - C[idx], then kivi V of the residual where it passes, of v itself where not. R = S * TS
// token rows, stored at the token slots (tcap, toff) like the indices; one thread per (row,
// octet) as kivi_v_tokens. Out: codes, scale, mn as kivi_v_tokens; use (R,) bool or null; mask
// (slots / 8) uint8 (bit slot % 8 of byte slot / 8; needs TS, tcap, toff and the block's rows
// multiples of 8) or null; x_hat (R, D) float32 (chosen pattern + decoded) or null.
// kt = float32(2 z / sqrt(5 D)). Dynamic shared memory: 4 * blockDim floats.
template <int B, class T>
__global__ void pkv_v_tokens(PKV_SRC_ARGS, int TS, unsigned char* __restrict__ codes, __half* __restrict__ scale,
                             __half* __restrict__ mn, bool* __restrict__ use, unsigned char* __restrict__ mask,
                             float* __restrict__ x_hat, int R, int D, int GS, float kt) {
    extern __shared__ float sh[];
    const int O = D >> 3, o = threadIdx.x % O, n = blockDim.x, th = threadIdx.x;
    const int row = blockIdx.x * (n / O) + th / O, set = row / TS, t = row % TS;
    const bool ok = row < R;
    const pkv::Residual<T> src = PKV_SRC;
    float a[8], c[8], vh = -inf(), vl = inf(), rh = -inf(), rl = inf();
    if (ok) {
        minikv::quant::ld8(src.x.row(set, t) + 8 * o, a), minikv::quant::ld8(src.prow(set, t) + 8 * o, c);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float r = __fsub_rn(a[k], c[k]);
            vh = fmaxf(vh, a[k]), vl = fminf(vl, a[k]), rh = fmaxf(rh, r), rl = fminf(rl, r);
        }
    }
    sh[th] = vh, sh[n + th] = vl, sh[2 * n + th] = rh, sh[3 * n + th] = rl;
    __syncthreads();
    bool u = false;
    float v[8], lo = inf(), hi = -inf();
    if (ok) {
        for (int k = th - o; k < th - o + O; ++k)
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
    sh[th] = lo, sh[n + th] = hi;
    bool* flag = reinterpret_cast<bool*>(sh + 2 * n);  // the block's rows' verdicts
    if (o == 0) flag[th / O] = u;
    __syncthreads();
    const size_t q = src.tok.at(set, t);
    if (mask && th < n / O / 8 && blockIdx.x * (n / O) + 8 * th < R) {  // a byte per 8 rows
        unsigned byte = 0;
        for (int k = 0; k < 8; ++k) byte |= (unsigned)flag[8 * th + k] << k;
        const int r8 = blockIdx.x * (n / O) + 8 * th;
        mask[src.tok.at(r8 / TS, r8 % TS) / 8] = (unsigned char)byte;
    }
    if (!ok) return;
    if (use && o == 0) use[row] = u;
    kivi::v_group_code<B>(pkv::Chosen{c}, set, t, q, o, v, sh, sh + n, D, GS, codes, scale, mn,
                          x_hat ? x_hat + (size_t)row * D : nullptr);
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
    void *inst_prep_##D = (void*)&km_prep<D, float>, *inst_seed_##D = (void*)&km_seed<D, float>;                \
    void *inst_step_##D = (void*)&km_step<D, float>, *inst_l2_##D = (void*)&km_assign<D, float, float>;        \
    void *inst_preph_##D = (void*)&km_prep<D, __half>, *inst_seedh_##D = (void*)&km_seed<D, __half>;            \
    void *inst_steph_##D = (void*)&km_step<D, __half>;                                                         \
    void *inst_l2h_##D = (void*)&km_assign<D, __half, __half>, *inst_l2fh_##D = (void*)&km_assign<D, float, __half>;
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
