// Fused attention over a KV cache, one kernel for every method (fp16, kivi, nqkv, patternkv)
// and every step size (decode, chunks, prefill): the skeleton is shared, only the decode of a
// key/value tile into fp16 shared memory differs (tiles.cuh).
//
// For uniform codes (kivi, patternkv) the tiles hold the raw codes and the affine parts are
// folded into the operands (KVQUANT.md 3.5): with k^ = s * code + m (+ C[a]) per channel,
//   q . k^ = (q * s) . code + q . m (+ q . C[a], from a per-block table of q . C),
// and with v^ = s_t * code + m_t (+ C[a_t] where the V mask is set) per token,
//   sum_t p_t v^_t = (p * s) . code + sum_t p_t m_t (+ sum_c hist_c C[c], hist_c = sum of the
//   p_t of tokens on pattern c),
// so decoding a tile is unpacking codes, with no per-element scale or pattern reads.
//
// A block serves one (sequence b, kv head) and a tile of ROWS query rows, row r = t * g + j
// (query t of the step, head j of the kv head's group of g): every query head of a kv head
// reads each K/V tile once. Keys come in segments, in position order:
//   sinks (fp16) | quantized chunks | window (fp16) | this step's keys (fp16, causal)
// walked in tiles of TILE keys; blockIdx.x splits the tiles (flash-decoding), and
// attend_reduce merges the splits. Scores and P.V run on tensor cores through mma.sync
// m16n8k16 (fp16 in, fp32 accumulate; inline PTX: NVRTC has no <mma.h>), whose fragment
// layout is known, so the output accumulator stays in registers and is rescaled per row.
#include "mma.cuh"

using namespace minikv;

constexpr int THREADS = 128;

template <int D, int ROWS>
struct Smem {  // offsets (bytes) of the shared-memory regions, each 128-byte aligned
    // Rows padded by 8 halves: a warp's fragment loads then hit 32 different banks.
    static constexpr int LDH = D + 8, LDS = TILE + 4, LDP = TILE + 8;
    static constexpr int al(int x) { return (x + 127) / 128 * 128; }
    static constexpr int Q = 0;
    static constexpr int QK = Q + al(ROWS * LDH * 2);  // q * the chunk's K scales (folded kernels)
    static constexpr int K = QK + al(ROWS * LDH * 2);
    static constexpr int V = K + al(TILE * LDH * 2);
    static constexpr int S = V + al(TILE * LDH * 2);
    static constexpr int P = S + al(ROWS * LDS * 4);
    static constexpr int R = P + al(ROWS * LDP * 2);     // per row: max, sum, rescale, sum p*m, q.m
    static constexpr int C = R + al(ROWS * 5 * 4);       // chunk's K scale and min (float32), NF levels
    static constexpr int TT = C + al((2 * D + 32) * 4);  // per tile token: V scale, V min, K/V pattern, mask
    static constexpr int X = TT + al(TILE * 5 * 4);      // patternkv: q.C table, then hist (ROWS x mp each)
    static constexpr int bytes(bool patterns, int mp) { return X + (patterns ? 2 * al(ROWS * mp * 4) : 0); }
};

