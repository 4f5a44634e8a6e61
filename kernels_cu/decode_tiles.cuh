// Per-lane pieces of the decode attention kernel (decode.cu): shared-memory layout, the warp's
// softmax/output state, and the builders of mma operand fragments (the step loaders are in
// decode_steps.cuh). Lane (g = lane/4, c = lane%4) holds keys 2g, 2g+1 x channels
// [c D/4, (c+1) D/4) for scores, keys 4c..4c+3 x channels [g D/8, (g+1) D/8) for P.V.
#pragma once
#include "frag.cuh"

namespace minikv {

constexpr int NR = 8;             // query rows per kv head (the mma's N)
constexpr float RESCALE = 8.0f;   // log2 growth of a row's max that forces a rescale
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

// Words per lane of the lanes' copies of q (lane g*4 + c: row g, channels [c D/4, (c+1) D/4)),
// D/8 padded by 4 so that a warp reading 16 bytes a lane hits every bank once per quarter.
template <int D>
constexpr int QW = D / 8 + 4;

template <int D>
constexpr int MO_LD = D + 4;  // floats per row of the warps' outputs in shared memory (padded: fewer bank conflicts)

// Bytes of one nqkv lookup table: 256 entries (a byte of codes) x 128 (decode_nq.cuh).
constexpr int NQ_TABLE = 256 * 128;

// DW warps per block: 4 (2 blocks per SM) or 8 (1 block per SM, half the blocks, so half the
// pattern-table reads and the splits to merge; patternkv's histograms then need ~125 KB).
template <int D, int DW>
struct DLayout {  // shared memory regions (bytes), 128-byte aligned; mirrored in cuda/attention.py
    __host__ __device__ static constexpr int al(int x) { return (x + 127) / 128 * 128; }
    static constexpr int LDM = MO_LD<D>;
    static constexpr int QN = 0;                                // (32, QW) half2: q by lane, channel order
    static constexpr int QH = QN + al(32 * QW<D> * 4);          // (32, QW) half2: q * scale * log2(e) * 2^-shift, pair order
    static constexpr int SC = QH + al(32 * QW<D> * 4);          // (DW, 2, 2, D) fp16: two chunks' K scales, mins
    static constexpr int MO = SC + al(DW * 4 * D * 2);          // (DW, NR, LDM) float: the warps' outputs
    // (3, DW, NR) float: the warps' max, sum, sum p m_V; (DW) histogram scales; (NR) merged sum p m_V / sum;
    // (1) int: this block merges the splits
    static constexpr int MS = MO + al(DW * NR * LDM * 4);
    static constexpr int QC = MS + al((3 * DW * NR + DW + NR + 1) * 4);  // patternkv: (mp, NR) q . C_K, log2-scaled
    __host__ __device__ static constexpr int HI(int mp) { return QC + al(NR * mp * 4); }   // patternkv: (DW, mp, NR) uint32 sums of p
    __host__ __device__ static constexpr int bytes(bool pat, int mp) { return pat ? HI(mp) + al(DW * mp * NR * 4) : QC; }
    static constexpr int NL = QC;  // nqkv: its lookup tables (decode_nq.cuh), K's then V's if other bits
    __host__ __device__ static constexpr int bytes_nq(int tables) { return NL + tables * NQ_TABLE; }
};

// The shift s of the V codes in channel block mb of v_fragments' output: the run's channel n = w E
// + j (code j of its half) sits in block n % (D/16), and D/16 is a multiple of the 8 / BITS codes
// of a byte, so every code of block mb sits at bit code_shift(mb) of its byte.
template <int BITS>
__host__ __device__ constexpr int v_shift(int mb) { return code_shift<BITS>(mb); }

// First channel of quantized-K pair hp in lane column c: pair (w, j) of the lane's run holds
// channels (w 2E + j, w 2E + E + j) of it (code_pairs), E = 16 / BITS.
template <int D, int BITS>
__device__ __forceinline__ int k_pair_lo(int c, int hp) {
    constexpr int E = 16 / BITS;
    return c * (D / 4) + (hp / E) * 2 * E + hp % E;
}

// One warp's running attention state: rows r0 = 2c, r1 = 2c + 1 of the kv head's 8.
// HIST (patternkv): the warp also sums p per (V pattern, row) into a shared-memory histogram of
// fixed-point integers (shared-memory float atomics are compare-and-swap loops; integer adds are
// native), folded into the output once per block (KVQUANT.md 3.5). Its max is then an integer
// allowed 1 of slack (every p <= 2), so a rescale is an exact shift of the integers.
template <int D, bool HIST = false>
struct Acc {
    static constexpr int NK = D / 16;
    static constexpr float SLACK = HIST ? 1.0f : RESCALE;
    float o[NK][4];  // O^T fragments: (r0, ch), (r1, ch), (r0, ch + D/16), (r1, ch + D/16), ch = g D/8 + mb
    float m[2], l[2], pm[2];  // max (log2 units, warp-uniform), sum of p, sum of p * m_V (lane parts)
    float vb[4];              // pv_codes: 1024 * sum of the P^T operands since the last unbias (rows r0, r1, r0, r1)
    uint32_t* hist = nullptr;  // HIST: this warp's (mp, NR) sums of p * hscale
    int hp = 0;                // HIST: patterns in it
    float hscale = 2097152.0f; // HIST: fixed-point scale, a power of two <= 2^21 (hist_add)
    float hbound;               // HIST: >= every row's sum of p (warp total), or inf (hist_guard)

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int i = 0; i < NK; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
        m[0] = m[1] = -MINIKV_INF;
        l[0] = l[1] = pm[0] = pm[1] = 0.0f;
        vb[0] = vb[1] = vb[2] = vb[3] = 0.0f;
        hbound = MINIKV_INF;
    }

