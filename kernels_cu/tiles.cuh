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

// Both quantized decoders below give each thread half a token row (D/2 channels) and work in
// groups of 8 channels: the group's packed codes come out of the row's words (loaded into
// registers a tile ahead by the caller, extracted with compile-time shifts), the 8 results
// go to shared memory as one 16-byte store. Chunk tiles are always full (TILE tokens).
template <int D, int BITS>
struct HalfRow {
    static constexpr int WORDS = D / 2 * BITS / 32;  // 32-bit words of codes per half row
    uint32_t w[WORDS];
    __device__ __forceinline__ void load(const uint8_t* codes, int t, int half) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(codes) + t * 2 * WORDS + half * WORDS;
#pragma unroll
        for (int i = 0; i < WORDS; ++i) w[i] = src[i];
    }
    __device__ __forceinline__ uint32_t code(int j) const {  // j: channel within the half row
        const int bit = j * BITS, k = bit >> 5, s = bit & 31;
        uint32_t v = w[k] >> s;
        if (s + BITS > 32) v |= w[k + 1] << (32 - s);
        return v & ((1u << BITS) - 1u);
    }
};

__device__ __forceinline__ void store8(__half* out, const float* v) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __halves2half2(__float2half_rn(v[2 * i]), __float2half_rn(v[2 * i + 1]));
    *reinterpret_cast<uint4*>(out) = u;
}

// The codes of a half row as fp16 numbers (exact up to 2048): folded kernels apply the scales to
// the other operand.
template <int D, int BITS>
__device__ __forceinline__ void decode_codes(__half* dst, int ld, const HalfRow<D, BITS>& row) {
    const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    __half* out = dst + t * ld + half * (D / 2);
#pragma unroll
    for (int g8 = 0; g8 < D / 16; ++g8) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (float)row.code(g8 * 8 + i);
        store8(out + g8 * 8, v);
    }
}

// Uniform codes (kivi; patternkv residuals): x = code * scale + min, for the half row `row` of
// codes already in registers. K: per-channel scale/min of the chunk, staged by the caller as
// float32 in shared memory (ssc, smn: (D,)). V: the token's scale/min (s_tok, m_tok; one group:
// D <= 128). prow: the token's pattern, from this half's first channel (patternkv adds it after
// dequantizing), or null.
template <int D, int BITS, bool PER_TOKEN>
__device__ __forceinline__ void decode_uniform(__half* dst, int ld, const HalfRow<D, BITS>& row, const float* ssc,
                                               const float* smn, float s_tok, float m_tok, const __half* prow) {
    const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    __half* out = dst + t * ld + half * (D / 2);
    const uint4* p = reinterpret_cast<const uint4*>(prow);
#pragma unroll
    for (int g8 = 0; g8 < D / 16; ++g8) {
        float v[8];
        uint4 pu;
        if (p) pu = p[g8];
        const __half* ph = reinterpret_cast<const __half*>(&pu);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int j = g8 * 8 + i, d = half * (D / 2) + j;
            v[i] = dq_uniform(row.code(j), PER_TOKEN ? s_tok : ssc[d], PER_TOKEN ? m_tok : smn[d]);
            if (p) v[i] = __fadd_rn(__half2float(ph[i]), v[i]);  // pattern + residual, as the oracle adds them
        }
        store8(out + g8 * 8, v);
    }
}

// Normal-quantile codes (nqkv): x = level[code] * absmax of its block, for the half row `row` in
// registers. Token-axis blocks: absmax (TILE, D/bs) in global memory; channel-axis blocks (K
// only): absmax rows of bs tokens, (., D), from the block holding the tile's first token, which
// sits `off` tokens into it. levels: the 2^BITS levels, staged in shared memory by the caller.
template <int D, int BITS, bool CHANNEL>
__device__ __forceinline__ void decode_nf(__half* dst, int ld, const HalfRow<D, BITS>& row, const __half* absmax,
                                          int bs, int off, const float* levels) {
    const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    __half* out = dst + t * ld + half * (D / 2);
#pragma unroll
    for (int g8 = 0; g8 < D / 16; ++g8) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int j = g8 * 8 + i, d = half * (D / 2) + j;
            const float a = __half2float(CHANNEL ? absmax[((t + off) / bs) * D + d] : absmax[t * (D / bs) + d / bs]);
            v[i] = __fmul_rn(levels[row.code(j)], a);
        }
        store8(out + g8 * 8, v);
    }
}