template <int D, int METHOD, int KB, int VB, int ROWS>
__global__ void __launch_bounds__(THREADS) attend(MINIKV_ATTEND_PARAMS) {
    using L = Smem<D, ROWS>;
    // Folded kernels: the tiles hold raw codes, exact in fp16 for codes of at most 8 bits.
    constexpr bool FOLD = METHOD == PATTERN || (METHOD == KIVI && KB <= 8 && VB <= 8);
    extern __shared__ __align__(128) unsigned char smem[];
    __half* Qs = reinterpret_cast<__half*>(smem + L::Q);
    __half* Qk = reinterpret_cast<__half*>(smem + L::QK);
    __half* Ks = reinterpret_cast<__half*>(smem + L::K);
    __half* Vs = reinterpret_cast<__half*>(smem + L::V);
    float* Ss = reinterpret_cast<float*>(smem + L::S);
    __half* Ps = reinterpret_cast<__half*>(smem + L::P);
    float* row_m = reinterpret_cast<float*>(smem + L::R);
    float* row_l = row_m + ROWS;
    float* row_a = row_l + ROWS;
    float* row_pm = row_a + ROWS;  // sum of p * V min (folded), rescaled with the output
    float* row_qm = row_pm + ROWS;  // q . the chunk's K mins (folded)
    float* k_scale = reinterpret_cast<float*>(smem + L::C);  // (D,) this chunk's K scales, then mins
    float* k_min = k_scale + D;
    float* lv_k = k_min + D;  // NF levels of K and V (16 each)
    float* lv_v = lv_k + 16;
    float* tok_vs = reinterpret_cast<float*>(smem + L::TT);  // per key of the tile (folded)
    float* tok_vm = tok_vs + TILE;
    int* tok_kx = reinterpret_cast<int*>(tok_vm + TILE);
    int* tok_vx = tok_kx + TILE;
    int* tok_mk = tok_vx + TILE;
    float* qc = reinterpret_cast<float*>(smem + L::X);     // (ROWS, mp) q . K patterns
    float* hist = qc + (ROWS * mp + 31) / 32 * 32;          // (ROWS, mp) probability per V pattern

    const int b = blockIdx.z, B = gridDim.z, g = H / Hkv;
    const int row_tiles = (g * T + ROWS - 1) / ROWS;
    const int h = blockIdx.y / row_tiles, r0 = (blockIdx.y % row_tiles) * ROWS;
    const int split = blockIdx.x, n_split = gridDim.x, tid = threadIdx.x, warp = tid >> 5;
    const int lane = tid & 31, gq = lane >> 2, cq = lane & 3;  // mma fragment coordinates
    constexpr int WR = ROWS / 16, WC = 4 / WR, ND = D / WC, TPR = THREADS / ROWS;
    const int wr = warp % WR, wc = warp / WR;
    float o[ND / 8][4];  // this warp's 16 rows x ND channels of the output, unnormalised
#pragma unroll
    for (int i = 0; i < ND / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    const Row info = reinterpret_cast<const Row*>(rowinfo)[b];
    const long long bh = (long long)b * Hkv + h;
    const int n_pat = METHOD == PATTERN ? info.patterns : 0;

    // Queries of this row tile; the step keys a row may see end at its own position.
    for (int i = tid; i < ROWS * D; i += THREADS) {
        const int r = r0 + i / D, d = i % D;
        __half v = __float2half(0.0f);
        if (r < g * T) v = q[b * q_sb + (long long)(h * g + r % g) * q_sh + (long long)(r / g) * q_st + d];
        Qs[(i / D) * L::LDH + d] = v;
    }
    for (int r = tid; r < ROWS; r += THREADS) { row_m[r] = -MINIKV_INF; row_l[r] = 0.0f; row_pm[r] = 0.0f; }
    if constexpr (METHOD == NQKV_TOKEN || METHOD == NQKV_CHANNEL) {
        if (tid < (1 << KB)) lv_k[tid] = levels_k[tid];
        if (tid < (1 << VB)) lv_v[tid] = levels_v[tid];
    }
    if constexpr (METHOD == PATTERN) {
        for (int i = tid; i < ROWS * mp; i += THREADS) hist[i] = 0.0f;
        __syncthreads();
        for (int m0 = 0; m0 < n_pat; m0 += TILE) {  // q . C for every K pattern, once per block
            minikv::stage_fp16<D>(Ks, L::LDH, kpat + (bh * mmax + m0) * D, D, min(TILE, n_pat - m0));
            __syncthreads();
            mma_abt<D, ROWS>(Qs, Ks, qc + m0, mp);
            __syncthreads();
        }
    }
    const int last_row = min(r0 + ROWS, g * T) - 1;
    const int step_seen = min(info.step, last_row / g + 1);  // step keys any row of the tile sees

    const int per_chunk = G / TILE;
    const int t_sink = (info.sinks + TILE - 1) / TILE, t_chunk = info.chunks * per_chunk;
    const int t_win = (info.window + TILE - 1) / TILE, t_step = (step_seen + TILE - 1) / TILE;
    const int total = t_sink + t_chunk + t_win + t_step;
    const int per = (total + n_split - 1) / n_split;
    const int lo = split * per, hi = min(total, lo + per);

    ChunkTile<D, METHOD, KB, VB> next;  // the next chunk tile, in flight
    const auto prefetch = [&](int tile) {
        if constexpr (METHOD != DENSE) {
            if (tile < hi && tile >= t_sink && tile < t_sink + t_chunk)
                next.load(tile - t_sink, per_chunk, G, bh, n_chunks_cap, kc, ks, km, vc, vs, vm, kidx, vidx, vmask);
        }
    };
    prefetch(lo);
    int folded = -1;  // the chunk whose K scales Qk holds

    for (int tile = lo; tile < hi; ++tile) {
        int n_valid, causal_base = -1;  // causal_base >= 0: step keys, index of the tile's first
        bool chunk = false;
        __syncthreads();  // previous tile's K/V/P are no longer read
        if (tile < t_sink) {
            const int k0 = tile * TILE;
            n_valid = min(TILE, info.sinks - k0);
            const long long off = (bh * sink_cap + k0) * D;
            minikv::stage_fp16<D>(Ks, L::LDH, sink_k + off, D, n_valid);
            minikv::stage_fp16<D>(Vs, L::LDH, sink_v + off, D, n_valid);
            prefetch(tile + 1);
        } else if (tile < t_sink + t_chunk) {
            n_valid = TILE;
            chunk = true;
            if constexpr (METHOD != DENSE) {
                const ChunkTile<D, METHOD, KB, VB> cur = next;
                prefetch(tile + 1);  // issued before this tile's decode and compute
                const int t = tid >> 1, half = tid & 1;
                if constexpr (METHOD == KIVI || METHOD == PATTERN) {
                    if (cur.c != folded || !FOLD) {  // a new chunk: its per-channel K scale and min
                        if (tid < D) {
                            k_scale[tid] = __half2float(cur.k_scale);
                            k_min[tid] = __half2float(cur.k_min);
                        }
                        __syncthreads();
                    }
                    if constexpr (FOLD) {
                        if (cur.c != folded) {  // Qk = q * s, q . m per row
                            for (int i = tid; i < ROWS * D; i += THREADS) {
                                const int r = i / D, d = i % D;
                                Qk[r * L::LDH + d] = __float2half_rn(__half2float(Qs[r * L::LDH + d]) * k_scale[d]);
                            }
                            const int r = tid / TPR, part = tid % TPR;
                            float acc = 0.0f;
                            for (int d = part; d < D; d += TPR) acc += __half2float(Qs[r * L::LDH + d]) * k_min[d];
#pragma unroll
                            for (int o2 = TPR / 2; o2 > 0; o2 >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o2, TPR);
                            if (part == 0) row_qm[r] = acc;
                            folded = cur.c;
                        }
                        minikv::decode_codes<D, KB>(Ks, L::LDH, cur.k);
                        minikv::decode_codes<D, VB>(Vs, L::LDH, cur.v);
                        if (half == 0) {
                            tok_vs[t] = __half2float(cur.v_scale);
                            tok_vm[t] = __half2float(cur.v_min);
                            if constexpr (METHOD == PATTERN) {
                                const int bit = (int)(cur.tok - bh * n_chunks_cap * G + t);
                                tok_kx[t] = cur.k_pat;
                                tok_vx[t] = cur.v_pat;
                                tok_mk[t] = (cur.v_mask >> (bit & 7)) & 1;
                            }
                        }
                    } else {  // 16-bit codes (a diagnostic setting): decode to values
                        minikv::decode_uniform<D, KB, false>(Ks, L::LDH, cur.k, k_scale, k_min, 0.0f, 0.0f, nullptr);
                        minikv::decode_uniform<D, VB, true>(Vs, L::LDH, cur.v, nullptr, nullptr,
                                                            __half2float(cur.v_scale), __half2float(cur.v_min), nullptr);
                    }
                } else {
                    const int bsd = bs < D ? bs : D;  // token-axis blocks never exceed head_dim
                    if constexpr (METHOD == NQKV_CHANNEL) {
                        const __half* a = ks + ((bh * n_chunks_cap + cur.c) * (G / bs) + cur.t0 / bs) * D;
                        minikv::decode_nf<D, KB, true>(Ks, L::LDH, cur.k, a, bs, cur.t0 % bs, lv_k);
                    } else {
                        minikv::decode_nf<D, KB, false>(Ks, L::LDH, cur.k, ks + cur.tok * (D / bsd), bsd, 0, lv_k);
                    }
                    minikv::decode_nf<D, VB, false>(Vs, L::LDH, cur.v, vs + cur.tok * (D / bsd), bsd, 0, lv_v);
                }
            }
        } else if (tile < t_sink + t_chunk + t_win) {
            const int k0 = (tile - t_sink - t_chunk) * TILE;
            n_valid = min(TILE, info.window - k0);
            const long long off = (bh * win_cap + k0) * D;
            minikv::stage_fp16<D>(Ks, L::LDH, win_k + off, D, n_valid);
            minikv::stage_fp16<D>(Vs, L::LDH, win_v + off, D, n_valid);
            prefetch(tile + 1);
        } else {
            const int k0 = (tile - t_sink - t_chunk - t_win) * TILE;
            n_valid = min(TILE, step_seen - k0);
            causal_base = k0;
            const long long off = b * s_sb + h * s_sh + (long long)(info.step_off + k0) * s_st;
            minikv::stage_fp16<D>(Ks, L::LDH, step_k + off, s_st, n_valid);
            minikv::stage_fp16<D>(Vs, L::LDH, step_v + off, s_st, n_valid);
        }
        const bool folded_tile = FOLD && chunk;
        __syncthreads();

        mma_abt<D, ROWS>(folded_tile ? Qk : Qs, Ks, Ss, L::LDS);  // S = Q K^T (ROWS x TILE)
        __syncthreads();

        // Online softmax: TPR consecutive threads per row (one warp), each over TILE / TPR keys.
        {
            constexpr int PER = TILE / TPR;
            const int r = tid / TPR, part = tid % TPR;
            const int t_row = min((r0 + r) / g, info.step - 1);  // padded rows repeat the last query
            float mx = -MINIKV_INF;
            float s[PER];
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int k = part * PER + i;
                const bool ok = k < n_valid && (causal_base < 0 || causal_base + k <= t_row);
                float raw = Ss[r * L::LDS + k];
                if (folded_tile) {
                    raw += row_qm[r];
                    if (METHOD == PATTERN) raw += qc[r * mp + tok_kx[k]];
                }
                s[i] = ok ? raw * scale : -MINIKV_INF;
                mx = fmaxf(mx, s[i]);
            }
#pragma unroll
            for (int o2 = TPR / 2; o2 > 0; o2 >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2, TPR));
            const float m_old = row_m[r], m_new = fmaxf(m_old, mx);
            const float alpha = m_old == -MINIKV_INF ? 0.0f : __expf(m_old - m_new);
            if constexpr (METHOD == PATTERN) {  // the histogram shares the output's running scale
                if (alpha != 1.0f)
                    for (int c = part; c < n_pat; c += TPR) hist[r * mp + c] *= alpha;
                __syncwarp();
            }
            float sum = 0.0f, pmin = 0.0f;
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int k = part * PER + i;
                const float p = m_new == -MINIKV_INF ? 0.0f : __expf(s[i] - m_new);
                sum += p;
                float pv = p;
                if (folded_tile) {
                    pv = p * tok_vs[k];
                    pmin += p * tok_vm[k];
                    if (METHOD == PATTERN && p > 0.0f && tok_mk[k]) atomicAdd(&hist[r * mp + tok_vx[k]], p);
                }
                Ps[r * L::LDP + k] = __float2half(pv);
            }
#pragma unroll
            for (int o2 = TPR / 2; o2 > 0; o2 >>= 1) {
                sum += __shfl_xor_sync(0xffffffffu, sum, o2, TPR);
                pmin += __shfl_xor_sync(0xffffffffu, pmin, o2, TPR);
            }
            __syncwarp();
            if (part == 0) {
                row_a[r] = alpha;
                row_l[r] = row_l[r] * alpha + sum;
                row_pm[r] = row_pm[r] * alpha + pmin;
                row_m[r] = m_new;
            }
        }
        __syncthreads();

        // O = O * alpha + P V, in registers: rows gq and gq + 8 of this warp's 16.
        {
            const float a0 = row_a[wr * 16 + gq], a1 = row_a[wr * 16 + gq + 8];
#pragma unroll
            for (int nt = 0; nt < ND / 8; ++nt) {
                o[nt][0] *= a0;
                o[nt][1] *= a0;
                o[nt][2] *= a1;
                o[nt][3] *= a1;
            }
            mma_pv<D, ROWS>(o, Ps, Vs);
        }
    }
    __syncthreads();

    if constexpr (METHOD == PATTERN) {  // O += hist . C_v, the V patterns' share, 64 patterns at a time
        for (int m0 = 0; m0 < n_pat; m0 += TILE) {
            minikv::stage_fp16<D>(Vs, L::LDH, vpat + (bh * mmax + m0) * D, D, min(TILE, n_pat - m0));
            for (int i = tid; i < ROWS * TILE; i += THREADS) {
                const int r = i / TILE, c = i % TILE;
                Ps[r * L::LDP + c] = __float2half(m0 + c < n_pat ? hist[r * mp + m0 + c] : 0.0f);
            }
            __syncthreads();
            mma_pv<D, ROWS>(o, Ps, Vs);
            __syncthreads();
        }
    }

    // This split's unnormalised output (plus the folded V mins' share) and (max, sum) per row.
    const long long BHT = (long long)B * H * T;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int rl = wr * 16 + gq + 8 * half, r = r0 + rl;
        if (r >= g * T) continue;
        const long long row = ((long long)b * H + h * g + r % g) * T + r / g;
        const float pm = row_pm[rl];
        float* dst = o_part + (split * BHT + row) * D + wc * ND + 2 * cq;
