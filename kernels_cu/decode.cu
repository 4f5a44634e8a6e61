// Fused decode attention with register-resident tiles, for steps of at most 8 query rows per kv
// head (decode: GQA groups up to 8; a few tokens for smaller groups). attention.cu stages every
// key/value tile in shared memory as fp16, which for 2-bit codes moves 8x the cache's bytes
// through shared memory; here packed codes go from global memory straight into mma.sync
// operand registers (frag.cuh) and shared memory holds only the queries and small tables.
//
// The kv head's query rows are the mma's N (8), keys its M, so one warp computes, per group of
// 16 keys,  S^T (16 keys x 8 rows) = K (16 x D) . Q^T  and  O^T (D x 8) += V^T (D x 16) . P^T.
// S^T's accumulator fragment becomes P^T's operand fragment through two movmatrix transposes.
// The mma's k dimension may be permuted freely if both operands agree, so each lane reads a
// contiguous run of a key's codes: for scores, lane (g = lane/4, c = lane%4) holds keys 2g, 2g+1
// and channels [c D/4, (c+1) D/4) (q in shared memory is pre-permuted to match); for P.V, keys
// 4c..4c+3 (mma key index i is key 2i for i < 8, 2(i-8)+1 above) and channels [g D/8, (g+1) D/8).
//
// Uniform codes (kivi, patternkv) are folded as in attention.cu (KVQUANT.md 3.5): scores use
// q * s_K (per chunk, times the softmax scale) against raw codes, the accumulator starting at
// q . m_K (+ q . C_K[a] from a per-block table); P.V uses p * s_V against raw codes plus sum p m_V.
// PatternKV's V patterns add C_V[a_t] (where the V mask is set) through a second P.V product
// over pattern rows gathered per key (L1-cached): per-pattern probability sums would need
// scattered shared-memory float atomics, which the hardware runs as compare-and-swap loops.
//
// Each warp walks its own contiguous range of keys with its own softmax state (rescaled lazily:
// only when a row's max grows by more than 2^8), loading the next NG groups while computing the
// current (two register buffers, ping-pong); the block merges its warps; attend_reduce
// (attention.cu) merges the blocks.
#include "frag.cuh"

using namespace minikv;

constexpr int DW = 4;             // warps per block
constexpr int NR = 8;             // query rows per kv head (the mma's N)
constexpr float RESCALE = 8.0f;   // log2 growth of a row's max that forces a rescale
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

template <int D>
struct DLayout {  // shared memory regions (bytes), 128-byte aligned; mirrored in cuda/attention.py
    __host__ __device__ static constexpr int al(int x) { return (x + 127) / 128 * 128; }
    static constexpr int QF = 0;                                // (NR, D) fp16 q, channel order
    static constexpr int QQ = QF + al(NR * D * 2);              // (NR, 4, D/8) half2 q, quantized-K pair order
    static constexpr int SC = QQ + al(NR * D * 2);              // (DW, 2, 2, D) fp16: two chunks' K scales, mins
    static constexpr int MO = SC + al(DW * 4 * D * 2);          // (DW, NR, D) float: the warps' outputs
    static constexpr int MS = MO + al(DW * NR * D * 4);         // (DW, 4, NR) + (NR) float: max, sum, sum p m_V, factor
    static constexpr int QC = MS + al((DW * 4 + 1) * NR * 4);   // patternkv: (NR, mp) q . C_K, log2-scaled
    __host__ __device__ static constexpr int bytes(bool pat, int mp) { return pat ? QC + al(NR * mp * 4) : QC; }
};

// First channel of quantized-K pair hp in lane column c: pair (w, j) of the lane's run holds
// channels (w 2E + j, w 2E + E + j) of it (code_pairs), E = 16 / BITS.
template <int D, int BITS>
__device__ __forceinline__ int k_pair_lo(int c, int hp) {
    constexpr int E = 16 / BITS;
    return c * (D / 4) + (hp / E) * 2 * E + hp % E;
}

