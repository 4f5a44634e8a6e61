// PatternKV's per-block pattern tables in the decode kernel (decode.cu; KVQUANT.md 3.5): before
// the keys, q . C_K for every K pattern, so that a key's score adds one table entry; after them,
// the V patterns weighted by the block's histogram of probabilities (H C_V), added to the output.
// Warp w takes the tiles of 16 patterns w, w + DW, ... (at most PT: an index is one byte) and
// loads the rows of all of them at once, so that a table costs one memory latency, not one per
// tile; the K rows are issued with the first keys' loads, the V rows as the keys end.
#pragma once
#include "decode_tiles.cuh"

namespace minikv {

template <int DW>
constexpr int PT = 256 / 16 / DW;  // pattern tiles per warp (DW warps per block)

// Rows first + j of each of this warp's pattern tiles (patterns (warp + i DW) 16 ...) from pat
// (rows of D halves), the lane's run from half col; rows past n are zeros, not garbage (a weight
// of 0 times NaN is NaN). Every split block of a kv head reads them: cached loads.
template <int DW, int BYTES, int J>
__device__ __forceinline__ void load_tiles(Raw<BYTES> (&r)[PT<DW>][J], const __half* pat, int n, int D, int first, int col) {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < PT<DW>; ++i) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int p = (warp + i * DW) * 16 + first + j;
            if (p < n) r[i][j].load_cached(pat + (long long)p * D + col);
            else r[i][j].zero();
        }
    }
}

// This warp's K pattern rows as score A operands (FStep::k's layout: rows 2g, 2g + 1 of a tile,
// channels [c D/4, (c+1) D/4)).
template <int D, int DW>
struct KPatterns {
    Raw<D / 2> k[PT<DW>][2];

    __device__ __forceinline__ void load(const __half* pat, int n) {  // pat: (mmax, D), n rows in use
        const int lane = threadIdx.x & 31;
        load_tiles<DW>(k, pat, n, D, 2 * (lane >> 2), (lane & 3) * (D / 4));
    }

    // qc (mp, NR) = (q . C_K[p]) * sl2 for this warp's tiles; bf: q as the scores' B fragments.
    __device__ __forceinline__ void table(float* qc, const uint32_t (&bf)[D / 16][2], float sl2, int n) const {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, r0 = 2 * (lane & 3);
#pragma unroll
        for (int i = 0; i < PT<DW>; ++i) {
            const int p0 = (warp + i * DW) * 16;
            if (p0 < n) {  // warp-uniform
                float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                dense_scores<D>(s, k[i], bf);
                *reinterpret_cast<float2*>(qc + (p0 + 2 * g) * NR + r0) = make_float2(s[0] * sl2, s[1] * sl2);
                *reinterpret_cast<float2*>(qc + (p0 + 2 * g + 1) * NR + r0) = make_float2(s[2] * sl2, s[3] * sl2);
            }
        }
    }
};

// This warp's V pattern rows as P.V A operands: a tile is a group of 16 keys, rows 4c..4c+3,
// channels [g D/8, (g+1) D/8) (FStep::v's layout).
template <int D, int DW>
struct VPatterns {
    Raw<D / 4> v[PT<DW>][4];

    __device__ __forceinline__ void load(const __half* pat, int n) {
        const int lane = threadIdx.x & 31;
        load_tiles<DW>(v, pat, n, D, 4 * (lane & 3), (lane >> 2) * (D / 8));
    }

    // o (normalised, Acc::o's layout) += C_V^T W^T over this warp's tiles, W[p][row] = sum over
    // warps w of hist_w[p][row] * f_w[row]: hist (DW, mp, NR) the warps' fixed-point sums, f0 / f1
    // their factors for rows r0 / r1 (block weight / histogram scale / row sum: W <= 1, fp16-safe).
    __device__ __forceinline__ void fold(float (&o)[D / 16][4], const uint32_t* hist, int mp, const float (&f0)[DW],
                                         const float (&f1)[DW], int n) const {
        constexpr int NK = D / 16;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, r0 = 2 * (lane & 3);
#pragma unroll
        for (int i = 0; i < PT<DW>; ++i) {
            const int p0 = (warp + i * DW) * 16;
            if (p0 >= n) continue;  // warp-uniform
            float w[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // patterns p0 + 2g, +1 x rows r0, r1
#pragma unroll
            for (int wi = 0; wi < DW; ++wi) {
                const uint32_t* h0 = hist + (wi * mp + p0 + 2 * g) * NR + r0;
                const uint2 x = *reinterpret_cast<const uint2*>(h0), y = *reinterpret_cast<const uint2*>(h0 + NR);
                w[0] += f0[wi] * __uint2float_rn(x.x), w[1] += f1[wi] * __uint2float_rn(x.y);
                w[2] += f0[wi] * __uint2float_rn(y.x), w[3] += f1[wi] * __uint2float_rn(y.y);
            }
            uint32_t va[NK][4];
            v_fragments<D, 16, D / 8>(va, v[i][0].w, v[i][2].w, v[i][1].w, v[i][3].w);
            const uint32_t bw[2] = {movtrans(h2u(__floats2half2_rn(w[0], w[1]))),
                                    movtrans(h2u(__floats2half2_rn(w[2], w[3])))};
#pragma unroll
            for (int mb = 0; mb < NK; ++mb) mma16816(o[mb], va[mb], bw);
        }
    }
};

}  // namespace minikv
