// KIVI quantizers (asymmetric uniform codes), bit for bit the NumPy oracles of
// minikv/kv/kivi.py (quantize_k_chunks, quantize_v_tokens); the bodies are in kivi.cuh.
// Sources: fp16 or float32 (T) token rows of S = nb * H sets at x + b*xb + h*xh + t*xt (kivi::Rows:
// rows contiguous and 16-byte aligned, D % 8 == 0); outputs go to storage slots (kivi::Slots:
// rows (nb,) int32 batch rows, cap items per (row, head), off the first written).
#include "kivi.cuh"

// K per channel over n chunks of L tokens per set: one block per chunk (S * n), blockDim a
// multiple of D/8 (256 for D <= 256). Out: codes (slots, L, D*B/8) uint8, scale, mn (slots, D)
// fp16 at chunk slots; x_hat (S * n * L, D) float32 or null. Shared memory: kivi::k_chunks.
template <int B, class T>
__global__ void kivi_k_chunks(const T* __restrict__ x, long long xb, long long xh, long long xt, int H,
                              const int* __restrict__ rows, int cap, int off, int n, unsigned char* __restrict__ codes,
                              __half* __restrict__ scale, __half* __restrict__ mn, float* __restrict__ x_hat, int L, int D) {
    kivi::k_chunks<B>(kivi::Rows<T>{x, xb, xh, xt, H}, kivi::Slots{rows, H, cap, off}, n, codes, scale, mn, x_hat, L, D);
}

// V per token in groups of GS channels (GS % 8 == 0, GS | D): R = S * TS token rows, TS per set.
// Out: codes (slots, D*B/8) uint8, scale, mn (slots, D/GS) fp16 at token slots; x_hat (R, D)
// float32 or null. A block holds RB whole rows: blockDim = RB * O (O = D/8), one thread per
// (row, octet). Each thread loads its 8 values and puts their min/max in shared memory; after one
// barrier it folds its group's partials and codes its 8 values. Dynamic shared memory: 2 *
// blockDim floats.
template <int B, class T>
__global__ void kivi_v_tokens(const T* __restrict__ x, long long xb, long long xh, long long xt, int H,
                              const int* __restrict__ rows, int cap, int off, int TS, unsigned char* __restrict__ codes,
                              __half* __restrict__ scale, __half* __restrict__ mn, float* __restrict__ x_hat, int R,
                              int D, int GS) {
    extern __shared__ float sh[];
    float *pmin = sh, *pmax = sh + blockDim.x;
    const int O = D >> 3, o = threadIdx.x % O;
    const int row = blockIdx.x * (blockDim.x / O) + threadIdx.x / O, set = row / TS, t = row % TS;
    const bool ok = row < R;
    const kivi::Rows<T> src{x, xb, xh, xt, H};
    float v[8], lo = MINIKV_INF, hi = -MINIKV_INF;
    if (ok) {
        src.load8(set, t, 8 * o, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) { lo = fminf(lo, v[k]); hi = fmaxf(hi, v[k]); }
    }
    pmin[threadIdx.x] = lo;
    pmax[threadIdx.x] = hi;
    __syncthreads();
    if (ok)
        kivi::v_group_code<B>(src, set, t, kivi::Slots{rows, H, cap, off}.at(set, t), o, v, pmin, pmax, D, GS, codes,
                              scale, mn, x_hat ? x_hat + (size_t)row * D : nullptr);
}

#ifdef MINIKV_INSTANTIATE_ALL
#define INST(B, T)                                              \
    void* inst_k_##B##T = (void*)&kivi_k_chunks<B, T>; \
    void* inst_v_##B##T = (void*)&kivi_v_tokens<B, T>;
#define INST2(B) INST(B, float) INST(B, __half)
INST2(2)
INST2(3)
INST2(4)
INST2(8)
INST2(16)
#undef INST2
#undef INST
#endif
