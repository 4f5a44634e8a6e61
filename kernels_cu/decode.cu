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
// q * s_K (per chunk, times the softmax scale) against raw codes, the accumulator starting at
// q . m_K (+ q . C_K[a] from a per-block table); P.V uses p * s_V against the biased codes (code *
// 2^s + 1024: Acc::pv_codes) plus sum p m_V.
// PatternKV's V patterns add sum_t p_t C_V[a_t] (where the V mask is set) as sum_a H[a] C_V[a]:
// each warp sums p per (pattern, row) into a fixed-point histogram with native shared-memory
// integer atomics (float ones are compare-and-swap loops); at the end the block adds H C_V with
// one mma per 16 patterns, H merged from the warps' histograms (KVQUANT.md 3.5). Gathering pattern rows
// per key instead costs ~110 instructions and ~80 registers per 16 keys, and 64 KB of rows per kv
// head at 256 patterns does not stay in L1.
//
// Each warp walks its own contiguous range of keys with its own softmax state (rescaled lazily:
// only when a row's max grows by more than 2^8), loading the next NG groups while computing the
// current (two register buffers, ping-pong); the block merges its warps; attend_reduce
// (attention.cu) merges the blocks.
#include "decode_tiles.cuh"

using namespace minikv;

// MINB: blocks per SM the registers must allow (ptxas otherwise takes up to 255 per thread).
template <int D, int METHOD, int KB, int VB, int NG, int MINB>
__global__ void __launch_bounds__(DW * 32, MINB) attend_decode(MINIKV_ATTEND_PARAMS) {
    using L = DLayout<D>;
    constexpr bool QUANT = METHOD != DENSE, PAT = METHOD == PATTERN;
    constexpr int NK = D / 16, NT = DW * 32;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* Qf = reinterpret_cast<__half*>(smem + L::QF);
    uint32_t* Qq = reinterpret_cast<uint32_t*>(smem + L::QQ);
    float* Qs = reinterpret_cast<float*>(smem + L::QS);
    __half* sc = reinterpret_cast<__half*>(smem + L::SC);
    float* mo = reinterpret_cast<float*>(smem + L::MO);
    float* ms = reinterpret_cast<float*>(smem + L::MS);
    float* qc = reinterpret_cast<float*>(smem + L::QC);
    uint32_t* hist = reinterpret_cast<uint32_t*>(smem + L::HI(mp));  // patternkv: (DW, mp, NR)

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
    if constexpr (PAT) {
        for (int i = tid; i < DW * mp * NR; i += NT) hist[i] = 0u;
    }
    if constexpr (QUANT) {
        for (int i = tid; i < NR * D / 2; i += NT) {
            const int r = i / (D / 2), c = (i / (D / 8)) % 4, hp = i % (D / 8), lo = k_pair_lo<D, KB>(c, hp);
            const __half a = Qf[r * D + lo], z = Qf[r * D + lo + 16 / KB];
            Qq[i] = h2u(__halves2half2(a, z));
            const float f = sl2 / (float)(1 << code_shift<KB>(hp % (16 / KB)));
            *reinterpret_cast<float2*>(Qs + (i / (D / 8)) * QSS<D> + 2 * hp) = make_float2(__half2float(a) * f, __half2float(z) * f);
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
            *reinterpret_cast<float2*>(qc + (p0 + 2 * gq) * NR + r0) = make_float2(s[0] * sl2, s[1] * sl2);
            *reinterpret_cast<float2*>(qc + (p0 + 2 * gq + 1) * NR + r0) = make_float2(s[2] * sl2, s[3] * sl2);
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

    Acc<D, PAT> acc;
    acc.init();
    if constexpr (PAT) acc.hist = hist + warp * mp * NR, acc.hp = info.patterns;
    // shared-memory address of this warp's histogram entry (pattern 0, row r0)
    const uint32_t hist_row = PAT ? static_cast<uint32_t>(__cvta_generic_to_shared(hist + warp * mp * NR + r0)) : 0u;

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
                float qm = chunk_operands<D, KB>(bk, sc + (warp * 2 + (ci & 1)) * 2 * D, Qs + (gq * 4 + cq) * QSS<D>);
                __syncwarp();  // the buffer is refilled two chunks later
                qm += __shfl_xor_sync(0xffffffffu, qm, 1);
                qm += __shfl_xor_sync(0xffffffffu, qm, 2);
                qm0 = __shfl_sync(0xffffffffu, qm, 8 * cq);  // row r lives in lanes 4r..4r+3
                qm1 = __shfl_sync(0xffffffffu, qm, 8 * cq + 4);
                chunk = ci;
                if constexpr (PAT) acc.hist_guard(G);
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
                        const float2 c0 = *reinterpret_cast<const float2*>(qc + Step::byte(cur.kx, 2 * gi) * NR + r0);
                        const float2 c1 = *reinterpret_cast<const float2*>(qc + Step::byte(cur.kx, 2 * gi + 1) * NR + r0);
                        s[gi][0] += c0.x, s[gi][1] += c0.y, s[gi][2] += c1.x, s[gi][3] += c1.y;
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
                    const float2 sv = __half22float2(u2h(cur.vs.w[gi])), mv = __half22float2(u2h(cur.vm.w[gi]));
                    const float* p = s[gi];
                    acc.l[0] += p[0] + p[2];
                    acc.l[1] += p[1] + p[3];
                    acc.pm[0] += p[0] * mv.x + p[2] * mv.y;
                    acc.pm[1] += p[1] * mv.x + p[3] * mv.y;
                    const float pv[4] = {p[0] * sv.x, p[1] * sv.x, p[2] * sv.y, p[3] * sv.y};
                    uint32_t va[NK][4];
                    v_fragments<D, VB, D * VB / 128>(va, cur.v[gi][0].w, cur.v[gi][2].w, cur.v[gi][1].w,
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
            // ci: the chunk of key ct, whose keys end at c_end (steps never cross chunks: G is a
            // multiple of TILE, TILE of STEP).
            int ci = a / G, c_end = (ci + 1) * G;
            const auto step = [&](const Step& cur, Step& nxt, int ct) {
                if (ct >= c_end) ++ci, c_end += G;
                bool fetched = false;
                if (ct + STEP < z) {
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
            Step A, Bs;
            A.load(row0 + a, a, kc, vc, vs, vm, kidx, vidx, mask_row);
            fetch_scales(ci);
            acc.template scale_codes<VB>(true);
            for (int ct = a; ct < z; ct += 2 * STEP) {  // two named buffers: no register copies
                step(A, Bs, ct);
                if (ct + STEP < z) step(Bs, A, ct + STEP);
            }
            acc.unbias();
            acc.template scale_codes<VB>(false);
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
    float* row_max = ms + DW * 4 * NR;
    float* row_sum = row_max + NR;
    float* inv_scale = row_sum + NR;
    if (gq == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            ms[(warp * 4 + 0) * NR + r0 + i] = acc.m[i];
            ms[(warp * 4 + 1) * NR + r0 + i] = acc.l[i];
            ms[(warp * 4 + 2) * NR + r0 + i] = acc.pm[i];
        }
    }
    if (lane == 0) inv_scale[warp] = 1.0f / acc.hscale;
    __syncthreads();
    if (tid < NR) {
        float mx = -MINIKV_INF, l = 0.0f;
        for (int w = 0; w < DW; ++w) mx = fmaxf(mx, ms[(w * 4) * NR + tid]);
        for (int w = 0; w < DW; ++w) {
            const float mw = ms[(w * 4) * NR + tid], f = mw == -MINIKV_INF ? 0.0f : ex2(mw - mx);
            ms[(w * 4 + 3) * NR + tid] = f;
            l += f * ms[(w * 4 + 1) * NR + tid];
        }
        row_max[tid] = mx;
        row_sum[tid] = l;
    }
    __syncthreads();
    const auto merged_o = [&](int r, int d) {
        float o = 0.0f;
        for (int w = 0; w < DW; ++w) o += ms[(w * 4 + 3) * NR + r] * mo[(w * NR + r) * D + d];
        return o;
    };
    if constexpr (PAT) {
        // The warps' outputs merged into slot 0. Then warp w adds C_V^T H^T for pattern tiles w,
        // w + DW, ... into slot w (warp 0: on top of the merged output), H / l (<= 1) as fp16 mma
        // operands, merged from the warps' fixed-point histograms as it goes; slots are summed below.
        for (int i = tid; i < NR * D; i += NT) mo[i] = merged_o(i / D, i % D);
        float f0[DW], f1[DW];  // warp w's entry -> H / l, rows r0, r1
#pragma unroll
        for (int w = 0; w < DW; ++w) {
            const float l0 = row_sum[r0], l1 = row_sum[r1];
            f0[w] = l0 > 0.0f ? ms[(w * 4 + 3) * NR + r0] * inv_scale[w] / l0 : 0.0f;
            f1[w] = l1 > 0.0f ? ms[(w * 4 + 3) * NR + r1] * inv_scale[w] / l1 : 0.0f;
        }
        __syncthreads();
        float po[NK][4];
#pragma unroll
        for (int i = 0; i < NK; ++i) po[i][0] = po[i][1] = po[i][2] = po[i][3] = 0.0f;
        const __half* vp = vpat + bh * mmax * D + gq * (D / 8);
        for (int p0 = warp * 16; p0 < info.patterns; p0 += DW * 16) {
            // patterns as a group of 16 keys: rows 4c..4c+3 (P.V layout), weights of 2g, 2g+1
            Raw<D / 4> cv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (p0 + 4 * cq + j < info.patterns) cv[j].load_cached(vp + (p0 + 4 * cq + j) * D);
                else cv[j].zero();
            }
            float w[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // patterns p0 + 2g, +1 x rows r0, r1
#pragma unroll
            for (int wi = 0; wi < DW; ++wi) {
                const uint32_t* h0 = hist + (wi * mp + p0 + 2 * gq) * NR + r0;
                const uint2 x = *reinterpret_cast<const uint2*>(h0), y = *reinterpret_cast<const uint2*>(h0 + NR);
                w[0] += f0[wi] * __uint2float_rn(x.x), w[1] += f1[wi] * __uint2float_rn(x.y);
                w[2] += f0[wi] * __uint2float_rn(y.x), w[3] += f1[wi] * __uint2float_rn(y.y);
            }
            uint32_t va[NK][4];
            v_fragments<D, 16, D / 8>(va, cv[0].w, cv[2].w, cv[1].w, cv[3].w);
            const uint32_t bw[2] = {movtrans(h2u(__floats2half2_rn(w[0], w[1]))),
                                    movtrans(h2u(__floats2half2_rn(w[2], w[3])))};
#pragma unroll
            for (int mb = 0; mb < NK; ++mb) mma16816(po[mb], va[mb], bw);
        }
        float* slot = mo + warp * NR * D;
#pragma unroll
        for (int mb = 0; mb < NK; ++mb) {
            const int c0 = gq * (D / 8) + mb, c1 = c0 + NK;
            const float l0 = row_sum[r0], l1 = row_sum[r1];
            if (warp == 0) {
                slot[r0 * D + c0] += po[mb][0] * l0, slot[r1 * D + c0] += po[mb][1] * l1;
                slot[r0 * D + c1] += po[mb][2] * l0, slot[r1 * D + c1] += po[mb][3] * l1;
            } else {
                slot[r0 * D + c0] = po[mb][0] * l0, slot[r1 * D + c0] = po[mb][1] * l1;
                slot[r0 * D + c1] = po[mb][2] * l0, slot[r1 * D + c1] = po[mb][3] * l1;
            }
        }
        __syncthreads();
    }
    const long long BHT = (long long)B * H * T;
    for (int i = tid; i < nrows * D; i += NT) {
        const int r = i / D, d = i % D;
        float o = 0.0f, l = row_sum[r], pm = 0.0f;
        if constexpr (PAT) {
            for (int w = 0; w < DW; ++w) o += mo[(w * NR + r) * D + d];
        } else {
            o = merged_o(r, d);
        }
        for (int w = 0; w < DW; ++w) pm += ms[(w * 4 + 3) * NR + r] * ms[(w * 4 + 2) * NR + r];
        const long long row = ((long long)b * H + h * g + r % g) * T + r / g;
        o_part[(blockIdx.x * BHT + row) * D + d] = o + pm;
        if (d == 0) {  // attend_reduce merges in natural-log units
            ml_part[(blockIdx.x * BHT + row) * 2] = row_max[r] * LN2;
            ml_part[(blockIdx.x * BHT + row) * 2 + 1] = l;
        }
    }
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrappers can ask for
#define DINST(D, M, KB, VB, NG, MB) \
    void* dinst_##D##_##M##_##KB##_##VB##_##NG##_##MB = (void*)&attend_decode<D, M, KB, VB, NG, MB>;
#define DINST_G(M, KB, VB, NG) DINST(64, M, KB, VB, NG, 2) DINST(128, M, KB, VB, NG, 2) \
    DINST(64, M, KB, VB, NG, 3) DINST(128, M, KB, VB, NG, 3)
#define DINST_D(M, KB, VB) DINST_G(M, KB, VB, 2) DINST_G(M, KB, VB, 4)
DINST_D(DENSE, 16, 16)
DINST_D(KIVI, 2, 2) DINST_D(KIVI, 4, 4) DINST_D(KIVI, 8, 8) DINST_D(KIVI, 2, 4) DINST_D(KIVI, 4, 2)
DINST_D(PATTERN, 2, 2) DINST_D(PATTERN, 4, 4) DINST_D(PATTERN, 2, 4)
#endif
