// Tensor-core tile products for the attention kernel: mma.sync m16n8k16 (fp16 in, fp32
// accumulate) through inline PTX (NVRTC has no <mma.h>), operands loaded with ldmatrix.
#pragma once
#include "tiles.cuh"

namespace minikv {

// D (16x8, f32) += A (16x16, f16, row-major) B (16x8, f16, col-major). Thread lane holds, with
// g = lane / 4 and c = lane % 4: a = A[g][2c:2c+2], A[g+8][2c:], A[g][2c+8:], A[g+8][2c+8:];
// b = B[2c:2c+2][g], B[2c+8:2c+10][g]; d = D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1].
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 fp16 matrices from shared memory in one instruction: lane l gives the address of row
// l % 8 of matrix l / 8; r[j] is matrix j's fragment (lane holds row lane / 4, columns 2 (lane % 4)
// and +1; with .trans, the transpose's).
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const __half* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const __half* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// dst (ROWS x TILE, float, ld) = A (ROWS x D, fp16 rows) . B^T, B (TILE x D, fp16 rows): warps tile
// the rows by 16 and split the TILE columns. Fragments come in with ldmatrix: A's four 8x8
// pieces are (rows 0-7 | 8-15) x (cols 0-7 | 8-15); B's (keys 0-7 | 8-15 of two n-tiles) x (k 0-7 | 8-15).
template <int D, int ROWS>
__device__ __forceinline__ void mma_abt(const __half* A, const __half* Bm, float* dst, int ld) {
    constexpr int LDH = D + 8, WR = ROWS / 16, WC = 4 / WR, NK = TILE / WC;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, cq = lane & 3;
    const int wr = warp % WR, wc = warp / WR, li = lane & 7, sel = lane >> 3;
    float acc[NK / 8][4];
#pragma unroll
    for (int nt = 0; nt < NK / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t a[4];
        ldsm_x4(a, A + (wr * 16 + (sel & 1) * 8 + li) * LDH + k0 + (sel >> 1) * 8);
#pragma unroll
        for (int n2 = 0; n2 < NK / 16; ++n2) {
            uint32_t bq[4];
            ldsm_x4(bq, Bm + (wc * NK + n2 * 16 + (sel >> 1) * 8 + li) * LDH + k0 + (sel & 1) * 8);
            mma16816(acc[2 * n2], a, bq);
            mma16816(acc[2 * n2 + 1], a, bq + 2);
        }
    }
#pragma unroll
    for (int nt = 0; nt < NK / 8; ++nt) {
        float* s0 = dst + (wr * 16 + gq) * ld + wc * NK + nt * 8 + 2 * cq;
        s0[0] = acc[nt][0];
        s0[1] = acc[nt][1];
        s0[8 * ld] = acc[nt][2];
        s0[8 * ld + 1] = acc[nt][3];
    }
}

// o (this warp's 16 rows x D/WC channels, registers) += P (ROWS x TILE, fp16) . V (TILE x D, fp16
// rows). V is row-major [key][channel], so its fragments come in transposed (ldmatrix .trans).
template <int D, int ROWS>
__device__ __forceinline__ void mma_pv(float (*o)[4], const __half* Pm, const __half* Vm) {
    constexpr int LDH = D + 8, LDP = TILE + 8, WR = ROWS / 16, WC = 4 / WR, ND = D / WC;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp % WR, wc = warp / WR, li = lane & 7, sel = lane >> 3;
#pragma unroll
    for (int k0 = 0; k0 < TILE; k0 += 16) {
        uint32_t a[4];
        ldsm_x4(a, Pm + (wr * 16 + (sel & 1) * 8 + li) * LDP + k0 + (sel >> 1) * 8);
#pragma unroll
        for (int n2 = 0; n2 < ND / 16; ++n2) {
            uint32_t bq[4];
            ldsm_x4_trans(bq, Vm + (k0 + (sel & 1) * 8 + li) * LDH + wc * ND + n2 * 16 + (sel >> 1) * 8);
            mma16816(o[2 * n2], a, bq);
            mma16816(o[2 * n2 + 1], a, bq + 2);
        }
    }
}

}  // namespace minikv