// One warp's running attention state: rows r0 = 2c, r1 = 2c + 1 of the kv head's 8.
template <int D>
struct Acc {
    static constexpr int NK = D / 16;
    float o[NK][4];  // O^T fragments: (r0, ch), (r1, ch), (r0, ch + D/16), (r1, ch + D/16), ch = g D/8 + mb
    float m[2], l[2], pm[2];  // max (log2 units, warp-uniform), sum of p, sum of p * m_V (lane parts)

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int i = 0; i < NK; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
        m[0] = m[1] = -MINIKV_INF;
        l[0] = l[1] = pm[0] = pm[1] = 0.0f;
    }

    // s (N groups; lane: keys 2g, 2g+1 x rows r0, r1, log2-scaled scores) -> probabilities, in
    // place. MASKED: some scores may be -inf (else all are finite, and the first call sets m).
    template <bool MASKED, int N>
    __device__ __forceinline__ void probs(float (&s)[N][4]) {
        float mx0 = -MINIKV_INF, mx1 = -MINIKV_INF;
#pragma unroll
        for (int q = 0; q < N; ++q) {
            mx0 = fmaxf(mx0, fmaxf(s[q][0], s[q][2]));
            mx1 = fmaxf(mx1, fmaxf(s[q][1], s[q][3]));
        }
        if (__any_sync(0xffffffffu, mx0 > m[0] + RESCALE || mx1 > m[1] + RESCALE)) {
#pragma unroll
            for (int x = 4; x < 32; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            const float n0 = fmaxf(m[0], mx0), n1 = fmaxf(m[1], mx1);
            const float a0 = m[0] == -MINIKV_INF ? 0.0f : ex2(m[0] - n0);
            const float a1 = m[1] == -MINIKV_INF ? 0.0f : ex2(m[1] - n1);
#pragma unroll
            for (int i = 0; i < NK; ++i) {
                o[i][0] *= a0, o[i][2] *= a0;
                o[i][1] *= a1, o[i][3] *= a1;
            }
            l[0] *= a0, pm[0] *= a0, l[1] *= a1, pm[1] *= a1;
            m[0] = n0, m[1] = n1;
        }
#pragma unroll
        for (int q = 0; q < N; ++q) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float e = ex2(s[q][j] - m[j & 1]);  // ex2(-inf) = 0, but -inf - -inf is NaN
                s[q][j] = MASKED && s[q][j] == -MINIKV_INF ? 0.0f : e;
            }
        }
    }

    // O^T += V^T P^T for one group: p = (key 2g: r0, r1; key 2g+1: r0, r1) already times the V
    // scales; va[mb] = V^T's A fragments of channel block mb.
    __device__ __forceinline__ void pv(const float* p, const uint32_t (&va)[NK][4]) {
        const uint32_t b[2] = {movtrans(h2u(__floats2half2_rn(p[0], p[1]))),
                               movtrans(h2u(__floats2half2_rn(p[2], p[3])))};
#pragma unroll
        for (int mb = 0; mb < NK; ++mb) mma16816(o[mb], va[mb], b);
    }
};

// NG groups of 16 quantized keys, as this lane loads them (a step ahead of their use).
template <int D, int KB, int VB, bool PAT, int NG>
struct QStep {
    static constexpr int KBY = D * KB / 32, VBY = D * VB / 64;  // bytes per key: scores lane, P.V lane
    Raw<KBY> k[NG][2];  // keys 2g, 2g+1; channels [c D/4, (c+1) D/4)
    Raw<VBY> v[NG][4];  // keys 4c..4c+3; channels [g D/8, (g+1) D/8)
    uint32_t vs[NG], vm[NG];  // half2: V scale and min of keys 2g, 2g+1
    uint32_t kx[NG];           // patternkv: K patterns of keys 2g, 2g+1 (a byte each)
    uint32_t vx[NG], mk[NG];   // patternkv: V patterns of keys 4c..4c+3 (a byte each), their V mask bits

    // tok: storage slot of the first key; bit: its index in the sequence's mask row
    __device__ __forceinline__ void load(long long tok, int bit, const uint8_t* kc, const uint8_t* vc,
                                         const __half* vsp, const __half* vmp, const uint8_t* kidx,
                                         const uint8_t* vidx, const uint8_t* mask_row) {
        const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int q = 0; q < NG; ++q) {
            const long long t = tok + 16 * q;
            k[q][0].load(kc + (t + 2 * g) * (D * KB / 8) + c * KBY);
            k[q][1].load(kc + (t + 2 * g + 1) * (D * KB / 8) + c * KBY);
#pragma unroll
            for (int j = 0; j < 4; ++j) v[q][j].load(vc + (t + 4 * c + j) * (D * VB / 8) + g * VBY);
            vs[q] = __ldcs(reinterpret_cast<const unsigned int*>(vsp + t + 2 * g));
            vm[q] = __ldcs(reinterpret_cast<const unsigned int*>(vmp + t + 2 * g));
            if constexpr (PAT) {
                kx[q] = *reinterpret_cast<const uint16_t*>(kidx + t + 2 * g);
                vx[q] = *reinterpret_cast<const uint32_t*>(vidx + t + 4 * c);
                const int bq = bit + 16 * q + 4 * c;  // a multiple of 4: the 4 bits share a byte
                mk[q] = (mask_row[bq >> 3] >> (bq & 7)) & 0xfu;
            }
        }
    }
};

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

