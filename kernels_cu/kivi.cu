// KIVI quantizers (asymmetric uniform codes), bit for bit the NumPy oracles of
// minikv/kv/kivi.py (quantize_k_chunks, quantize_v_tokens); the bodies are in kivi.cuh.
// Vector loads and stores need 16-byte aligned arrays and D % 8 == 0 (the wrapper checks).
#include "kivi.cuh"

// K per channel over chunks. x (S, L, D) float32, S = leading dims * n chunks, L = G tokens.
// Out: codes (S, L, D*B/8) uint8, scale, mn (S, D) fp16, x_hat (S, L, D) float32. One block
// per chunk (any blockDim; 256). Dynamic shared memory: (2 * NS + 3) * D floats (kivi.cuh).
template <int B>
__global__ void kivi_k_chunks(const float* __restrict__ x, unsigned char* __restrict__ codes,
                              __half* __restrict__ scale, __half* __restrict__ mn,
                              float* __restrict__ x_hat, int L, int D) {
    kivi::k_chunks<B>(kivi::Rows{x, D}, codes, scale, mn, x_hat, L, D);
}

// V per token in groups of GS channels. x (R, D) float32, R = leading dims * T tokens,
// GS % 8 == 0 and GS | D. Out: codes (R, D*B/8) uint8, scale, mn (R, D/GS) fp16, x_hat (R, D).
// A block holds RB whole rows: blockDim = RB * O (O = D/8), one thread per (row, octet). Each
// thread loads its 8 values and puts their min/max in shared memory; after one barrier it folds
// its group's partials and codes its 8 values. Dynamic shared memory: 2 * blockDim floats.
template <int B>
__global__ void kivi_v_tokens(const float* __restrict__ x, unsigned char* __restrict__ codes,
                              __half* __restrict__ scale, __half* __restrict__ mn,
                              float* __restrict__ x_hat, int R, int D, int GS) {
    extern __shared__ float sh[];
    float *pmin = sh, *pmax = sh + blockDim.x;
    const int O = D >> 3, o = threadIdx.x % O;
    const size_t row = (size_t)blockIdx.x * (blockDim.x / O) + threadIdx.x / O;
    const bool ok = row < (size_t)R;
    const kivi::Rows src{x, D};
    float v[8], lo = MINIKV_INF, hi = -MINIKV_INF;
    if (ok) {
        src.load8(row, 8 * o, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) { lo = fminf(lo, v[k]); hi = fmaxf(hi, v[k]); }
    }
    pmin[threadIdx.x] = lo;
    pmax[threadIdx.x] = hi;
    __syncthreads();
    if (ok) kivi::v_group_code<B>(src, row, o, v, pmin, pmax, D, GS, codes, scale, mn, x_hat);
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
