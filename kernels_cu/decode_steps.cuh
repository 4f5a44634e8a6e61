// What a warp of the decode attention kernel (decode.cu) loads a step ahead of its use: groups of
// quantized keys (codes, V scales and mins, pattern indices and V mask bits) or of fp16 keys, in
// the lane layout of decode_tiles.cuh, and the L2 prefetches issued at kernel start.
#pragma once
#include "frag.cuh"

namespace minikv {

// NG groups of 16 quantized keys, as this lane loads them (a step ahead of their use). The
// step's keys are dealt so that each lane's are contiguous (any order does, if the scores and
// P.V agree): group q's mma row m is key 2 NG (m % 8) + 2q + m / 8, so lane (g, c) scores keys
// [2 NG g, 2 NG (g + 1)) over the step (their V scales, mins and pattern indices: one vector load
// each) and multiplies V rows [4 NG c, 4 NG (c + 1)).
// 3-bit codes are stored 8 to 3 bytes (minikv.kv.packing) and held as 4-bit ones (a nibble each,
// values 0-7) from their load on: everything after the load runs the 4-bit code path.
__host__ __device__ constexpr int held_bits(int bits) { return bits == 3 ? 4 : bits; }

// 8 3-bit codes (code i at bits 3i) -> 8 nibbles (code i at bits 4i)
__device__ __forceinline__ uint32_t spread3(uint32_t g) {
    uint32_t r = 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) r |= ((g >> (3 * i)) & 7u) << (4 * i);
    return r;
}

// A lane's run of codes as registers of N bytes: BITS != 3 a plain load, BITS == 3 the N * 3 / 4
// bytes in memory (loaded as wide as their alignment allows: 4, 2 or 1 bytes) spread to nibbles.
template <int BITS, int N>
__device__ __forceinline__ void load_codes(Raw<N>& r, const uint8_t* p) {
    if constexpr (BITS != 3) {
        r.load(p);
    } else {
        constexpr int MB = 3 * N / 4;  // bytes in memory
        uint32_t m[(MB + 3) / 4];
#pragma unroll
        for (int i = 0; i < (MB + 3) / 4; ++i) m[i] = 0u;
        if constexpr (MB % 4 == 0) {
#pragma unroll
            for (int i = 0; i < MB / 4; ++i) m[i] = __ldcs(reinterpret_cast<const unsigned int*>(p) + i);
        } else if constexpr (MB % 2 == 0) {
#pragma unroll
            for (int i = 0; i < MB / 2; ++i)
                m[i / 2] |= (uint32_t)__ldcs(reinterpret_cast<const unsigned short*>(p) + i) << (16 * (i % 2));
        } else {
#pragma unroll
            for (int i = 0; i < MB; ++i) m[i / 4] |= (uint32_t)__ldcs(p + i) << (8 * (i % 4));
        }
        const auto byte = [&](int i) { return (m[i / 4] >> (8 * (i % 4))) & 0xFFu; };
#pragma unroll
        for (int j = 0; j < N / 4; ++j) r.w[j] = spread3(byte(3 * j) | (byte(3 * j + 1) << 8) | (byte(3 * j + 2) << 16));
    }
}

template <int D, int KB, int VB, bool PAT, int NG>
struct QStep {
    static constexpr int KL = held_bits(KB), VL = held_bits(VB);  // bits per code in registers
    static constexpr int KBY = D * KL / 32, VBY = D * VL / 64;  // register bytes per key: scores lane, P.V lane
    static constexpr int KMB = D * KB / 32, VMB = D * VB / 64;  // the same in memory
    static constexpr int S = 2 * NG;                            // keys per lane and step (scores side)
    Raw<KBY> k[NG][2];  // group q: keys S g + 2q, +1; channels [c D/4, (c+1) D/4)
    Raw<VBY> v[NG][4];  // group q: keys 2 S c + 2q + {0, 1, S, S + 1}; channels [g D/8, (g+1) D/8)
    Raw<2 * S> vs, vm;  // half2 word q: V scale / min of group q's keys S g + 2q, +1
    Raw<S> kx, vx;      // patternkv: byte 2q + j: K / V pattern of key S g + 2q + j
    uint32_t mk;        // patternkv: bit 2q + j: V mask of key S g + 2q + j

