// Register-fragment helpers for the decode attention kernel (decode.cu): packed codes go from
// global memory straight into mma.sync operand registers, with no shared-memory tile between.
//
// Codes become fp16 numbers with the "magic exponent" trick: OR-ing a b-bit code, sitting at
// bit s of a 16-bit half, into 0x6400 (1024.0) gives 1024 + code * 2^s exactly (the mantissa
// has 10 bits), one instruction per half2 pair (code j of a word's low half, code j of its high
// half). The kernel never takes the bias and the shift off per code: scores fold 2^-s into q and
// start from -1024 sum(q); P.V sums 1024 sum(p) aside and rescales its sums per channel block.
#pragma once
#include "mma.cuh"

namespace minikv {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// (x & mask) | 0x64006400 in one instruction.
__device__ __forceinline__ uint32_t magic(uint32_t x, uint32_t mask) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(0x64006400u));
    return r;
}

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// An 8x8 fp16 matrix held as mma fragments (lane: row lane/4, columns 2(lane%4), +1), transposed.
__device__ __forceinline__ uint32_t movtrans(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// BYTES of packed codes (or fp16 values) of one key, as 32-bit words, loaded with the widest
// aligned vector loads, streaming (every byte of the cache is read once per step).
template <int BYTES>
struct Raw {
    static constexpr int N = BYTES < 4 ? 1 : BYTES / 4;
    uint32_t w[N];
    __device__ __forceinline__ void load(const void* p) {
        if constexpr (BYTES == 2) {
            w[0] = __ldcs(reinterpret_cast<const unsigned short*>(p));
        } else if constexpr (BYTES == 4) {
            w[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
        } else if constexpr (BYTES == 8) {
            const uint2 u = __ldcs(reinterpret_cast<const uint2*>(p));
            w[0] = u.x, w[1] = u.y;
        } else {
#pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p) + i);
                w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
            }
        }
    }
    __device__ __forceinline__ void load_cached(const void* p) {  // data read again soon: keep it in L1
        static_assert(BYTES % 16 == 0, "cached loads are whole 16-byte vectors");
#pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
        }
    }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < N; ++i) w[i] = 0u;
    }
};

// Shift of code j (0 <= j < 16/BITS) within its byte of a 16-bit half: code_pair_biased's scale.
template <int BITS>
__host__ __device__ constexpr int code_shift(int j) { return (j % (8 / BITS)) * BITS; }

// Half2 pair j of a word x whose two 16-bit halves each hold 16/BITS codes, as (code j of the
// low half, code j of the high half) * 2^code_shift(j) + 1024, exact fp16 numbers, in one
// instruction: a caller that folds 2^-shift into the other operand and takes 1024 times that
// operand off the accumulator never needs the codes themselves. x8 = x >> 8.
template <int BITS>
__device__ __forceinline__ uint32_t code_pair_biased(uint32_t x, uint32_t x8, int j) {
    constexpr int H = 8 / BITS;  // codes per byte; j is a compile-time constant after unrolling
    const uint32_t m = ((1u << BITS) - 1u) << code_shift<BITS>(j);
    return magic(j < H ? x : x8, m | (m << 16));
}

// All pairs of NW words: out[w * E + j] = code_pair_biased(words[w], j). For a key's run of
// codes, pair (w, j) holds channels (w * 2E + j, w * 2E + E + j) of the run.
template <int BITS, int NW>
__device__ __forceinline__ void code_pairs(const uint32_t* words, uint32_t* out) {
    constexpr int E = 16 / BITS;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
        const uint32_t x = words[w], x8 = x >> 8;
#pragma unroll
        for (int j = 0; j < E; ++j) out[w * E + j] = code_pair_biased<BITS>(x, x8, j);
    }
}

// Half o of an array of 32-bit words (o a compile-time constant after unrolling).
__device__ __forceinline__ __half half_of(const uint32_t* w, int o) {
    const uint32_t x = w[o / 2];
    return __ushort_as_half(static_cast<unsigned short>((o & 1) ? x >> 16 : x & 0xffffu));
}

// The 16-bit half i of a and of b, as one word (a's in the low half).
__device__ __forceinline__ uint32_t halves(const uint32_t* a, const uint32_t* b, int i) {
    return prmt(a[i / 2], b[i / 2], (i & 1) ? 0x7632u : 0x5410u);
}

// 16 bytes global -> shared without passing through registers; completion is awaited per group.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

}  // namespace minikv