    // s (N groups; lane: keys 2g, 2g+1 x rows r0, r1, log2-scaled scores less a row's offset
    // o0 / o1) -> probabilities, in place. MASKED: some scores may be -inf (else all are finite,
    // and the first call sets m). The offsets (a chunk's q . m_K) cost an add per row, not per key.
    template <bool MASKED, int N>
    __device__ __forceinline__ void probs(float (&s)[N][4], float o0 = 0.0f, float o1 = 0.0f) {
        float mx0 = -MINIKV_INF, mx1 = -MINIKV_INF;
#pragma unroll
        for (int q = 0; q < N; ++q) {
            mx0 = fmaxf(mx0, fmaxf(s[q][0], s[q][2]));
            mx1 = fmaxf(mx1, fmaxf(s[q][1], s[q][3]));
        }
        mx0 += o0, mx1 += o1;
        if (__any_sync(0xffffffffu, mx0 > m[0] + SLACK || mx1 > m[1] + SLACK)) {
#pragma unroll
            for (int x = 4; x < 32; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            float n0 = fmaxf(m[0], mx0), n1 = fmaxf(m[1], mx1);
            if constexpr (HIST) {  // integer maxima, moved only where the slack is exceeded
                n0 = mx0 > m[0] + SLACK ? ceilf(mx0) : m[0];
                n1 = mx1 > m[1] + SLACK ? ceilf(mx1) : m[1];
            }
            const float a0 = m[0] == -MINIKV_INF ? 0.0f : ex2(m[0] - n0);
            const float a1 = m[1] == -MINIKV_INF ? 0.0f : ex2(m[1] - n1);
#pragma unroll
            for (int i = 0; i < NK; ++i) {
                o[i][0] *= a0, o[i][2] *= a0;
                o[i][1] *= a1, o[i][3] *= a1;
            }
            l[0] *= a0, pm[0] *= a0, l[1] *= a1, pm[1] *= a1;
            vb[0] *= a0, vb[2] *= a0, vb[1] *= a1, vb[3] *= a1;
            if constexpr (HIST) {  // an empty row (max -inf) has an empty histogram
                shift_hist(m[0] == -MINIKV_INF ? 0 : (int)(n0 - m[0]), m[1] == -MINIKV_INF ? 0 : (int)(n1 - m[1]));
            }
            m[0] = n0, m[1] = n1;
        }
        const float b0 = m[0] - o0, b1 = m[1] - o1;
#pragma unroll
        for (int q = 0; q < N; ++q) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float e = ex2(s[q][j] - ((j & 1) ? b1 : b0));  // ex2(-inf) = 0, but -inf - -inf is NaN
                s[q][j] = MASKED && s[q][j] == -MINIKV_INF ? 0.0f : e;
            }
        }
    }

    // Entries of rows r0, r1 >>= k0, k1 (rounded): lane (g, c) takes patterns g, g + 8, ...;
    // the warp's earlier adds land first.
    __device__ __forceinline__ void shift_hist(int k0, int k1) {
        const int lane = threadIdx.x & 31;
        const auto sh = [](uint32_t v, int k) { return k >= 32 ? 0u : (v + ((1u << k) >> 1)) >> k; };
        __syncwarp();
        if (k0 | k1) {
            for (int a = lane >> 2; a < hp; a += 8) {
                uint2* e = reinterpret_cast<uint2*>(hist + a * NR + 2 * (lane & 3));
                uint2 v = *e;
                v.x = sh(v.x, k0), v.y = sh(v.y, k1);
                *e = v;
            }
        }
        __syncwarp();
    }

    // Before a chunk of at most n keys: an entry holds at most (its row's sum of p + n * 2^SLACK)
    // * hscale (+ rounding); halve the scale until that stays below 2^31. One key's rounding
    // error is 0.5 / hscale, so relative to the row's sum it stays near 2^-32 per key. The rows'
    // sums are reduced over the warp only when hbound, their bound grown by n 2^SLACK a chunk,
    // no longer clears the limit (rescales only shrink them): the same shifts, fewer shuffles.
    __device__ __forceinline__ void hist_guard(int n) {
        constexpr float LIMIT = 2147483648.0f;  // 2^31
        const float grow = n * 2.0f;            // 2 = 2^SLACK
        if ((hbound + grow) * hscale < LIMIT) {  // warp-uniform
            hbound += grow;
            return;
        }
        float s0 = l[0], s1 = l[1];
#pragma unroll
        for (int x = 4; x < 32; x <<= 1) {
            s0 += __shfl_xor_sync(0xffffffffu, s0, x);
            s1 += __shfl_xor_sync(0xffffffffu, s1, x);
        }
        float mx = fmaxf(s0, s1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float need = (mx + grow) * hscale;
        if (need >= LIMIT) {  // warp-uniform
            const int k = (int)ceilf(log2f(need / LIMIT)) + 1;
            shift_hist(k, k);
            hscale = ldexpf(hscale, -k);
        }
        hbound = mx + grow;
    }

    // Entries (e, e + 1) += round(p0 * hscale), round(p1 * hscale), masked by keep (all ones or
    // zero: no branch around the atomics); e: the entry's shared-memory address. p * hscale <= 2^22,
    // so p * hscale + 2^23 holds the integer in its low 23 bits.
    __device__ __forceinline__ void hist_add(uint32_t e, float p0, float p1, uint32_t keep) {
        const uint32_t v0 = __float_as_uint(fmaf(p0, hscale, 8388608.0f)) & 0x7fffffu & keep;
        const uint32_t v1 = __float_as_uint(fmaf(p1, hscale, 8388608.0f)) & 0x7fffffu & keep;
        asm volatile("red.shared.add.u32 [%0], %1;\n\tred.shared.add.u32 [%0+4], %2;" :: "r"(e), "r"(v0), "r"(v1) : "memory");
    }

    // O^T += V^T P^T for one group: p = (key 2g: r0, r1; key 2g+1: r0, r1) already times the V
    // scales; va[mb] = V^T's A fragments of channel block mb.
    // Returns P^T's operand fragments (fp16).
    __device__ __forceinline__ uint2 pv(const float* p, const uint32_t (&va)[NK][4]) {
        const uint32_t b[2] = {movtrans(h2u(__floats2half2_rn(p[0], p[1]))),
                               movtrans(h2u(__floats2half2_rn(p[2], p[3])))};
#pragma unroll
        for (int mb = 0; mb < NK; ++mb) mma16816(o[mb], va[mb], b);
        return make_uint2(b[0], b[1]);
    }

    // The same for biased V codes (v_fragments, code * 2^s + 1024): o accumulates in code units
    // (between scale_codes(true) and (false)) plus 1024 * sum(P^T), which one more mma against
    // 1024s sums exactly as the others saw it; unbias takes it off. Saves a fma per code pair.
    __device__ __forceinline__ void pv_codes(const float* p, const uint32_t (&va)[NK][4]) {
        const uint2 pb = pv(p, va);
        const uint32_t b[2] = {pb.x, pb.y};
        const uint32_t ones[4] = {0x64006400u, 0x64006400u, 0x64006400u, 0x64006400u};
        mma16816(vb, ones, b);
    }
    // o -= the bias summed so far. Called every chunk, so the bias never dwarfs the sums (fp32).
    __device__ __forceinline__ void unbias() {
#pragma unroll
        for (int mb = 0; mb < NK; ++mb) o[mb][0] -= vb[0], o[mb][1] -= vb[1], o[mb][2] -= vb[2], o[mb][3] -= vb[3];
        vb[0] = vb[1] = vb[2] = vb[3] = 0.0f;
    }
    // o *= 2^s per channel block (up: into the code units of pv_codes) or 2^-s (back); exact.
    template <int BITS>
    __device__ __forceinline__ void scale_codes(bool up) {
#pragma unroll
        for (int mb = 0; mb < NK; ++mb) {
            const float f = up ? (float)(1 << v_shift<BITS>(mb)) : 1.0f / (float)(1 << v_shift<BITS>(mb));
            o[mb][0] *= f, o[mb][1] *= f, o[mb][2] *= f, o[mb][3] *= f;
        }
    }
};

