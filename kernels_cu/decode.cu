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
// Quantized keys are dealt over a whole step of NG groups instead (QStep), so that a lane's
// per-key scales and pattern indices are one contiguous run, one vector load each.
//
// Uniform codes (kivi, patternkv) are folded as in attention.cu (KVQUANT.md 3.5): scores use
// q * s_K (per chunk, times the softmax scale) against biased codes (code * 2^s + 1024), the
// accumulators starting at patternkv's q . C_K[a] (a per-block table); the chunk's q . m_K, less
// the codes' bias, is a row's offset that the softmax adds (chunk_operands). P.V uses p * s_V
// against the biased codes (Acc::pv_codes) plus sum p m_V.
// PatternKV's V patterns add sum_t p_t C_V[a_t] (where the V mask is set) as sum_a H[a] C_V[a]:
// each warp sums p per (pattern, row) into a fixed-point histogram with native shared-memory
// integer atomics (float ones are compare-and-swap loops); at the end the block adds H C_V with
// one mma per 16 patterns, H merged from the warps' histograms (decode_patterns.cuh). Gathering
// pattern rows per key instead costs ~110 instructions and ~80 registers per 16 keys, and 64 KB of
// rows per kv head at 256 patterns does not stay in L1.
//
// nqkv's codes (normal-quantile levels, absmax per token block) are not uniform: a lane turns
// them into fp16 values through lookup tables in shared memory, and scores them as fp16 keys
// (decode_nq.cuh).
//
// Each warp walks its own contiguous range of keys with its own softmax state (rescaled lazily:
// only when a row's max grows by more than 2^8), loading the next NG groups while computing the
// current (two register buffers, ping-pong); the block merges its warps, and the last block of
// a kv head to finish merges the blocks (decode_merge.cuh).
#include "decode_merge.cuh"
#include "decode_nq.cuh"
#include "decode_patterns.cuh"
#include "decode_steps.cuh"

using namespace minikv;

