// PatternKV's KMeans mining at the first flush (oracle: minikv/kv/patterns.py kmeans and
// nearest_l2; included by patternkv.cu, whose wrappers give the launch shapes). Built with
// --fmad=false, ops spelled _rn.
// Exactness: minmax_assign, chebyshev_centre, v_use_residual are the oracle's float32 ops in its
// order (max/min are exact in any order). KMeans and nearest_l2 decide in float64 like the oracle
// (a point's nearest centre: tensor cores, with float64 wherever they cannot tell; nearest.cuh):
//  * a sum over D of squares is numpy's pairwise sum (D % 8 == 0, D <= 128: accumulators r[k]
//    over terms k, k+8, ..., then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))): lane k of a group of 8
//    lanes holds r[k] and an xor-shuffle tree adds them (IEEE addition commutes);
//  * the mean of |x|^2 over the points is numpy's whole pairwise recursion (km_limit);
//  * sums of fp16 values are exact in float64: column and cluster sums use atomics;
//  * a dot product x.c is one FMA chain over d = 0..D-1, as BLAS micro-kernels do; in the
//    farthest-point init both sides are fp16 values and the dots are exact in any order.
// Ties go to the lowest index everywhere, as numpy's argmin/argmax and stable argsort.
// The points x (T) are fp16 or float32 (the same values: the cache hands over fp16 ones, half the
// bytes, so that a prefill's sets stay in L2 across the m + 1 seed rounds and the Lloyd steps).
#pragma once
#include "kivi.cuh"     // kivi::Rows, kivi::Slots: a flush's token rows and index storage
#include "nearest.cuh"  // the nearest-centre search, and the float64 helpers (sq8, tree8, ...)

