// The ends of the decode attention kernel (decode.cu): a warp's output into shared memory, and the
// merge of a kv head's splits by whichever of its blocks finishes last (no second launch: at
// batch 1 a merge kernel's launch and dependent loads cost as much as a quarter of the step).
#pragma once
#include "decode_tiles.cuh"

namespace minikv {

// The (b, h', t) row, in (B, H, T) order, of query row r of kv head h's tile: r = t g + j, h' = h g + j.
__device__ __forceinline__ long long part_row(int b, int h, int g, int H, int T, int r) {
    return ((long long)b * H + h * g + r % g) * T + r / g;
}

// Acc::o's fragments (rows r0 = 2c, r1 = 2c + 1; channel g D/8 + mb and + D/16) as rows of a
// (NR, LDM) float block: a lane's channels of a row are D/8 contiguous floats, stored as float4s.
template <int D>
__device__ __forceinline__ void store_rows(float* dst, const float (&o)[D / 16][4]) {
    constexpr int NK = D / 16, LDM = MO_LD<D>;
    const int lane = threadIdx.x & 31, g = lane >> 2, r0 = 2 * (lane & 3);
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // row r0 + i: fragment entries i (channels < D/16 of the run) and 2 + i
        float* row = dst + (r0 + i) * LDM + g * (D / 8);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int mb = 0; mb < NK; mb += 4) {
                const int e = 2 * half + i;
                *reinterpret_cast<float4*>(row + half * NK + mb) = make_float4(o[mb][e], o[mb + 1][e], o[mb + 2][e], o[mb + 3][e]);
            }
        }
    }
}

// True in the block that completes counter's n arrivals (every thread of it), which then resets
// the counter for the next launch. The barrier orders the block's writes before thread 0's count,
// an acquire-release atomic: it publishes them and, in the last block, orders the reads of the
// other blocks' writes after it (CUTLASS's semaphore pattern; two separate fences took ~0.4 us more).
__device__ __forceinline__ bool last_arrival(int* counter, int n, int* flag /* shared */) {
    __syncthreads();
    if (threadIdx.x == 0) {
        int old;
        asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
        const bool last = old == n - 1;
        if (last) *counter = 0;  // the next launch starts after this one ends
        *flag = last;
    }
    __syncthreads();
    return *flag;
}

// out (B, T, H, D) fp16 rows of the kv head (b, h) = the splits' parts merged: part s of a row is
// its output normalised by its sum l_s, with its max m_s (log2 units), so out = sum_s W_s o_s /
// sum_s W_s, W_s = 2^(m_s - m) l_s. Each thread merges its 4 channels of a row online (rescaled
// when the max grows), the loads of 8 splits at a time in flight: one round trip to L2 per 8
// splits, not a max pass, a weight pass and a sum pass. __ldcg: other blocks wrote the parts.
template <int D, int DW>
__device__ __forceinline__ void merge_splits(const float* o_part, const float* ml_part, __half* out, int n,
                                             long long BHT, int b, int h, int g, int H, int T, int nrows) {
    constexpr int U = 8;
    for (int i = threadIdx.x; i < nrows * D / 4; i += DW * 32) {
        const int r = i / (D / 4), d = (i % (D / 4)) * 4;
        const long long row = part_row(b, h, g, H, T, r);
        const float4* src = reinterpret_cast<const float4*>(o_part + row * D + d);
        const float2* ml = reinterpret_cast<const float2*>(ml_part) + row;
        float m = -MINIKV_INF, l = 0.0f;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int s0 = 0; s0 < n; s0 += U) {
            float2 x[U];
            float4 o[U];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                if (s0 + j < n) {
                    x[j] = __ldcg(ml + (s0 + j) * BHT);
                    o[j] = __ldcg(src + (s0 + j) * BHT * (D / 4));
                } else {
                    x[j] = make_float2(-MINIKV_INF, 0.0f);
                    o[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
            }
#pragma unroll
            for (int j = 0; j < U; ++j) {
                if (x[j].x > m) {  // ex2(-inf) = 0: the first split's rescale clears nothing
                    const float f = ex2(m - x[j].x);
                    a.x *= f, a.y *= f, a.z *= f, a.w *= f, l *= f;
                    m = x[j].x;
                }
                const float w = x[j].x == -MINIKV_INF ? 0.0f : ex2(x[j].x - m) * x[j].y;  // empty splits weigh 0
                a.x += w * o[j].x, a.y += w * o[j].y, a.z += w * o[j].z, a.w += w * o[j].w, l += w;
            }
        }
        const float f = l > 0.0f ? 1.0f / l : 0.0f;
        const __half2 lo = __floats2half2_rn(a.x * f, a.y * f), hi = __floats2half2_rn(a.z * f, a.w * f);
        *reinterpret_cast<uint2*>(out + (((long long)b * T + r / g) * H + h * g + r % g) * D + d) = make_uint2(h2u(lo), h2u(hi));
    }
}

}  // namespace minikv