    // tok: storage slot of the step's first key; bit: its index in the sequence's mask row
    __device__ __forceinline__ void load(long long tok, int bit, const uint8_t* kc, const uint8_t* vc,
                                         const __half* vsp, const __half* vmp, const uint8_t* kidx,
                                         const uint8_t* vidx, const uint8_t* mask_row) {
        const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int q = 0; q < NG; ++q) {
            const long long t = tok + S * g + 2 * q;
            load_codes<KB>(k[q][0], kc + t * (D * KB / 8) + c * KMB);
            load_codes<KB>(k[q][1], kc + (t + 1) * (D * KB / 8) + c * KMB);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                load_codes<VB>(v[q][j], vc + (tok + 2 * S * c + 2 * q + (j & 1) + (j >> 1) * S) * (D * VB / 8) + g * VMB);
        }
        vs.load(vsp + tok + S * g);
        vm.load(vmp + tok + S * g);
        if constexpr (PAT) {
            kx.load(kidx + tok + S * g);
            vx.load(vidx + tok + S * g);
            const int bq = bit + S * g;  // a multiple of S (<= 8): the bits share a byte
            mk = (mask_row[bq >> 3] >> (bq & 7)) & ((1u << S) - 1u);
        }
    }
    // The step's codes and V scales / mins into L2, one bulk prefetch per array (sm_90; the range
    // widened to 16-byte bounds, as the instruction needs).
    __device__ __forceinline__ static void prefetch_l2(long long tok, const uint8_t* kc, const uint8_t* vc,
                                                       const __half* vsp, const __half* vmp) {
#if __CUDA_ARCH__ >= 900
        const int lane = threadIdx.x & 31;
        if (lane < 4) {
            const uint8_t* a = lane == 0 ? kc + tok * (D * KB / 8) : lane == 1 ? vc + tok * (D * VB / 8)
                             : reinterpret_cast<const uint8_t*>((lane == 2 ? vsp : vmp) + tok);
            const int n = lane == 0 ? 16 * NG * D * KB / 8 : lane == 1 ? 16 * NG * D * VB / 8 : 16 * NG * 2;
            const unsigned long long lo = reinterpret_cast<unsigned long long>(a) & ~15ull;
            const uint32_t bytes = static_cast<uint32_t>((reinterpret_cast<unsigned long long>(a) + n + 15 - lo) & ~15ull);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(bytes) : "memory");
        }
#endif
    }
    // byte i of kx / vx (i a compile-time constant after unrolling), in one prmt
    __device__ __forceinline__ static uint32_t byte(const Raw<S>& r, int i) { return prmt(r.w[i / 4], 0u, 0x4440u | (i % 4)); }
};

// Rows [k_lo, k_hi) of D halves, `stride` halves apart, into L2 (the warp's lanes share the lines).
template <int D>
__device__ __forceinline__ void prefetch_rows_l2(const __half* p, long long stride, int k_lo, int k_hi) {
    constexpr int LINES = D * 2 / 128;  // 128-byte lines per row
    for (int i = (threadIdx.x & 31); i < (k_hi - k_lo) * LINES; i += 32)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + (k_lo + i / LINES) * stride + (i % LINES) * 64));
}

// One group of 16 fp16 keys (sinks, window, this step's keys, the dense cache).
template <int D>
struct FStep {
    Raw<D / 2> k[2];  // keys 2g, 2g+1; channels [c D/4, (c+1) D/4)
    Raw<D / 4> v[4];  // keys 4c..4c+3; channels [g D/8, (g+1) D/8)
    // rows of `n` valid keys from key0, `stride` halves apart
    __device__ __forceinline__ void load(const __half* kp, const __half* vp, long long stride, int key0, int n) {
        const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int key = key0 + 2 * g + j;
            if (key < n) k[j].load(kp + key * stride + c * (D / 4));
            else k[j].zero();
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int key = key0 + 4 * c + j;
            if (key < n) v[j].load(vp + key * stride + g * (D / 8));
            else v[j].zero();  // zeros, not garbage: p = 0 times NaN would still be NaN
        }
    }
};

}  // namespace minikv