namespace {

constexpr int TT = 16;     // tokens per block (minmax_assign)
constexpr int NONE = 0x7fffffff;  // index of no candidate (after every real one)

// (a, ia) comes before (b, ib): the larger (MAX) or smaller value, ties to the lower index.
template <bool MAX>
__device__ __forceinline__ bool first(double a, int ia, double b, int ib) {
    return (MAX ? a > b : a < b) || (a == b && ia < ib);
}

// The block's first (value, index) pair; every thread gets it. sv, si: 32 entries each.
template <bool MAX>
__device__ void block_first(double& v, int& i, double* sv, int* si) {
    for (int o = 16; o > 0; o >>= 1) {
        const double w = __shfl_xor_sync(FULL, v, o);
        const int j = __shfl_xor_sync(FULL, i, o);
        if (first<MAX>(w, j, v, i)) v = w, i = j;
    }
    __syncthreads();  // the scratch may still be read by a previous call
    if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = v, si[threadIdx.x >> 5] = i;
    __syncthreads();
    v = sv[0], i = si[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
        if (first<MAX>(sv[w], si[w], v, i)) v = sv[w], i = si[w];
}

// numpy's pairwise_sum (numpy/_core/src/umath/loops_utils.h.src): a run of n <= 128 terms ...
__device__ double np_run(const double* a, int n) {
    double s = 0.0, r[8];
    int i = 0;
    if (n < 8) {
        for (; i < n; ++i) s = __dadd_rn(s, a[i]);
        return s;
    }
    for (int k = 0; k < 8; ++k) r[k] = a[k];
    for (i = 8; i < n - n % 8; i += 8)
        for (int k = 0; k < 8; ++k) r[k] = __dadd_rn(r[k], a[i + k]);
    s = __dadd_rn(__dadd_rn(__dadd_rn(r[0], r[1]), __dadd_rn(r[2], r[3])),
                  __dadd_rn(__dadd_rn(r[4], r[5]), __dadd_rn(r[6], r[7])));
    for (; i < n; ++i) s = __dadd_rn(s, a[i]);
    return s;
}

// ... above 128 terms, the sum of the halves split at n / 2 rounded down to a multiple of 8.
// np_tree walks that tree over [s, s + n): it lists the runs' starts (part == nullptr) or adds
// up the runs' sums part[] (k counts the runs).
__device__ double np_tree(int s, int n, int* start, const double* part, int& k) {
    if (n <= 128) return part ? part[k++] : (start[k++] = s, 0.0);
    const int h = n / 2 - (n / 2) % 8;
    const double a = np_tree(s, h, start, part, k);
    return __dadd_rn(a, np_tree(s + h, n - h, start, part, k));
}

}  // namespace

// x2 (N, P) float64 = numpy's pairwise |x_p|^2, 8 lanes per point; colsum (N, D) float64 (zeroed)
// += the block's column sums. x (N, P, D) fp16 or float32 (T). Grid (ceil(P / 256), N), 256 threads.
template <int D, class T>
__global__ void __launch_bounds__(256) km_prep(const T* __restrict__ x, int P, double* x2, double* colsum) {
    const int set = blockIdx.y, p0 = blockIdx.x * 256;
    const T* xs = x + (size_t)set * P * D;
    for (int p = p0 + (threadIdx.x >> 3); p < p0 + 256; p += 32) {
        const T* xp = xs + (size_t)min(p, P - 1) * D;
        const double s = sq8<D>([&](int i) { return as_f64(xp[i]); });
        if (p < P && (threadIdx.x & 7) == 0) x2[(size_t)set * P + p] = s;
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        double s = 0.0;
        for (int p = p0; p < min(P, p0 + 256); ++p) s += as_f64(xs[(size_t)p * D + d]);
        atomicAdd(colsum + (size_t)set * D + d, s);
    }
}

// limit (N,) = tol2 * mean(x2[set]) with numpy's pairwise sum: thread 0 lists the runs, the
// block sums them in parallel, thread 0 joins them. One block per set; P <= 65536.
extern "C" __global__ void km_limit(const double* __restrict__ x2, int P, double tol2, double* __restrict__ limit) {
    __shared__ int start[1025];
    __shared__ double part[1024];
    __shared__ int runs;
    const double* a = x2 + (size_t)blockIdx.x * P;
    int k = 0;
    if (threadIdx.x == 0) np_tree(0, P, start, nullptr, k), start[k] = P, runs = k;
    __syncthreads();
    for (int i = threadIdx.x; i < runs; i += blockDim.x) part[i] = np_run(a + start[i], start[i + 1] - start[i]);
    __syncthreads();
    k = 0;
    if (threadIdx.x == 0) limit[blockIdx.x] = __dmul_rn(tol2, __ddiv_rn(np_tree(0, P, start, part, k), (double)P));
}

// Farthest-point init, round r = 0..m (m + 1 launches). Grid (B, N), 256 threads = 32 groups of
// 8 lanes, one point per group at a time; block b holds points [b * TP, (b + 1) * TP), TP % 32 == 0.
// Round r >= 1 first reduces round r - 1's per-block candidates cand_v/cand_i (2, N, B) to its
// winner w, whose point is centre r - 1 of c (N, m, D) float64 (written by block 0). Round 0
// offers -|x - mean|^2 (argmin as an argmax); round r >= 1 sets dmin (N, P) = min(dmin, d),
// d = (x2 - 2 x.w) + |w|^2, and offers dmin. Each block offers its first (value, index).
template <int D, class T>
__global__ void __launch_bounds__(256) km_seed(const T* __restrict__ x, int P, int m, int r, int TP,
                                               const double* x2, const double* colsum, double* dmin,
                                               double* cand_v, int* cand_i, double* c) {
    __shared__ double ref[D], sv[32];  // ref: the mean (round 0) or centre r - 1
    __shared__ int si[32];
    const int set = blockIdx.y, B = gridDim.x, N = gridDim.y;
    const T* xs = x + (size_t)set * P * D;
    if (r == 0)
        for (int d = threadIdx.x; d < D; d += blockDim.x) ref[d] = __ddiv_rn(colsum[(size_t)set * D + d], (double)P);
    else {
        const size_t o = ((size_t)((r - 1) & 1) * N + set) * B;
        double v = -inf();
        int w = NONE;  // the winner
        for (int b = threadIdx.x; b < B; b += blockDim.x)
            if (first<true>(cand_v[o + b], cand_i[o + b], v, w)) v = cand_v[o + b], w = cand_i[o + b];
        block_first<true>(v, w, sv, si);
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            ref[d] = as_f64(xs[(size_t)w * D + d]);
            if (blockIdx.x == 0) c[((size_t)set * m + r - 1) * D + d] = ref[d];
        }
        if (r == m) return;
    }
    __syncthreads();
    const double ref2 = sq8<D>([&](int i) { return ref[i]; });  // |w|^2 (unused in round 0)
    double bv = -inf();
    int bi = NONE;
    const int p0 = blockIdx.x * TP;
    for (int p = p0 + (threadIdx.x >> 3); p < p0 + TP; p += 32) {
        const T* xp = xs + (size_t)min(p, P - 1) * D;
        double s, dot = 0.0;
        if (r == 0) s = -sq8<D>([&](int i) { return __dsub_rn(as_f64(xp[i]), ref[i]); });
        else {
            for (int i = threadIdx.x & 7; i < D; i += 8) dot = __fma_rn(as_f64(xp[i]), ref[i], dot);
            dot = tree8(dot);
        }
        if (p >= P || (threadIdx.x & 7)) continue;  // lane 0 of the group goes on
        if (r > 0) {
            double* dm = dmin + (size_t)set * P + p;
            const double d = __dadd_rn(__dsub_rn(x2[(size_t)set * P + p], __dmul_rn(2.0, dot)), ref2);
            s = *dm = (r == 1 || d < *dm) ? d : *dm;
        }
        if (first<true>(s, p, bv, bi)) bv = s, bi = p;
    }
    block_first<true>(bv, bi, sv, si);
    const size_t o = ((size_t)(r & 1) * N + set) * B + blockIdx.x;
    if (threadIdx.x == 0) cand_v[o] = bv, cand_i[o] = bi;
}