// V^T A fragments from key pairs (4c, 4c+2) and (4c+1, 4c+3): channel n of the lane's run
// goes to block n % (D/16), row half n / (D/16).
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
                va[n % NK][n / NK] = code_pair<BITS>(x, x8, j);
                va[n % NK][2 + n / NK] = code_pair<BITS>(y, y8, j);
            }
        }
    }
}

// The lane's fragments of fp16 q rows (channel order) as the scores' B operand.
template <int D>
__device__ __forceinline__ void q_fragments(uint32_t (&bf)[D / 16][2], const __half* Qf) {
    constexpr int NK = D / 16;
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(Qf) + g * (D / 2) + c * (D / 8);
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

template <int D, int METHOD, int KB, int VB, int NG>
__global__ void __launch_bounds__(DW * 32) attend_decode(MINIKV_ATTEND_PARAMS) {
    using L = DLayout<D>;
    constexpr bool QUANT = METHOD != DENSE, PAT = METHOD == PATTERN;
    constexpr int NK = D / 16, NT = DW * 32;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* Qf = reinterpret_cast<__half*>(smem + L::QF);
    uint32_t* Qq = reinterpret_cast<uint32_t*>(smem + L::QQ);
    __half* sc = reinterpret_cast<__half*>(smem + L::SC);
    float* mo = reinterpret_cast<float*>(smem + L::MO);
    float* ms = reinterpret_cast<float*>(smem + L::MS);
    float* qc = reinterpret_cast<float*>(smem + L::QC);

    const int b = blockIdx.z, h = blockIdx.y, B = gridDim.z, g = H / Hkv, nrows = g * T;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, cq = lane & 3;
    const int r0 = 2 * cq, r1 = 2 * cq + 1;
    const Row info = reinterpret_cast<const Row*>(rowinfo)[b];
    const long long bh = (long long)b * Hkv + h;
    const float sl2 = scale * LOG2E;  // scores in log2 units: softmax by ex2

    for (int i = tid; i < NR * D; i += NT) {
        const int r = i / D, d = i % D;
        __half v = __float2half(0.0f);
        if (r < nrows) v = q[b * q_sb + (long long)(h * g + r % g) * q_sh + (long long)(r / g) * q_st + d];
        Qf[i] = v;
    }
    __syncthreads();
    if constexpr (QUANT) {
        for (int i = tid; i < NR * D / 2; i += NT) {
            const int r = i / (D / 2), c = (i / (D / 8)) % 4, lo = k_pair_lo<D, KB>(c, i % (D / 8));
            Qq[i] = h2u(__halves2half2(Qf[r * D + lo], Qf[r * D + lo + 16 / KB]));
        }
    }
    if constexpr (PAT) {  // q . C_K for every K pattern (log2-scaled), 16 patterns per warp at a time
        uint32_t bf[NK][2];
        q_fragments<D>(bf, Qf);
        const __half* pat = kpat + bh * mmax * D;
        for (int p0 = warp * 16; p0 < info.patterns; p0 += DW * 16) {
            FStep<D> f;
            f.load(pat, pat, D, p0, info.patterns);
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            dense_scores<D>(s, f.k, bf);
            qc[r0 * mp + p0 + 2 * gq] = s[0] * sl2;
            qc[r1 * mp + p0 + 2 * gq] = s[1] * sl2;
            qc[r0 * mp + p0 + 2 * gq + 1] = s[2] * sl2;
            qc[r1 * mp + p0 + 2 * gq + 1] = s[3] * sl2;
        }
    }
    __syncthreads();

    // The block's share of the key tiles (64 keys each, as attention.cu), then this warp's.
    const int step_seen = min(info.step, T);
    const int t_sink = (info.sinks + TILE - 1) / TILE, t_chunk = info.chunks * (G / TILE);
    const int t_win = (info.window + TILE - 1) / TILE, t_step = (step_seen + TILE - 1) / TILE;
    const int total = t_sink + t_chunk + t_win + t_step;
    const int per = (total + gridDim.x - 1) / gridDim.x;
    const int lo = min(total, (int)blockIdx.x * per), hi = min(total, lo + per);
    const int pw = (hi - lo + DW - 1) / DW;
    const int wlo = min(hi, lo + warp * pw), whi = min(hi, wlo + pw);

    Acc<D> acc;
    acc.init();

    // fp16 keys [k_lo, k_hi) of a segment of n keys (rows `stride` halves apart); step keys
    // (causal) are visible to a row up to its own position.
    const auto dense = [&](const __half* kp, const __half* vp, long long stride, int n, int k_lo, int k_hi,
                           bool causal) {
        uint32_t bf[NK][2];
        q_fragments<D>(bf, Qf);
        const int t0 = min(r0 / g, info.step - 1), t1 = min(r1 / g, info.step - 1);
        FStep<D> cur, nxt;
        cur.load(kp, vp, stride, k_lo, n);
        for (int key0 = k_lo; key0 < k_hi; key0 += 16) {
            if (METHOD == DENSE && key0 + 16 < k_hi) nxt.load(kp, vp, stride, key0 + 16, n);
            float s[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
            dense_scores<D>(s[0], cur.k, bf);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int key = key0 + 2 * gq + j / 2, t = (j & 1) ? t1 : t0;
                const bool ok = key < n && (!causal || key <= t);
                s[0][j] = ok ? s[0][j] * sl2 : -MINIKV_INF;
            }
            acc.template probs<true>(s);
            acc.l[0] += s[0][0] + s[0][2];
            acc.l[1] += s[0][1] + s[0][3];
            uint32_t va[NK][4];
            v_fragments<D, 16, D / 8>(va, cur.v[0].w, cur.v[2].w, cur.v[1].w, cur.v[3].w);
            acc.pv(s[0], va);
            if (METHOD == DENSE) cur = nxt;
            else if (key0 + 16 < k_hi) cur.load(kp, vp, stride, key0 + 16, n);
        }
    };

    const auto clip = [](int x, int lo_, int hi_) { return max(lo_, min(x, hi_)); };
    {  // sinks
        const int a = clip(wlo, 0, t_sink), z = clip(whi, 0, t_sink);
        if (a < z) {
            const long long off = bh * sink_cap * D;
            dense(sink_k + off, sink_v + off, D, info.sinks, a * TILE, min(z * TILE, info.sinks), false);
        }
    }
    if constexpr (QUANT) {  // quantized chunks, NG groups of 16 keys per step
        const int a = clip(wlo - t_sink, 0, t_chunk) * TILE, z = clip(whi - t_sink, 0, t_chunk) * TILE;
        if (a < z) {
            constexpr int STEP = 16 * NG;
            const long long row0 = bh * n_chunks_cap * G;  // storage slot of the sequence's first chunk token
            const uint8_t* mask_row = vmask + row0 / 8;
            const __half* vpat_bh = vpat + bh * mmax * D + gq * (D / 8);
            const auto fetch_scales = [&](int ci) {  // chunk ci's K scales and mins -> this warp's buffer ci & 1
                constexpr int PER = D * 2 / 16;
                if (lane < 2 * PER) {
                    const int which = lane / PER, piece = lane % PER;
                    const __half* src = (which ? km : ks) + (bh * n_chunks_cap + ci) * D + piece * 8;
                    cp_async16(sc + ((warp * 2 + (ci & 1)) * 2 + which) * D + piece * 8, src);
                }
                cp_async_commit();
            };
            uint32_t bk[NK][2];    // q * s_K * scale * log2(e), as the scores' B fragments
            float qm0 = 0.0f, qm1 = 0.0f;  // (q . m_K) * scale * log2(e), rows r0, r1
            int chunk = -1;
            const auto enter_chunk = [&](int ci, bool fetched) {
                if (fetched) cp_async_wait<1>();  // the next chunk's fetch may still be in flight
                else cp_async_wait<0>();
                __syncwarp();
                const __half* s_ = sc + (warp * 2 + (ci & 1)) * 2 * D;
                const __half* m_ = s_ + D;
                float qm = 0.0f;
#pragma unroll
                for (int hp = 0; hp < D / 8; ++hp) {
                    const int c0 = k_pair_lo<D, KB>(cq, hp), c1 = c0 + 16 / KB;
                    const float2 qf = __half22float2(u2h(Qq[(gq * 4 + cq) * (D / 8) + hp]));
                    bk[hp % NK][hp / NK] = h2u(__floats2half2_rn(qf.x * __half2float(s_[c0]) * sl2,
                                                                 qf.y * __half2float(s_[c1]) * sl2));
                    qm += qf.x * __half2float(m_[c0]) + qf.y * __half2float(m_[c1]);
                }
                __syncwarp();  // the buffer is refilled two chunks later
                qm += __shfl_xor_sync(0xffffffffu, qm, 1);
                qm += __shfl_xor_sync(0xffffffffu, qm, 2);
                qm0 = __shfl_sync(0xffffffffu, qm, 8 * cq) * sl2;  // row r lives in lanes 4r..4r+3
                qm1 = __shfl_sync(0xffffffffu, qm, 8 * cq + 4) * sl2;
                chunk = ci;
            };
            using Step = QStep<D, KB, VB, PAT, NG>;
            const auto process = [&](const Step& cur) {
                float s[NG][4];
#pragma unroll
                for (int gi = 0; gi < NG; ++gi) {
                    uint32_t k0[D / 8], k1[D / 8];
                    code_pairs<KB, (D * KB / 32 + 3) / 4>(cur.k[gi][0].w, k0);
                    code_pairs<KB, (D * KB / 32 + 3) / 4>(cur.k[gi][1].w, k1);
                    s[gi][0] = s[gi][2] = qm0;  // the accumulators start at the affine part
                    s[gi][1] = s[gi][3] = qm1;
                    if constexpr (PAT) {
                        const int p0 = cur.kx[gi] & 0xff, p1 = cur.kx[gi] >> 8;
                        s[gi][0] += qc[r0 * mp + p0], s[gi][1] += qc[r1 * mp + p0];
                        s[gi][2] += qc[r0 * mp + p1], s[gi][3] += qc[r1 * mp + p1];
                    }
#pragma unroll
                    for (int kk = 0; kk < NK; ++kk) {
                        const uint32_t af[4] = {k0[kk], k1[kk], k0[NK + kk], k1[NK + kk]};
                        mma16816(s[gi], af, bk[kk]);
                    }
                }
                acc.template probs<false>(s);
#pragma unroll
                for (int gi = 0; gi < NG; ++gi) {
                    const float2 sv = __half22float2(u2h(cur.vs[gi])), mv = __half22float2(u2h(cur.vm[gi]));
                    const float* p = s[gi];
                    acc.l[0] += p[0] + p[2];
                    acc.l[1] += p[1] + p[3];
                    acc.pm[0] += p[0] * mv.x + p[2] * mv.y;
                    acc.pm[1] += p[1] * mv.x + p[3] * mv.y;
                    const float pv[4] = {p[0] * sv.x, p[1] * sv.x, p[2] * sv.y, p[3] * sv.y};
                    uint32_t va[NK][4];
                    v_fragments<D, VB, D * VB / 128>(va, cur.v[gi][0].w, cur.v[gi][2].w, cur.v[gi][1].w,
                                                     cur.v[gi][3].w);
                    acc.pv(pv, va);
                    if constexpr (PAT) {  // + p C_V[a] for the keys whose V mask is set
                        Raw<D / 4> cv[4];
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            if ((cur.mk[gi] >> j) & 1u) cv[j].load_cached(vpat_bh + ((cur.vx[gi] >> (8 * j)) & 0xffu) * D);
                            else cv[j].zero();
                        }
                        v_fragments<D, 16, D / 8>(va, cv[0].w, cv[2].w, cv[1].w, cv[3].w);
                        acc.pv(p, va);
                    }
                }
            };
            // one step: prefetch the next into `nxt` (and its chunk's scales), then compute `cur`
            const auto step = [&](const Step& cur, Step& nxt, int ct) {
                const int ci = ct / G;
                bool fetched = false;
                if (ct + STEP < z) {
                    nxt.load(row0 + ct + STEP, ct + STEP, kc, vc, vs, vm, kidx, vidx, mask_row);
                    if ((ct + STEP) / G != ci) {
                        fetch_scales(ci + 1);
                        fetched = true;
                    }
                }
                if (ci != chunk) enter_chunk(ci, fetched);
                process(cur);
            };
            Step A, Bs;
            A.load(row0 + a, a, kc, vc, vs, vm, kidx, vidx, mask_row);
            fetch_scales(a / G);
            for (int ct = a; ct < z; ct += 2 * STEP) {  // two named buffers: no register copies
                step(A, Bs, ct);
                if (ct + STEP < z) step(Bs, A, ct + STEP);
            }
        }
    }
    {  // window
        const int base = t_sink + t_chunk, a = clip(wlo - base, 0, t_win), z = clip(whi - base, 0, t_win);
        if (a < z) {
            const long long off = bh * win_cap * D;
            dense(win_k + off, win_v + off, D, info.window, a * TILE, min(z * TILE, info.window), false);
        }
    }
    {  // this step's keys
        const int base = t_sink + t_chunk + t_win, a = clip(wlo - base, 0, t_step), z = clip(whi - base, 0, t_step);
        if (a < z) {
            const long long off = b * s_sb + h * s_sh + (long long)info.step_off * s_st;
            dense(step_k + off, step_v + off, s_st, step_seen, a * TILE, min(z * TILE, step_seen), true);
        }
    }

    // Merge the block's warps: factors 2^(m_w - m) per row, then the outputs.
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            acc.l[i] += __shfl_xor_sync(0xffffffffu, acc.l[i], x);
            acc.pm[i] += __shfl_xor_sync(0xffffffffu, acc.pm[i], x);
        }
    }
    float* mo_w = mo + warp * NR * D;