#pragma unroll
        for (int nt = 0; nt < ND / 8; ++nt) {
            dst[nt * 8] = o[nt][2 * half] + pm;
            dst[nt * 8 + 1] = o[nt][2 * half + 1] + pm;
        }
        if (wc == 0 && cq == 0) {
            ml_part[(split * BHT + row) * 2] = row_m[rl];
            ml_part[(split * BHT + row) * 2 + 1] = row_l[rl];
        }
    }
}

// Merge the splits of each (b, h, t) row: out = sum_s o_s e^(m_s - m) / sum_s l_s e^(m_s - m).
// out (B, T, H, D) fp16, so that the model's (B, T, H*D) view of it needs no copy. One warp per
// (row, 32 channels), blockDim.y of them per block (1 when there are few: one sequence at batch
// 1 is only H rows, and a block per row left most SMs idle). A warp's splits' weights go to its
// dynamic shared memory (n_split floats), then each lane sums its channel over the splits, many
// loads in flight (an empty split wrote zeros, and weighs 0).
extern "C" __global__ void attend_reduce(const float* __restrict__ o_part, const float* __restrict__ ml_part,
                                         __half* __restrict__ out, int n_split, int H, int T, int D,
                                         long long BHT) {
    extern __shared__ float wsh_all[];  // (blockDim.y, n_split) weights e^(m_s - m); 0 for empty splits
    const long long item = (long long)blockIdx.x * blockDim.y + threadIdx.y;  // (row, channel block)
    if (item >= BHT * (D / 32)) return;  // whole warps: no shuffle below loses a lane
    float* wsh = wsh_all + threadIdx.y * n_split;
    const long long row = item / (D / 32);  // (b, h, t)
    const int t = row % T, h = (row / T) % H, b = row / ((long long)T * H), lane = threadIdx.x;
    float m = -MINIKV_INF;
    for (int s = lane; s < n_split; s += 32) m = fmaxf(m, ml_part[(s * BHT + row) * 2]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.0f;
    for (int s = lane; s < n_split; s += 32) {
        const float ms = ml_part[(s * BHT + row) * 2];
        const float w = ms != -MINIKV_INF ? __expf(ms - m) : 0.0f;
        wsh[s] = w;
        l += ml_part[(s * BHT + row) * 2 + 1] * w;
    }
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    __syncwarp();
    const int d = (int)(item % (D / 32)) * 32 + lane;
    const float* src = o_part + row * D + d;
    float acc = 0.0f;
#pragma unroll 16
    for (int s = 0; s < n_split; ++s) acc += src[s * BHT * D] * wsh[s];
    out[(((long long)b * T + t) * H + h) * D + d] = __float2half_rn(l > 0.0f ? acc / l : 0.0f);
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrappers can ask for
#define INST(D, M, KB, VB, R) void* inst_##D##_##M##_##KB##_##VB##_##R = (void*)&attend<D, M, KB, VB, R>;
#define INST_D(M, KB, VB) INST(64, M, KB, VB, 16) INST(64, M, KB, VB, 64) INST(128, M, KB, VB, 16) INST(128, M, KB, VB, 64)
INST_D(DENSE, 16, 16)
INST_D(KIVI, 2, 2) INST_D(KIVI, 3, 3) INST_D(KIVI, 4, 4) INST_D(KIVI, 8, 8) INST_D(KIVI, 16, 16) INST_D(KIVI, 2, 4)
INST_D(NQKV_TOKEN, 2, 2) INST_D(NQKV_TOKEN, 3, 3) INST_D(NQKV_TOKEN, 4, 4)
INST_D(NQKV_CHANNEL, 2, 2) INST_D(NQKV_CHANNEL, 3, 3) INST_D(NQKV_CHANNEL, 4, 4)
INST_D(PATTERN, 2, 2) INST_D(PATTERN, 3, 3) INST_D(PATTERN, 4, 4)
#endif