// N words (a multiple of 4) from shared memory, 16-byte aligned, in 16-byte loads.
template <int N>
__device__ __forceinline__ void load_words(uint32_t* w, const uint32_t* p) {
#pragma unroll
    for (int i = 0; i < N; i += 4) *reinterpret_cast<uint4*>(w + i) = *reinterpret_cast<const uint4*>(p + i);
}

// A chunk's score operands for lane (g, c): bk = the B fragments (quantized-K pair order) of row
// g's q times the chunk's K scales; returns the scores' offsets for rows r0 = 2c, r1 = 2c + 1.
// sm: the chunk's K scales then mins, (2, D) fp16 in shared memory; qh, qn: the lane's words of
// the pair-ordered q * scale * log2(e) * 2^-shift and of q (QW each).
// Keys arrive as code * 2^shift + 1024 (code_pair_biased): B = qh * s_K, one fp16 product per
// pair. The scores are then off by (q . m_K) * scale * log2(e) - 1024 * sum(B) (the rounded B);
// both sums are mmas whose 16 "keys" are all m_K, or all 1024, so the tensor cores sum the
// channels across the quad as the scores' mmas see them, and their results land in the lanes of
// the rows they belong to. Acc::probs adds them, off the scores' dependency chains.
template <int D, int KB>
__device__ __forceinline__ float2 chunk_operands(uint32_t (&bk)[D / 16][2], const __half* sm, const uint32_t* qh,
                                                 const uint32_t* qn, float sl2) {
    constexpr int NK = D / 16, E = 16 / KB;
    // the lane's run of channels [c D/4, (c+1) D/4) of the K scales and mins: pair hp = wb E + j
    // of the run is halves (j, E + j) of block wb of E words
    const uint32_t* s_ = reinterpret_cast<const uint32_t*>(sm) + (threadIdx.x & 3) * (D / 8);
    // in units of U words (U pairs, whole blocks): fewer registers live than the whole run (ptxas
    // otherwise spills some variants)
    constexpr int U = E > 4 ? E : 4;
#pragma unroll
    for (int u = 0; u < D / 8; u += U) {
        uint32_t x[U], y[U];
        load_words<U>(x, s_ + u);
        load_words<U>(y, qh + u);
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const int hp = u + i, j = i % E, wb = i / E;
            const uint32_t sp = h2u(__halves2half2(half_of(x + wb * E, j), half_of(x + wb * E, E + j)));
            bk[hp % NK][hp / NK] = h2u(__hmul2(u2h(y[i]), u2h(sp)));
        }
    }
    float qm[4] = {0.0f, 0.0f, 0.0f, 0.0f}, bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const uint32_t k1024[4] = {0x64006400u, 0x64006400u, 0x64006400u, 0x64006400u};
    uint32_t x[D / 8], y[D / 8];  // the lane's runs of the mins and of q
    load_words<D / 8>(x, s_ + D / 2);
    load_words<D / 8>(y, qn);
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {  // q_fragments' channel order: pair kk of the run, then NK + kk
        const uint32_t am[4] = {x[kk], x[kk], x[NK + kk], x[NK + kk]}, bq[2] = {y[kk], y[NK + kk]};
        mma16816(qm, am, bq);
        mma16816(bias, k1024, bk[kk]);
    }
    return make_float2(qm[0] * sl2 - bias[0], qm[1] * sl2 - bias[1]);
}

