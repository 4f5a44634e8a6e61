// NQKV quantizers (normal-quantile block codes), bit for bit the NumPy oracles of
// minikv/kv/nqkv.py (quantize_token_blocks, quantize_channel_blocks) and packing.py's nf_*.
// absmax = f16_round(max |x|, up); code = the number of midpoints strictly below x / absmax
// (x_n = 0 where absmax == 0); x_hat = level[code] * absmax. Every float step is one IEEE
// round-to-nearest float32 op (__f*_rn intrinsics; the loader also passes --fmad=false);
// max is exact in any order; fp32 -> fp16 is __float2half_rn. The levels and midpoints
// (float32, from packing.nf_levels / nf_midpoints) come in as arguments: mids (2^B - 1),
// levels (2^B). Vector loads and stores need 16-byte aligned arrays and D % 8 == 0.
#include "quant.cuh"

namespace nqkv {

using namespace minikv::quant;  // f16_round, ld4, ld8, pack8, store8


// packing.nf_codes + nf_dequant of one value against float32 absmax a (tables in shared memory).
template <int B>
__device__ __forceinline__ unsigned nf_code(float v, float a, const float* mids, const float* levels,
                                            float& xh) {
    const float xn = a > 0.0f ? __fdiv_rn(v, a) : 0.0f;
    unsigned c = 0;
#pragma unroll
    for (int k = 0; k < (1 << B) - 1; ++k) c += xn > mids[k];
    xh = __fmul_rn(levels[c], a);
    return c;
}

// Copy the 2^B - 1 midpoints and 2^B levels to t[0..32) (t[0..15) mids, t[16..32) levels).
template <int B>
__device__ __forceinline__ void load_tables(const float* mids, const float* levels, float* t) {
    for (int i = threadIdx.x; i < (1 << B); i += blockDim.x) {
        if (i < (1 << B) - 1) t[i] = mids[i];
        t[16 + i] = levels[i];
    }
}

}  // namespace nqkv

// Blocks of BS values along head_dim of one token. x (R, D) float32, R = leading dims * T,
// BS % 8 == 0 and BS | D. Out: codes (R, D*B/8) uint8, absmax (R, D/BS) fp16, x_hat (R, D).
// A block holds RB whole rows: blockDim = RB * O (O = D/8), one thread per (row, octet). Each
// thread loads its 8 values and puts their max |x| in shared memory; after one barrier it
// folds the BS/8 partials of its block (every thread of a block gets the same absmax; the
// block's first thread stores it) and codes its 8 values.
// Dynamic shared memory: 32 + blockDim floats (tables, then partials).
template <int B>
__global__ void nqkv_token_blocks(const float* __restrict__ x, const float* __restrict__ mids,
                                  const float* __restrict__ levels, unsigned char* __restrict__ codes,
                                  __half* __restrict__ absmax, float* __restrict__ x_hat, int R, int D,
                                  int BS) {
    extern __shared__ float sh[];
    float *tab = sh, *pmax = sh + 32;
    nqkv::load_tables<B>(mids, levels, tab);
    const int O = D >> 3, o = threadIdx.x % O;
    const size_t row = (size_t)blockIdx.x * (blockDim.x / O) + threadIdx.x / O;
    const bool ok = row < (size_t)R;
    float v[8], hi = 0.0f;
    if (ok) {
        nqkv::ld8(x + row * D + 8 * o, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) hi = fmaxf(hi, fabsf(v[k]));
    }
    pmax[threadIdx.x] = hi;
    __syncthreads();
    if (!ok) return;
    const int go = BS >> 3, first = threadIdx.x - o % go;
    for (int k = 0; k < go; ++k) hi = fmaxf(hi, pmax[first + k]);
    const __half ha = nqkv::f16_round(hi, +1);
    if (o % go == 0) absmax[row * (D / BS) + o / go] = ha;
    const float a = __half2float(ha);
    float xh[8];
    unsigned cd[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) cd[k] = nqkv::nf_code<B>(v[k], a, tab, tab + 16, xh[k]);
    nqkv::pack8<B>(cd, codes + row * (D * B / 8) + o * B);
    nqkv::store8(x_hat + row * D + 8 * o, xh);
}

// Blocks of L = bs tokens along one channel. x (S, L, D) float32, S = leading dims * n * G/bs.
// Out: codes (S, L, D*B/8) uint8 (token rows), absmax (S, D) fp16, x_hat (S, L, D) float32.
// One block per token block s (any blockDim; 256). Phase 1: thread (slice j, quad q) takes
// max |x| of channels 4q..4q+3 over tokens j, j+NS, ... (NS = max(1, blockDim / (D/4))) into
// shared partials; phase 2: thread c folds channel c's partials into the fp16 absmax; phase 3:
// thread (token, octet) codes 8 channels of a token: B packed bytes and 8 x_hat values.
// Dynamic shared memory: 32 + (NS + 1) * D floats.
template <int B>
__global__ void nqkv_channel_blocks(const float* __restrict__ x, const float* __restrict__ mids,
                                    const float* __restrict__ levels, unsigned char* __restrict__ codes,
                                    __half* __restrict__ absmax, float* __restrict__ x_hat, int L, int D) {
    extern __shared__ float sh[];
    const int Q = D >> 2, O = D >> 3, nthr = blockDim.x;
    const int NS = nthr / Q > 1 ? nthr / Q : 1;
    float *tab = sh, *pmax = sh + 32, *pa = pmax + NS * D;
    nqkv::load_tables<B>(mids, levels, tab);
    const size_t blk = blockIdx.x, base = blk * L * D;
    for (int i = threadIdx.x; i < NS * Q; i += nthr) {
        const int q = i % Q, j = i / Q;
        float hi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int t = j; t < L; t += NS) {
            const float4 v = reinterpret_cast<const float4*>(x + base + (size_t)t * D)[q];
            hi[0] = fmaxf(hi[0], fabsf(v.x)); hi[1] = fmaxf(hi[1], fabsf(v.y));
            hi[2] = fmaxf(hi[2], fabsf(v.z)); hi[3] = fmaxf(hi[3], fabsf(v.w));
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) pmax[j * D + 4 * q + k] = hi[k];
    }
    __syncthreads();
    for (int c = threadIdx.x; c < D; c += nthr) {
        float hi = pmax[c];
        for (int j = 1; j < NS; ++j) hi = fmaxf(hi, pmax[j * D + c]);
        const __half ha = nqkv::f16_round(hi, +1);
        absmax[blk * D + c] = ha;
        pa[c] = __half2float(ha);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < L * O; i += nthr) {
        const int t = i / O, c0 = 8 * (i % O);
        const size_t row = blk * L + t;
        float v[8], xh[8];
        unsigned cd[8];
        nqkv::ld8(x + row * D + c0, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) cd[k] = nqkv::nf_code<B>(v[k], pa[c0 + k], tab, tab + 16, xh[k]);
        nqkv::pack8<B>(cd, codes + row * (D * B / 8) + c0 / 8 * B);
        nqkv::store8(x_hat + row * D + c0, xh);
    }
}

#ifdef MINIKV_INSTANTIATE_ALL
#define INST(B)                                               \
    void* inst_t_##B = (void*)&nqkv_token_blocks<B>;   \
    void* inst_c_##B = (void*)&nqkv_channel_blocks<B>;
INST(2)
INST(3)
INST(4)
#undef INST
#endif