// The cache methods, as the attention kernel's METHOD template argument (KernelMethod.ident: minikv/cuda/kivi.py, nqkv.py, patternkv.py).
enum Method { DENSE = 0, KIVI = 1, NQKV_TOKEN = 2, NQKV_CHANNEL = 3, PATTERN = 4 };

// rowinfo (B, 6) int32 per sequence: sinks, chunks, window tokens, step tokens, step offset
// (for the dense cache the step's keys sit in the same buffer, after the history), patterns.
struct Row { int sinks, chunks, window, step, step_off, patterns; };

// The argument list of both fused attention kernels (attention.cu, decode.cu): the Python
// wrapper passes one tuple to whichever it launches.
#define MINIKV_ATTEND_PARAMS                                                                         \
    const __half *__restrict__ q, long long q_sb, long long q_sh, long long q_st, /* (B,H,T,D) */    \
        int H, int Hkv, int T, float scale, const int *__restrict__ rowinfo,                         \
        const __half *sink_k, const __half *sink_v, int sink_cap,  /* (B, Hkv, sink_cap, D) */      \
        const __half *win_k, const __half *win_v, int win_cap,     /* (B, Hkv, win_cap, D) */       \
        const __half *step_k, const __half *step_v, long long s_sb, long long s_sh, long long s_st, \
        const uint8_t *__restrict__ kc, const __half *__restrict__ ks, const __half *__restrict__ km, \
        const uint8_t *__restrict__ vc, const __half *__restrict__ vs, const __half *__restrict__ vm, \
        int n_chunks_cap, int G, int bs, const float *levels_k, const float *levels_v,              \
        const uint8_t *__restrict__ kidx, const uint8_t *__restrict__ vidx,                         \
        const uint8_t *__restrict__ vmask, const __half *kpat, const __half *vpat,                  \
        int mmax, /* pattern storage stride */ int mp, /* pattern table width */                    \
        float *__restrict__ o_part, /* (splits, B, H, T, D) */                                      \
        float *__restrict__ ml_part /* (splits, B, H, T, 2) */


// One chunk tile's share of this thread (half a token row), loaded a tile ahead into registers
// as raw bits: nothing waits on these loads until the tile is decoded, so they overlap the
// previous tile's scores, softmax and P.V.
template <int D, int METHOD, int KB, int VB>
struct ChunkTile {
    minikv::HalfRow<D, KB> k;
    minikv::HalfRow<D, VB> v;
    __half v_scale, v_min, k_scale, k_min;  // this token's V scale/min; channel tid's chunk K scale/min
    uint8_t k_pat, v_pat, v_mask;           // patternkv: pattern indices, the token's V mask byte
    int c, t0;                              // chunk and first token in it
    long long tok;                          // token slot of the tile's first key

    __device__ __forceinline__ void load(int ct, int per_chunk, int G, long long bh, int n_chunks_cap,
                                         const uint8_t* kc, const __half* ks, const __half* km, const uint8_t* vc,
                                         const __half* vs, const __half* vm, const uint8_t* kidx,
                                         const uint8_t* vidx, const uint8_t* vmask) {
        const int t = threadIdx.x >> 1, half = threadIdx.x & 1;
        c = ct / per_chunk;
        t0 = (ct % per_chunk) * TILE;
        tok = (bh * n_chunks_cap + c) * G + t0;
        k.load(kc + tok * (D * KB / 8), t, half);
        v.load(vc + tok * (D * VB / 8), t, half);
        if constexpr (METHOD == KIVI || METHOD == PATTERN) {
            v_scale = vs[tok + t];
            v_min = vm[tok + t];
            if (threadIdx.x < D) {
                k_scale = ks[(bh * n_chunks_cap + c) * D + threadIdx.x];
                k_min = km[(bh * n_chunks_cap + c) * D + threadIdx.x];
            }
        }
        if constexpr (METHOD == PATTERN) {
            k_pat = kidx[tok + t];
            v_pat = vidx[tok + t];
            const long long bit = tok - bh * n_chunks_cap * G + t;  // within the sequence's mask row
            v_mask = vmask[bh * n_chunks_cap * G / 8 + (bit >> 3)];
        }
    }
};

}  // namespace minikv