// DW: warps per block, 4 or 8; the registers must allow 8 warps per SM (ptxas otherwise takes
// up to 255 per thread, which a block of 8 warps already reaches).
// out (B, T, H, D) fp16; counters (B * Hkv) zeros, one per kv head: its blocks count themselves
// there, and the last one merges the splits' parts (o_part, ml_part) into out.
template <int D, int METHOD, int KB, int VB, int NG, int DW>
__global__ void __launch_bounds__(DW * 32, 8 / DW) attend_decode(MINIKV_ATTEND_PARAMS, __half* __restrict__ out,
                                                               int* __restrict__ counters) {
    using L = DLayout<D, DW>;
    constexpr bool QUANT = METHOD != DENSE, PAT = METHOD == PATTERN, NQ = METHOD == NQKV_TOKEN;
    constexpr int NK = D / 16, NT = DW * 32, LDM = L::LDM;
    extern __shared__ __align__(128) unsigned char smem[];
    uint32_t* Qn = reinterpret_cast<uint32_t*>(smem + L::QN);
    uint32_t* Qh = reinterpret_cast<uint32_t*>(smem + L::QH);
    __half* sc = reinterpret_cast<__half*>(smem + L::SC);
    float* mo = reinterpret_cast<float*>(smem + L::MO);
    float* ms = reinterpret_cast<float*>(smem + L::MS);
    float* qc = reinterpret_cast<float*>(smem + L::QC);
    uint32_t* hist = reinterpret_cast<uint32_t*>(smem + L::HI(mp));  // patternkv: (DW, mp, NR)

    const int b = blockIdx.z, h = blockIdx.y, B = gridDim.z, g = H / Hkv, nrows = g * T;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, cq = lane & 3;
    const int r0 = 2 * cq, r1 = 2 * cq + 1;
    const long long bh = (long long)b * Hkv + h;
    const float sl2 = scale * LOG2E;  // scores in log2 units: softmax by ex2

    // Loads that wait on nothing are issued first: at batch 1 a block's keys take about as long
    // as a few chains of dependent loads, so the prologue's latencies must overlap.
    uint4 qv = make_uint4(0u, 0u, 0u, 0u);  // 8 halves of q (row i / (D/8)), the tile's only q load
    const int qi = tid < NR * D / 8 ? tid : 0, qr = qi / (D / 8);
    if (tid < NR * D / 8 && qr < nrows)
        qv = *reinterpret_cast<const uint4*>(q + b * q_sb + (long long)(h * g + qr % g) * q_sh + (long long)(qr / g) * q_st + (qi % (D / 8)) * 8);
    const Row info = reinterpret_cast<const Row*>(rowinfo)[b];

    // The block's share of the key tiles (64 keys each, as attention.cu), then this warp's.
    const int step_seen = min(info.step, T);
    const int t_sink = (info.sinks + TILE - 1) / TILE, t_chunk = info.chunks * (G / TILE);
    const int t_win = (info.window + TILE - 1) / TILE, t_step = (step_seen + TILE - 1) / TILE;
    const int total = t_sink + t_chunk + t_win + t_step;
    const int per = (total + gridDim.x - 1) / gridDim.x;
    const int lo = min(total, (int)blockIdx.x * per), hi = min(total, lo + per);
    const int pw = (hi - lo + DW - 1) / DW;
    const int wlo = min(hi, lo + warp * pw), whi = min(hi, wlo + pw);
    const auto clip = [](int x, int lo_, int hi_) { return max(lo_, min(x, hi_)); };
    // this warp's quantized keys [qa, qz), NG groups of 16 per step, chunk ci's keys ending at c_end
    const int qa = clip(wlo - t_sink, 0, t_chunk) * TILE, qz = QUANT ? clip(whi - t_sink, 0, t_chunk) * TILE : 0;
    constexpr int STEP = 16 * NG;
    const long long row0 = bh * n_chunks_cap * G;  // storage slot of the sequence's first chunk token
    const uint8_t* mask_row = vmask + row0 / 8;
    const auto fetch_scales = [&](int ci) {  // chunk ci's K scales and mins -> this warp's buffer ci & 1
        constexpr int PER = D * 2 / 16;
        if (lane < 2 * PER) {
            const int which = lane / PER, piece = lane % PER;
            const __half* src = (which ? km : ks) + (bh * n_chunks_cap + ci) * D + piece * 8;
            cp_async16(sc + ((warp * 2 + (ci & 1)) * 2 + which) * D + piece * 8, src);
        }
        cp_async_commit();
    };
    // this warp's keys of the fp16 segments: sinks, window, this step's
    const int wbase = t_sink + t_chunk, sbase = wbase + t_win;
    const int sk_a = clip(wlo, 0, t_sink) * TILE, sk_z = min(clip(whi, 0, t_sink) * TILE, info.sinks);
    const int wk_a = clip(wlo - wbase, 0, t_win) * TILE, wk_z = min(clip(whi - wbase, 0, t_win) * TILE, info.window);
    const int st_a = clip(wlo - sbase, 0, t_step) * TILE, st_z = min(clip(whi - sbase, 0, t_step) * TILE, step_seen);
    const long long sink_off = bh * sink_cap * D, win_off = bh * win_cap * D;
    const long long step_off = b * s_sb + h * s_sh + (long long)info.step_off * s_st;
    if constexpr (QUANT) {  // into L2 now: a warp reads these a group of 16 keys at a time, after its chunks
        prefetch_rows_l2<D>(sink_k + sink_off, D, sk_a, sk_z), prefetch_rows_l2<D>(sink_v + sink_off, D, sk_a, sk_z);
        prefetch_rows_l2<D>(win_k + win_off, D, wk_a, wk_z), prefetch_rows_l2<D>(win_v + win_off, D, wk_a, wk_z);
        prefetch_rows_l2<D>(step_k + step_off, s_st, st_a, st_z), prefetch_rows_l2<D>(step_v + step_off, s_st, st_a, st_z);
    }
    using Step = QStep<D, KB, VB, PAT, NG>;
    constexpr int KL = Step::KL, VL = Step::VL;  // code bits as held in registers (3-bit codes as 4)
    // the warp's first step, whose loads wait for the prologue (patternkv: no gain measured; its K
    // pattern rows are read from L2 then)
    if constexpr (METHOD == KIVI) if (qa < qz) Step::prefetch_l2(row0 + qa, kc, vc, vs, vm);
    Step A, Bs;
    int ci = qa / G, c_end = (ci + 1) * G;
    KPatterns<D, DW> kpats;
    if constexpr (PAT) kpats.load(kpat + bh * mmax * D, info.patterns);

    if (tid < NR * D / 8) {  // words [4 p, 4 p + 4) of row qr: all in one lane's run (D/8 words)
        const int x = (qi % (D / 8)) * 4;
        *reinterpret_cast<uint4*>(Qn + (qr * 4 + x / (D / 8)) * QW<D> + x % (D / 8)) = qv;
    }
    if constexpr (PAT) {
        for (int i = tid; i < DW * mp * NR / 4; i += NT) reinterpret_cast<uint4*>(hist)[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    if constexpr (NQ) {  // K's table, and V's where its codes have other bits
        nq_table<KB>(smem + L::NL, levels_k, tid, NT);
        if constexpr (VB != KB) nq_table<VB>(smem + L::NL + NQ_TABLE, levels_v, tid, NT);
    }
    __syncthreads();
    if constexpr (QUANT && !NQ) {
        const __half* qn = reinterpret_cast<const __half*>(Qn);
        const auto q_at = [&](int r, int ch) {  // channel ch of row r in the lanes' layout
            return __half2float(qn[((r * 4 + ch / (D / 4)) * QW<D> + (ch % (D / 4)) / 2) * 2 + (ch & 1)]);
        };
        for (int i = tid; i < NR * D / 2; i += NT) {  // pair hp of lane (r, c)
            const int r = i / (D / 2), c = (i / (D / 8)) % 4, hp = i % (D / 8), lo_ = k_pair_lo<D, KL>(c, hp);
            const float f = sl2 / (float)(1 << code_shift<KL>(hp % (16 / KL)));
            Qh[(i / (D / 8)) * QW<D> + hp] = h2u(__floats2half2_rn(q_at(r, lo_) * f, q_at(r, lo_ + 16 / KL) * f));
        }
    }
    if constexpr (PAT) {  // q . C_K for every K pattern (log2-scaled)
        uint32_t bf[NK][2];
        q_fragments<D>(bf, Qn);
        kpats.table(qc, bf, sl2, info.patterns);
    }
    __syncthreads();

    Acc<D, PAT> acc;
    acc.init();
    if constexpr (PAT) acc.hist = hist + warp * mp * NR, acc.hp = info.patterns;
    // shared-memory address of this warp's histogram entry (pattern 0, row r0)
    const uint32_t hist_row = PAT ? static_cast<uint32_t>(__cvta_generic_to_shared(hist + warp * mp * NR + r0)) : 0u;

    // fp16 keys [k_lo, k_hi) of a segment of n keys (rows `stride` halves apart); step keys
    // (causal) are visible to a row up to its own position. The next 16 keys load a group ahead.
    const auto dense = [&](const __half* kp, const __half* vp, long long stride, int n, int k_lo, int k_hi,
                           bool causal) {
        uint32_t bf[NK][2];
        q_fragments<D>(bf, Qn);
        const int t0 = min(r0 / g, info.step - 1), t1 = min(r1 / g, info.step - 1);
        FStep<D> cur, nxt;
        cur.load(kp, vp, stride, k_lo, n);
        for (int key0 = k_lo; key0 < k_hi; key0 += 16) {
            if (key0 + 16 < k_hi) nxt.load(kp, vp, stride, key0 + 16, n);
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
            cur = nxt;
        }
    };

    if (sk_a < sk_z) dense(sink_k + sink_off, sink_v + sink_off, D, info.sinks, sk_a, sk_z, false);
    if constexpr (NQ) if (qa < qz) nq_chunks<D, KB, VB, NG>(acc, smem + L::NL, Qn, row0, qa, qz, kc, vc, ks, vs, bs, sl2);
    if constexpr (QUANT && !NQ) if (qa < qz) {  // quantized chunks, NG groups of 16 keys per step
        uint32_t bk[NK][2];    // q * s_K * scale * log2(e), as the scores' B fragments
        float qm0 = 0.0f, qm1 = 0.0f;  // the scores' offsets (chunk_operands), rows r0, r1
        int chunk = -1;
        const auto enter_chunk = [&](int ci_, bool fetched) {
            if (fetched) cp_async_wait<1>();  // the next chunk's fetch may still be in flight
            else cp_async_wait<0>();
            __syncwarp();
            const float2 qm = chunk_operands<D, KL>(bk, sc + (warp * 2 + (ci_ & 1)) * 2 * D, Qh + lane * QW<D>,
                                                    Qn + lane * QW<D>, sl2);
            __syncwarp();  // the buffer is refilled two chunks later
            qm0 = qm.x, qm1 = qm.y;
            chunk = ci_;
            if constexpr (PAT) acc.hist_guard(G);
        };
        const auto process = [&](const Step& cur) {
            float s[NG][4];
#pragma unroll
            for (int gi = 0; gi < NG; ++gi) {
                uint32_t k0[D / 8], k1[D / 8];
                code_pairs<KL, (D * KL / 32 + 3) / 4>(cur.k[gi][0].w, k0);
                code_pairs<KL, (D * KL / 32 + 3) / 4>(cur.k[gi][1].w, k1);
                s[gi][0] = s[gi][1] = s[gi][2] = s[gi][3] = 0.0f;  // patternkv: q . C_K[a] of the keys
                if constexpr (PAT) {
                    const float2 c0 = *reinterpret_cast<const float2*>(qc + Step::byte(cur.kx, 2 * gi) * NR + r0);
                    const float2 c1 = *reinterpret_cast<const float2*>(qc + Step::byte(cur.kx, 2 * gi + 1) * NR + r0);
                    s[gi][0] = c0.x, s[gi][1] = c0.y, s[gi][2] = c1.x, s[gi][3] = c1.y;
                }
#pragma unroll
                for (int kk = 0; kk < NK; ++kk) {
                    const uint32_t af[4] = {k0[kk], k1[kk], k0[NK + kk], k1[NK + kk]};
                    mma16816(s[gi], af, bk[kk]);
                }
            }
            acc.template probs<false>(s, qm0, qm1);
#pragma unroll
            for (int gi = 0; gi < NG; ++gi) {
                const float2 sv = __half22float2(u2h(cur.vs.w[gi])), mv = __half22float2(u2h(cur.vm.w[gi]));
                const float* p = s[gi];
                acc.l[0] += p[0] + p[2];
                acc.l[1] += p[1] + p[3];
                acc.pm[0] += p[0] * mv.x + p[2] * mv.y;
                acc.pm[1] += p[1] * mv.x + p[3] * mv.y;
                const float pv[4] = {p[0] * sv.x, p[1] * sv.x, p[2] * sv.y, p[3] * sv.y};
                uint32_t va[NK][4];
                v_fragments<D, VL, D * VL / 128>(va, cur.v[gi][0].w, cur.v[gi][2].w, cur.v[gi][1].w,
                                                 cur.v[gi][3].w);
                acc.pv_codes(pv, va);
                if constexpr (PAT) {  // H[a][row] += p for the keys whose V mask is set
                    const uint32_t e0 = hist_row + Step::byte(cur.vx, 2 * gi) * (NR * 4);
                    const uint32_t e1 = hist_row + Step::byte(cur.vx, 2 * gi + 1) * (NR * 4);
                    // the keys' V mask bits, each spread over a word (bit 2 gi + j to the sign, then down)
                    acc.hist_add(e0, p[0], p[1], (uint32_t)((int)(cur.mk << (31 - 2 * gi)) >> 31));
                    acc.hist_add(e1, p[2], p[3], (uint32_t)((int)(cur.mk << (30 - 2 * gi)) >> 31));
                }
            }
        };
        // one step: prefetch the next into `nxt` (and its chunk's scales), then compute `cur`.
        // Steps never cross chunks: G is a multiple of TILE, TILE of STEP.
        const auto step = [&](const Step& cur, Step& nxt, int ct) {
            if (ct >= c_end) ++ci, c_end += G;
            bool fetched = false;
            if (ct + STEP < qz) {
                nxt.load(row0 + ct + STEP, ct + STEP, kc, vc, vs, vm, kidx, vidx, mask_row);
                if (ct + STEP >= c_end) {
                    fetch_scales(ci + 1);
                    fetched = true;
                }
            }
            if (ci != chunk) {
                acc.unbias();
                enter_chunk(ci, fetched);
            }
            process(cur);
        };
        A.load(row0 + qa, qa, kc, vc, vs, vm, kidx, vidx, mask_row);  // (issued any earlier, the H100 ran the loop slower)
        fetch_scales(ci);
        acc.template scale_codes<VL>(true);
        for (int ct = qa; ct < qz; ct += 2 * STEP) {  // two named buffers: no register copies
            step(A, Bs, ct);
            if (ct + STEP < qz) step(Bs, A, ct + STEP);
        }
        acc.unbias();
        acc.template scale_codes<VL>(false);
    }
    if (wk_a < wk_z) dense(win_k + win_off, win_v + win_off, D, info.window, wk_a, wk_z, false);
    if (st_a < st_z) dense(step_k + step_off, step_v + step_off, s_st, step_seen, st_a, st_z, true);

    // Merge the block's warps. Each lane gets its rows' block max and sum from the warps' (m, l),
    // scales its output by 2^(m_w - m) / l (plus, patternkv, its tiles of H C_V), and the block
    // sums the warps' outputs: this split's part, normalised (the split merge weighs it by l).
    VPatterns<D, DW> vpats;
    if constexpr (PAT) vpats.load(vpat + bh * mmax * D, info.patterns);  // in flight during the merge
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            acc.l[i] += __shfl_xor_sync(0xffffffffu, acc.l[i], x);
            acc.pm[i] += __shfl_xor_sync(0xffffffffu, acc.pm[i], x);
        }
    }
    float* w_m = ms;                 // (DW, NR) the warps' maxima
    float* w_l = w_m + DW * NR;      // sums
    float* w_pm = w_l + DW * NR;     // sums of p m_V
    float* w_hs = w_pm + DW * NR;    // (DW) histogram scales
    float* pmn = w_hs + DW;          // (NR) merged sum p m_V / l
    int* flag = reinterpret_cast<int*>(pmn + NR);
    if (gq == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) w_m[warp * NR + r0 + i] = acc.m[i], w_l[warp * NR + r0 + i] = acc.l[i], w_pm[warp * NR + r0 + i] = acc.pm[i];
    }
    if (lane == 0) w_hs[warp] = acc.hscale;
    __syncthreads();
    float f[2][DW], mx[2], lt[2], pt[2];  // per row r0 + i: warp factors 2^(m_w - m), max, sum, sum p m_V
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mx[i] = -MINIKV_INF, lt[i] = 0.0f, pt[i] = 0.0f;
#pragma unroll
        for (int w = 0; w < DW; ++w) mx[i] = fmaxf(mx[i], w_m[w * NR + r0 + i]);