// V^T A fragments from key pairs (4c, 4c+2) and (4c+1, 4c+3): channel n of the lane's run
// goes to block n % (D/16), row half n / (D/16). Codes come biased, code * 2^s + 1024 with
// s = v_shift<BITS>(block) (Acc::pv_codes takes both off).
template <int D, int BITS, int NH>
__device__ __forceinline__ void v_fragments(uint32_t (&va)[D / 16][4], const uint32_t* a, const uint32_t* b,
                                            const uint32_t* c, const uint32_t* d) {
    constexpr int NK = D / 16;
#pragma unroll
    for (int i = 0; i < NH; ++i) {  // 16-bit halves of the lane's run
        const uint32_t x = halves(a, b, i), y = halves(c, d, i);
        if constexpr (BITS == 16) {
            va[i % NK][i / NK] = x;
            va[i % NK][2 + i / NK] = y;
        } else {
            constexpr int E = 16 / BITS;
            const uint32_t x8 = x >> 8, y8 = y >> 8;
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const int n = i * E + j;
                va[n % NK][n / NK] = code_pair_biased<BITS>(x, x8, j);
                va[n % NK][2 + n / NK] = code_pair_biased<BITS>(y, y8, j);
            }
        }
    }
}

// The lane's fragments of fp16 q rows (channel order) as the scores' B operand; qn: the lanes'
// words of q, (32, QW).
template <int D>
__device__ __forceinline__ void q_fragments(uint32_t (&bf)[D / 16][2], const uint32_t* qn) {
    constexpr int NK = D / 16;
    const uint32_t* w = qn + (threadIdx.x & 31) * QW<D>;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) bf[kk][0] = w[kk], bf[kk][1] = w[NK + kk];
}

// S^T (16 keys x 8 rows, accumulated into s) of a group of fp16 keys held as FStep::k.
template <int D>
__device__ __forceinline__ void dense_scores(float* s, const Raw<D / 2> (&k)[2], const uint32_t (&bf)[D / 16][2]) {
    constexpr int NK = D / 16;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        const uint32_t a[4] = {k[0].w[kk], k[1].w[kk], k[0].w[NK + kk], k[1].w[NK + kk]};
        mma16816(s, a, bf[kk]);
    }
}

}  // namespace minikv
