// nqkv (normal-quantile codes, token-axis absmax blocks) in the decode attention kernel
// (decode.cu): its codes are not uniform, so they cannot be folded into the operands as kivi's
// are; each lane turns its codes into fp16 values, level[code] * absmax, through a per-block
// lookup table in shared memory, and the keys then go through the fp16 path (FStep's layout).
#pragma once
#include "decode_tiles.cuh"

namespace minikv {

// A lookup table maps one byte of codes to its levels as fp16: 2-bit codes -> 4 halves (8 bytes),
// 4-bit -> 2 halves (4 bytes). Each entry is stored once per lane slot (128 bytes an entry,
// NQ_TABLE = 32 KB a table), so that lane i always reads banks of its own: a warp's lookups,
// whatever the bytes, never conflict.

template <int BITS>
__device__ __forceinline__ int nq_lane_slot(int lane) { return BITS == 2 ? (lane & 15) * 8 : lane * 4; }

template <int BITS>
__device__ __forceinline__ uint32_t nq_pair(const float* levels, int e, int i) {  // halves i, i + 1 of entry e
    constexpr int M = (1 << BITS) - 1;
    const float a = levels[(e >> (BITS * i)) & M], b = levels[(e >> (BITS * (i + 1))) & M];
    return h2u(__floats2half2_rn(a, b));
}

// The table of `levels` (2^BITS floats) into lut, by the block's nt threads.
template <int BITS>
__device__ __forceinline__ void nq_table(unsigned char* lut, const float* levels, int tid, int nt) {
    static_assert(BITS == 2 || BITS == 4, "nqkv decode tables take 2- or 4-bit codes");
    for (int i = tid; i < NQ_TABLE / 16; i += nt) {  // 16 bytes each: 8 of them make entry i / 8
        const int e = i >> 3;
        uint4 w;
        if constexpr (BITS == 2) {
            const uint32_t lo = nq_pair<2>(levels, e, 0), hi = nq_pair<2>(levels, e, 2);
            w = make_uint4(lo, hi, lo, hi);
        } else {
            const uint32_t x = nq_pair<4>(levels, e, 0);
            w = make_uint4(x, x, x, x);
        }
        reinterpret_cast<uint4*>(lut)[i] = w;
    }
}

// NB bytes of a lane's run of codes -> its fp16 values times a2 (half2 (a, a)), channel order
// (word w: channels 2w, 2w + 1 of the run); lut: the table plus this lane's slot.
template <int BITS, int NB>
__device__ __forceinline__ void nq_values(uint32_t* out, const uint32_t* codes, const unsigned char* lut, uint32_t a2) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
        const uint32_t x = codes[i / 4];
        const int s = 8 * (i % 4);  // byte i -> entry offset byte * 128
        const uint32_t off = (s >= 7 ? x >> (s - 7) : x << (7 - s)) & 0x7f80u;
        if constexpr (BITS == 2) {
            const uint2 e = *reinterpret_cast<const uint2*>(lut + off);
            out[2 * i] = h2u(__hmul2(u2h(e.x), u2h(a2)));
            out[2 * i + 1] = h2u(__hmul2(u2h(e.y), u2h(a2)));
        } else {
            out[i] = h2u(__hmul2(u2h(*reinterpret_cast<const uint32_t*>(lut + off)), u2h(a2)));
        }
    }
}

// NG groups of 16 consecutive nqkv keys in FStep's lane layout: lane (g, c) scores keys 2g, 2g+1
// (channels [c D/4, (c+1) D/4), all in one absmax block) and multiplies keys 4c..4c+3 (channels
// [g D/8, (g+1) D/8)) of each group, with the absmax of the block holding its channels.
template <int D, int KB, int VB, int NG>
struct NQStep {
    static constexpr int KBY = D * KB / 32, VBY = D * VB / 64;  // bytes per key: scores lane, P.V lane
    Raw<KBY> k[NG][2];
    Raw<VBY> v[NG][4];
    uint32_t ka[NG], va[NG][2];  // half2: absmax of keys (2g, 2g+1); of keys (4c, 4c+1), (4c+2, 4c+3)