#pragma unroll
        for (int w = 0; w < DW; ++w) {
            const float mw = w_m[w * NR + r0 + i];
            f[i][w] = mw == -MINIKV_INF ? 0.0f : ex2(mw - mx[i]);
            lt[i] += f[i][w] * w_l[w * NR + r0 + i];
            pt[i] += f[i][w] * w_pm[w * NR + r0 + i];
        }
        const float il = lt[i] > 0.0f ? 1.0f / lt[i] : 0.0f;
        const float own = acc.m[i] == -MINIKV_INF ? 0.0f : ex2(acc.m[i] - mx[i]) * il;
#pragma unroll
        for (int mb = 0; mb < NK; ++mb) acc.o[mb][i] *= own, acc.o[mb][2 + i] *= own;
#pragma unroll
        for (int w = 0; w < DW; ++w) f[i][w] *= il / w_hs[w];  // -> histogram weights (patternkv)
        pt[i] *= il;
    }
    if constexpr (PAT) vpats.fold(acc.o, hist, mp, f[0], f[1], info.patterns);
    store_rows<D>(mo + warp * NR * LDM, acc.o);
    const long long BHT = (long long)B * H * T;
    if (warp == 0 && gq == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = r0 + i;
            pmn[r] = pt[i];
            if (r < nrows) {  // the split merge works in log2 units
                const long long row = part_row(b, h, g, H, T, r);
                *reinterpret_cast<float2*>(ml_part + (blockIdx.x * BHT + row) * 2) = make_float2(mx[i], lt[i]);
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < nrows * D / 4; i += NT) {
        const int r = i / (D / 4), d = (i % (D / 4)) * 4;
        float4 o = make_float4(pmn[r], pmn[r], pmn[r], pmn[r]);
#pragma unroll
        for (int w = 0; w < DW; ++w) {
            const float4 x = *reinterpret_cast<const float4*>(mo + (w * NR + r) * LDM + d);
            o.x += x.x, o.y += x.y, o.z += x.z, o.w += x.w;
        }
        const long long row = part_row(b, h, g, H, T, r);
        *reinterpret_cast<float4*>(o_part + (blockIdx.x * BHT + row) * D + d) = o;
    }
    if (last_arrival(counters + bh, gridDim.x, flag))
        merge_splits<D, DW>(o_part, ml_part, out, gridDim.x, BHT, b, h, g, H, T, nrows);
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrappers can ask for
#define DINST(D, M, KB, VB, NG, DW) \
    void* dinst_##D##_##M##_##KB##_##VB##_##NG##_##DW = (void*)&attend_decode<D, M, KB, VB, NG, DW>;
#define DINST_G(M, KB, VB, NG) DINST(64, M, KB, VB, NG, 4) DINST(128, M, KB, VB, NG, 4) \
    DINST(64, M, KB, VB, NG, 8) DINST(128, M, KB, VB, NG, 8)
#define DINST_D(M, KB, VB) DINST_G(M, KB, VB, 2) DINST_G(M, KB, VB, 4)
DINST_D(DENSE, 16, 16)
DINST_D(KIVI, 2, 2) DINST_D(KIVI, 4, 4) DINST_D(KIVI, 8, 8) DINST_G(KIVI, 8, 8, 1) DINST_D(KIVI, 2, 4) DINST_D(KIVI, 4, 2)
DINST_D(KIVI, 3, 3) DINST_D(KIVI, 3, 2) DINST_D(KIVI, 2, 3) DINST_D(KIVI, 4, 3) DINST_D(KIVI, 3, 4) DINST_D(KIVI, 3, 8)
DINST_D(KIVI, 8, 3)
DINST_D(PATTERN, 2, 2) DINST_D(PATTERN, 4, 4) DINST_D(PATTERN, 2, 4)
DINST_D(NQKV_TOKEN, 2, 2) DINST_D(NQKV_TOKEN, 4, 4) DINST_D(NQKV_TOKEN, 2, 4) DINST_D(NQKV_TOKEN, 4, 2)
#endif