// nearest_l2 of a flush's tokens, written as pattern indices: token t < TS of set s (kivi::Rows
// x, fp16 or float32) against the first m of the set's Mc centres cen[slots.base(s) * Mc * D]
// (C: float32 or fp16), index to out[slots.at(s, t)] uint8 (m <= 256). Grid (ceil(TS / 128), S),
// 128 threads.
template <int D, class T, class C>
__global__ void __launch_bounds__(KP) km_assign(const T* __restrict__ x, long long xb, long long xh, long long xt,
                                                int H, const int* __restrict__ rows, const C* __restrict__ cen, int Mc,
                                                int m, unsigned char* __restrict__ out, int cap, int off, int TS) {
    __shared__ NearSmem<D> s;
    const int set = blockIdx.y, t0 = blockIdx.x * KP, t = t0 + threadIdx.x;
    const kivi::Slots slots{rows, H, cap, off};
    const kivi::Rows<T> xr{x, xb, xh, xt, H};
    const int bj = nearest<D, false, T>([&](int i) { return xr.row(set, min(t0 + i, TS - 1)); }, t < TS,
                                        cen + slots.base(set) * Mc * D, m, 0.0, s);
    if (t < TS) out[slots.at(set, t)] = (unsigned char)bj;
}

// The Lloyd update of one set by one block (after every point's assignment a, m <= 256): the
// k-th empty cluster (in index order) takes the k-th point in order of decreasing distance to
// its own centre (ties: lower index; round k finds the first point after round k - 1's), the
// others sums / counts. move = max_j |new_j - c_j|^2 (numpy pairwise); active = move > limit.
// c (N, m, D) float64 is updated in place; sums and counts are zeroed for the next step. Other
// blocks wrote a, sums and counts in this launch: they are read past L1 (__ldcg). far (N, P):
// scratch for the distances, computed only when a cluster is empty (as the oracle's d).
template <int D, class T>
__device__ void lloyd_update(const T* __restrict__ x, int P, int m, int set, const int* a, const double* x2,
                             double* far, const double* limit, double* c, double* sums, int* counts, int* active) {
    __shared__ int n_of[256], rank[256], pick[256], warp_empty[32], si[32];
    __shared__ double sv[32], c2[256];
    int* cnt = counts + (size_t)set * m;
    double* cs = c + (size_t)set * m * D;
    double* ss = sums + (size_t)set * m * D;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int G = blockDim.x >> 3, mpad = (m + G - 1) / G * G;  // 8 lanes per centre, all lanes in step
    int n_empty = 0;  // rank[j]: empty clusters before j (a ballot prefix count per chunk)
    for (int j0 = 0; j0 < m; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x;
        const int n = j < m ? __ldcg(cnt + j) : 1;
        const unsigned e = __ballot_sync(FULL, n == 0);
        __syncthreads();  // warp_empty of the previous chunk is read
        if (lane == 0) warp_empty[warp] = __popc(e);
        __syncthreads();
        int before = n_empty;
        for (int v = 0; v < warp; ++v) before += warp_empty[v];
        if (j < m) n_of[j] = n, rank[j] = n == 0 ? before + __popc(e & ((1u << lane) - 1)) : -1;
        for (int v = 0; v < warps; ++v) n_empty += warp_empty[v];
    }
    if (n_empty > 0) {  // far: each point's float64 distance to its (old) centre, as the oracle's d
        for (int j = threadIdx.x >> 3; j < mpad; j += G) {
            const double r = sq8<D>([&](int i) { return j < m ? cs[(size_t)j * D + i] : 0.0; });
            if ((threadIdx.x & 7) == 0 && j < m) c2[j] = r;
        }
        __syncthreads();
        for (int p = threadIdx.x; p < P; p += blockDim.x) {
            const size_t q = (size_t)set * P + p;
            const int j = __ldcg(a + q);
            far[q] = exact_d<D, true>(x + q * D, cs + (size_t)j * D, x2[q], c2[j]);
        }
        __syncthreads();
    }
    const double* fs = far + (size_t)set * P;
    double pv = inf();
    int pi = -1;  // the previous round's pick
    for (int e = 0; e < n_empty; ++e) {
        double v = -inf();
        int i = NONE;
        for (int p = threadIdx.x; p < P; p += blockDim.x) {
            const double f = __ldcg(fs + p);
            if (first<true>(pv, pi, f, p) && first<true>(f, p, v, i)) v = f, i = p;
        }
        block_first<true>(v, i, sv, si);
        pv = v, pi = i;
        if (threadIdx.x == 0) pick[e] = i;
    }
    __syncthreads();
    double move = 0.0;
    for (int j = threadIdx.x >> 3; j < mpad; j += G) {  // new centre j and |new - c|^2 (sq8's order), 8 lanes
        const bool ok = j < m;
        const int n = ok ? n_of[j] : 1;
        const T* xp = x + ((size_t)set * P + (ok && n == 0 ? pick[rank[j]] : 0)) * D;
        double r = 0.0;
        for (int u0 = 0; u0 < D / 8; u0 += U) {
            double sum[U], old[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {  // U loads in flight before the first use
                const size_t e = (size_t)(ok ? j : 0) * D + (threadIdx.x & 7) + 8 * (u0 + u);
                sum[u] = n ? __ldcg(ss + e) : as_f64(xp[e % D]);
                old[u] = cs[e];
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const size_t e = (size_t)j * D + (threadIdx.x & 7) + 8 * (u0 + u);
                const double nw = n ? __ddiv_rn(sum[u], (double)n) : sum[u], df = __dsub_rn(nw, old[u]);
                if (ok) cs[e] = nw, ss[e] = 0.0;
                r = __dadd_rn(r, __dmul_rn(df, df));
            }
        }
        r = tree8(r);
        if (ok) move = r > move ? r : move;
    }
    int unused = 0;
    block_first<true>(move, unused, sv, si);  // the block's max
    for (int j = threadIdx.x; j < m; j += blockDim.x) cnt[j] = 0;
    if (threadIdx.x == 0) active[set] = move > limit[set];
}

// The block's cluster sums and counts added into gs (m, D) and gc (m): its np points (rows of xb,
// cluster pa[i]) counting-sorted by cluster, then thread d walks column d in that order, adding
// a cluster's run in a register and flushing it with one atomic (sums of fp16 values are exact
// in float64, so any order gives the oracle's sums). cnt, start: m ints of scratch, ord: np.
template <int D, class T>
__device__ void block_sums(const T* __restrict__ xb, int np, int m, const int* pa, double* gs, int* gc, int* cnt,
                           int* start, int* ord) {
    const int i = threadIdx.x;
    for (int j = i; j < m; j += blockDim.x) cnt[j] = 0;
    __syncthreads();
    for (int k = i; k < np; k += blockDim.x) atomicAdd(cnt + pa[k], 1);
    __syncthreads();
    if (i < 32) {  // start = cnt's exclusive prefix sum: lane l scans entries [8 l, 8 l + 8) (m <= 256)
        int tot = 0, incl;
        for (int j = 8 * i; j < min(m, 8 * i + 8); ++j) tot += cnt[j];
        incl = tot;
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(FULL, incl, o);
            if (i >= o) incl += v;
        }
        for (int j = 8 * i, run = incl - tot; j < min(m, 8 * i + 8); ++j) start[j] = run, run += cnt[j];
    }
    __syncthreads();
    for (int k = i; k < np; k += blockDim.x) ord[atomicAdd(start + pa[k], 1)] = k;
    __syncthreads();
    const int parts = blockDim.x / D, d = i % D, part = i / D;  // D = 64: two halves of the points per column
    const int lo = part * np / parts, hi = (part + 1) * np / parts;
    constexpr int UW = 16;  // rows in flight: a 256-point walk is 16 trips to L2
    double sum = 0.0;
    int jc = -1;
    for (int i0 = lo; i0 < hi; i0 += UW) {
        double v[UW];
        int jj[UW];
#pragma unroll
        for (int u = 0; u < UW; ++u) {
            const int k = i0 + u < hi ? ord[i0 + u] : ord[lo];
            v[u] = as_f64(xb[(size_t)k * D + d]), jj[u] = pa[k];
        }
#pragma unroll
        for (int u = 0; u < UW; ++u) {
            if (i0 + u >= hi) break;
            if (jj[u] != jc) {
                if (jc >= 0) atomicAdd(gs + (size_t)jc * D + d, sum);
                sum = 0.0, jc = jj[u];
            }
            sum = __dadd_rn(sum, v[u]);
        }
    }
    if (jc >= 0) atomicAdd(gs + (size_t)jc * D + d, sum);
    for (int j = i; j < m; j += blockDim.x)
        if (cnt[j]) atomicAdd(gc + j, cnt[j]);
}

