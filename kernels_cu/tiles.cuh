// Tile decoders for the fused attention kernel: each turns TILE consecutive tokens of one
// (sequence, kv head) into fp16 rows K[t][d], V[t][d] in shared memory, exactly as the
// NumPy oracle dequantizes them (explicit _rn ops: no FMA contraction), so the attention
// skeleton (attention.cu) is shared by every method.
//
// Thread mapping: 2 threads per token row, each decoding half of the D channels.
// Packed codes are a little-endian bit stream per token row: code j at bits [j*b, (j+1)*b).
#pragma once
#include "common.cuh"

namespace minikv {

constexpr int TILE = 64;  // keys per tile; a quantized chunk of G tokens is G / TILE tiles

// Code j of a packed row, read from 32-bit words (rows are 4-byte aligned).
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t* row, int j) {
    const int bit = j * BITS, w = bit >> 5, s = bit & 31;
    uint32_t v = row[w] >> s;
    if (s + BITS > 32) v |= row[w + 1] << (32 - s);
    return v & ((1u << BITS) - 1u);
}

__device__ __forceinline__ float dq_uniform(uint32_t code, float scale, float mn) {
    return __fadd_rn(__fmul_rn((float)code, scale), mn);  // codes * scale + min, as the oracle
}

// fp16 rows copied as they are: sinks, window, this step's tokens, the dense cache.
// src points at the tile's first row; rows `stride` halves apart; n valid rows.
template <int D>
__device__ __forceinline__ void stage_fp16(__half* dst, int ld, const __half* src, long long stride, int n) {
    const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    __half* out = dst + t * ld + half * (D / 2);
    if (t < n) {
        const uint4* in = reinterpret_cast<const uint4*>(src + t * stride + half * (D / 2));
#pragma unroll
        for (int i = 0; i < D / 16; ++i) reinterpret_cast<uint4*>(out)[i] = in[i];
    } else {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) out[i] = __float2half(0.0f);
    }
}

// Uniform codes (kivi; patternkv residuals). K: per-channel scale/min of the chunk (sc, mn:
// (D,) fp16). V: per-token scale/min, one group per min(D, 128) channels (sc, mn: (TILE, D/g)).
// patterns (M, D) with idx (TILE,): patternkv adds each token's pattern after dequantizing;
// for V only where its mask bit (bit mask_bit0 + t of `mask`) is set. null: no patterns.
template <int D, int BITS, bool PER_TOKEN>
__device__ __forceinline__ void stage_uniform(__half* dst, int ld, const uint8_t* codes, const __half* sc,
                                              const __half* mn, int n, const __half* patterns,
                                              const uint8_t* idx, const uint8_t* mask, int mask_bit0) {
    constexpr int ROW_WORDS = D * BITS / 32, GROUP = D < 128 ? D : 128;
    const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    __half* out = dst + t * ld + half * (D / 2);
    if (t >= n) {
        for (int i = 0; i < D / 2; ++i) out[i] = __float2half(0.0f);
        return;
    }
    const uint32_t* row = reinterpret_cast<const uint32_t*>(codes) + t * ROW_WORDS;
    const __half* p = nullptr;
    if (patterns) {
        const int bit = mask_bit0 + t;
        if (!mask || ((mask[bit >> 3] >> (bit & 7)) & 1)) p = patterns + (size_t)idx[t] * D;
    }
#pragma unroll 8
    for (int i = 0; i < D / 2; ++i) {
        const int d = half * (D / 2) + i;
        const int k = PER_TOKEN ? t * (D / GROUP) + d / GROUP : d;
        float x = dq_uniform(code_at<BITS>(row, d), __half2float(sc[k]), __half2float(mn[k]));
        if (p) x = __fadd_rn(__half2float(p[d]), x);  // pattern + residual, as the oracle adds them
        out[i] = __float2half_rn(x);
    }
}

// Normal-quantile codes (nqkv): x = level[code] * absmax of its block. Token-axis blocks:
// absmax (TILE, D/bs); channel-axis blocks (K only): absmax rows of bs tokens, (., D), from
// the block holding the tile's first token, which sits `off` tokens into it.
template <int D, int BITS, bool CHANNEL>
__device__ __forceinline__ void stage_nf(__half* dst, int ld, const uint8_t* codes, const __half* absmax, int bs,
                                         int off, const float* levels, int n) {
    constexpr int ROW_WORDS = D * BITS / 32;
    const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    __half* out = dst + t * ld + half * (D / 2);
    if (t >= n) {
        for (int i = 0; i < D / 2; ++i) out[i] = __float2half(0.0f);
        return;
    }
    const uint32_t* row = reinterpret_cast<const uint32_t*>(codes) + t * ROW_WORDS;
#pragma unroll 8
    for (int i = 0; i < D / 2; ++i) {
        const int d = half * (D / 2) + i;
        const float a = __half2float(CHANNEL ? absmax[((t + off) / bs) * D + d] : absmax[t * (D / bs) + d / bs]);
        out[i] = __float2half_rn(__fmul_rn(levels[code_at<BITS>(row, d)], a));
    }
}

}  // namespace minikv