#pragma unroll
    for (int mb = 0; mb < NK; ++mb) {
        const int c0 = gq * (D / 8) + mb, c1 = c0 + NK;
        mo_w[r0 * D + c0] = acc.o[mb][0];
        mo_w[r1 * D + c0] = acc.o[mb][1];
        mo_w[r0 * D + c1] = acc.o[mb][2];
        mo_w[r1 * D + c1] = acc.o[mb][3];
    }
    if (gq == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            ms[(warp * 4 + 0) * NR + r0 + i] = acc.m[i];
            ms[(warp * 4 + 1) * NR + r0 + i] = acc.l[i];
            ms[(warp * 4 + 2) * NR + r0 + i] = acc.pm[i];
        }
    }
    __syncthreads();
    float* row_max = ms + DW * 4 * NR;
    if (tid < NR) {
        float mx = -MINIKV_INF;
        for (int w = 0; w < DW; ++w) mx = fmaxf(mx, ms[(w * 4) * NR + tid]);
        for (int w = 0; w < DW; ++w) {
            const float mw = ms[(w * 4) * NR + tid];
            ms[(w * 4 + 3) * NR + tid] = mw == -MINIKV_INF ? 0.0f : ex2(mw - mx);
        }
        row_max[tid] = mx;
    }
    __syncthreads();
    const long long BHT = (long long)B * H * T;
    for (int i = tid; i < nrows * D; i += NT) {
        const int r = i / D, d = i % D;
        float o = 0.0f, l = 0.0f, pm = 0.0f;
        for (int w = 0; w < DW; ++w) {
            const float f = ms[(w * 4 + 3) * NR + r];
            o += f * mo[(w * NR + r) * D + d];
            l += f * ms[(w * 4 + 1) * NR + r];
            pm += f * ms[(w * 4 + 2) * NR + r];
        }
        const long long row = ((long long)b * H + h * g + r % g) * T + r / g;
        o_part[(blockIdx.x * BHT + row) * D + d] = o + pm;
        if (d == 0) {  // attend_reduce merges in natural-log units
            ml_part[(blockIdx.x * BHT + row) * 2] = row_max[r] * LN2;
            ml_part[(blockIdx.x * BHT + row) * 2 + 1] = l;
        }
    }
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrappers can ask for
#define DINST(D, M, KB, VB, NG) \
    void* dinst_##D##_##M##_##KB##_##VB##_##NG = (void*)&attend_decode<D, M, KB, VB, NG>;
#define DINST_D(M, KB, VB) DINST(64, M, KB, VB, 2) DINST(128, M, KB, VB, 2) DINST(64, M, KB, VB, 4) DINST(128, M, KB, VB, 4)
DINST_D(DENSE, 16, 16)
DINST_D(KIVI, 2, 2) DINST_D(KIVI, 4, 4) DINST_D(KIVI, 8, 8) DINST_D(KIVI, 2, 4) DINST_D(KIVI, 4, 2)
DINST_D(PATTERN, 2, 2) DINST_D(PATTERN, 4, 4) DINST_D(PATTERN, 2, 4)
#endif