// One Lloyd step of the active sets in one launch. Grid (ceil(P / (KT KP)), N), KP threads: KT
// tiles of KP points per block (fewer blocks, fewer atomics), a thread per point of a tile: its
// nearest centre (a (N, P) int32), then the block's cluster sums added into sums (N, m, D) /
// counts (N, m), both zero on entry. The set's last block to finish (done (N,) counts them,
// reset after) applies the update; far (N, P) is its scratch.
constexpr int KT = 2;
template <int D, class T>  // 4 blocks per SM: at its own choice of ~140 registers (3 blocks), a step takes 1.3x as long
__global__ void __launch_bounds__(KP, 4) km_step(const T* __restrict__ x, int P, int m, const double* x2,
                                              const double* limit, double* c, int* a, double* far, double* sums,
                                              int* counts, int* done, int* active) {
    __shared__ NearSmem<D> s;
    __shared__ int pa[KT * KP], ord[KT * KP], cnt[256], start[256];
    __shared__ bool last;
    const int set = blockIdx.y, p0 = blockIdx.x * KT * KP, np = min(P - p0, KT * KP);
    if (!active[set]) return;
    const T* xs = x + (size_t)set * P * D;
    for (int q0 = p0; q0 < p0 + np; q0 += KP) {  // the centres stay staged across tiles where m <= CH
        const int p = q0 + threadIdx.x;
        const int bj = nearest<D, true, T>([&](int i) { return xs + (size_t)min(q0 + i, P - 1) * D; }, p < P,
                                           c + (size_t)set * m * D, m, p < P ? x2[(size_t)set * P + p] : 0.0, s,
                                           q0 > p0 && m <= CH);
        if (p < P) a[(size_t)set * P + p] = bj;
        pa[q0 - p0 + threadIdx.x] = bj;
    }
    block_sums<D>(xs + (size_t)p0 * D, np, m, pa, sums + (size_t)set * m * D, counts + (size_t)set * m, cnt, start, ord);
    __threadfence();  // this block's a, sums and counts are visible before it counts as done
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done + set, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    lloyd_update<D>(x, P, m, set, a, x2, far, limit, c, sums, counts, active);
    if (threadIdx.x == 0) done[set] = 0;
}