    // tok: storage slot of the step's first key; nb absmax blocks per key, this lane's K / V block
    __device__ __forceinline__ void load(long long tok, const uint8_t* kc, const uint8_t* vc, const __half* kap,
                                         const __half* vap, int nb, int kblk, int vblk) {
        const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
        const unsigned short* ka_ = reinterpret_cast<const unsigned short*>(kap);
        const unsigned short* va_ = reinterpret_cast<const unsigned short*>(vap);
#pragma unroll
        for (int q = 0; q < NG; ++q) {
            const long long t = tok + 16 * q;
#pragma unroll
            for (int j = 0; j < 2; ++j) k[q][j].load(kc + (t + 2 * g + j) * (D * KB / 8) + c * KBY);
#pragma unroll
            for (int j = 0; j < 4; ++j) v[q][j].load(vc + (t + 4 * c + j) * (D * VB / 8) + g * VBY);
            ka[q] = __ldcs(ka_ + (t + 2 * g) * nb + kblk) | ((uint32_t)__ldcs(ka_ + (t + 2 * g + 1) * nb + kblk) << 16);
#pragma unroll
            for (int j = 0; j < 2; ++j)
                va[q][j] = __ldcs(va_ + (t + 4 * c + 2 * j) * nb + vblk)
                           | ((uint32_t)__ldcs(va_ + (t + 4 * c + 2 * j + 1) * nb + vblk) << 16);
        }
    }
};

// half i of x in both halves
__device__ __forceinline__ uint32_t bcast_half(uint32_t x, int i) { return prmt(x, 0u, i ? 0x3232u : 0x1010u); }

// This warp's nqkv keys [qa, qz) (whole tiles) into acc: NG groups of 16 a step, loaded a step
// ahead (two named buffers: no register copies), turned into fp16 values through the tables at
// lut (K's, then V's if its codes have other bits), then scored and summed as fp16 keys.
// row0: storage slot of the sequence's first chunk token; ka, va: the absmax (slots, D / bs).
template <int D, int KB, int VB, int NG>
__device__ __forceinline__ void nq_chunks(Acc<D>& acc, const unsigned char* lut, const uint32_t* Qn, long long row0,
                                          int qa, int qz, const uint8_t* kc, const uint8_t* vc, const __half* ka,
                                          const __half* va, int bs, float sl2) {
    constexpr int NK = D / 16, STEP = 16 * NG;
    using NStep = NQStep<D, KB, VB, NG>;
    const int lane = threadIdx.x & 31, gq = lane >> 2, cq = lane & 3;
    const unsigned char* lut_k = lut + nq_lane_slot<KB>(lane);
    const unsigned char* lut_v = lut + (VB != KB ? NQ_TABLE : 0) + nq_lane_slot<VB>(lane);
    const int bsd = min(bs, D), nb = D / bsd;  // token-axis blocks never exceed head_dim
    const int kblk = cq * (D / 4) / bsd, vblk = gq * (D / 8) / bsd;  // the blocks of this lane's runs
    uint32_t bf[NK][2];
    q_fragments<D>(bf, Qn);
    const auto step = [&](const NStep& cur, NStep& nxt, int ct) {
        if (ct + STEP < qz) nxt.load(row0 + ct + STEP, kc, vc, ka, va, nb, kblk, vblk);
        float s[NG][4];
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
            Raw<D / 2> kv[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) nq_values<KB, NStep::KBY>(kv[j].w, cur.k[gi][j].w, lut_k, bcast_half(cur.ka[gi], j));
            s[gi][0] = s[gi][1] = s[gi][2] = s[gi][3] = 0.0f;
            dense_scores<D>(s[gi], kv, bf);
#pragma unroll
            for (int j = 0; j < 4; ++j) s[gi][j] *= sl2;
        }
        acc.template probs<false>(s);
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
            acc.l[0] += s[gi][0] + s[gi][2];
            acc.l[1] += s[gi][1] + s[gi][3];
            Raw<D / 4> vv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) nq_values<VB, NStep::VBY>(vv[j].w, cur.v[gi][j].w, lut_v, bcast_half(cur.va[gi][j / 2], j & 1));
            uint32_t vf[NK][4];
            v_fragments<D, 16, D / 8>(vf, vv[0].w, vv[2].w, vv[1].w, vv[3].w);
            acc.pv(s[gi], vf);
        }
    };
    NStep A, B;
    A.load(row0 + qa, kc, vc, ka, va, nb, kblk, vblk);
    for (int ct = qa; ct < qz; ct += 2 * STEP) {
        step(A, B, ct);
        if (ct + STEP < qz) step(B, A, ct + STEP);
    }
}

}  // namespace minikv
