// PatternKV's KMeans mining at the first flush (oracle: minikv/kv/patterns.py kmeans and
// nearest_l2; included by patternkv.cu, whose wrappers give the launch shapes). Built with
// --fmad=false, ops spelled _rn.
// Exactness: minmax_assign, chebyshev_centre, v_use_residual are the oracle's float32 ops in its
// order (max/min are exact in any order). KMeans and nearest_l2 run in float64 like the oracle:
//  * a sum over D of squares is numpy's pairwise sum (D % 8 == 0, D <= 128: accumulators r[k]
//    over terms k, k+8, ..., then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))): lane k of a group of 8
//    lanes holds r[k] and an xor-shuffle tree adds them (IEEE addition commutes);
//  * the mean of |x|^2 over the points is numpy's whole pairwise recursion (km_limit);
//  * sums of fp16 values are exact in float64: column and cluster sums use atomics;
//  * a dot product x.c is one FMA chain over d = 0..D-1, as BLAS micro-kernels do; in the
//    farthest-point init both sides are fp16 values and the dots are exact in any order.
// Ties go to the lowest index everywhere, as numpy's argmin/argmax and stable argsort.
#pragma once
#include "common.cuh"

namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr int CH = 32;     // centres per shared-memory chunk (km_assign)
constexpr int ACC = 5120;  // doubles of per-block cluster sums in shared memory (km_sums)
constexpr int TT = 16;     // tokens per block (minmax_assign)
constexpr int NONE = 0x7fffffff;  // index of no candidate (after every real one)

__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }  // NVRTC: no INFINITY

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

// numpy's tree over the 8 accumulators of a group of 8 lanes (lane k holds r[k]).
__device__ __forceinline__ double tree8(double r) {
    r = __dadd_rn(r, __shfl_xor_sync(FULL, r, 1));
    r = __dadd_rn(r, __shfl_xor_sync(FULL, r, 2));
    return __dadd_rn(r, __shfl_xor_sync(FULL, r, 4));
}

// numpy's pairwise sum over i < D of t(i)^2, by the 8 lanes of a group (all 32 lanes of the
// warp must call it). Starting r[k] at 0 is exact: squares are >= +0.
template <int D, class F>
__device__ __forceinline__ double sq8(F t) {
    double r = 0.0, v;
    for (int i = threadIdx.x & 7; i < D; i += 8) v = t(i), r = __dadd_rn(r, __dmul_rn(v, v));
    return tree8(r);
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
// += the block's column sums. x (N, P, D) float32. Grid (ceil(P / 256), N), 256 threads.
template <int D>
__global__ void __launch_bounds__(256) km_prep(const float* __restrict__ x, int P, double* x2, double* colsum) {
    const int set = blockIdx.y, p0 = blockIdx.x * 256;
    const float* xs = x + (size_t)set * P * D;
    for (int p = p0 + (threadIdx.x >> 3); p < p0 + 256; p += 32) {
        const float* xp = xs + (size_t)min(p, P - 1) * D;
        const double s = sq8<D>([&](int i) { return (double)xp[i]; });
        if (p < P && (threadIdx.x & 7) == 0) x2[(size_t)set * P + p] = s;
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        double s = 0.0;
        for (int p = p0; p < min(P, p0 + 256); ++p) s += xs[(size_t)p * D + d];
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
template <int D>
__global__ void __launch_bounds__(256) km_seed(const float* __restrict__ x, int P, int m, int r, int TP,
                                               const double* x2, const double* colsum, double* dmin,
                                               double* cand_v, int* cand_i, double* c) {
    __shared__ double ref[D], sv[32];  // ref: the mean (round 0) or centre r - 1
    __shared__ int si[32];
    const int set = blockIdx.y, B = gridDim.x, N = gridDim.y;
    const float* xs = x + (size_t)set * P * D;
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
            ref[d] = xs[(size_t)w * D + d];
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
        const float* xp = xs + (size_t)min(p, P - 1) * D;
        double s, dot = 0.0;
        if (r == 0) s = -sq8<D>([&](int i) { return __dsub_rn(xp[i], ref[i]); });
        else {
            for (int i = threadIdx.x & 7; i < D; i += 8) dot = __fma_rn(xp[i], ref[i], dot);
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

// The nearest centre per point; thread per point, grid (ceil(P / 128), N), 128 threads. Centres
// go through shared memory CH at a time as float64, with numpy's pairwise |c|^2.
// KM (a KMeans step): cen (N, M, D) float64, d = (x2 - 2 x.c) + |c|^2; writes a32 (N, P) int32
// and far (N, P) = the winning distance; sets with active[set] == 0 are skipped.
// !KM (nearest_l2): cen (N, M, D) float32, d = |c|^2 - 2 x.c; writes a64 (N, P) int64.
template <int D, bool KM>
__global__ void __launch_bounds__(128) km_assign(const float* __restrict__ x, int P, const void* cen, int M,
                                                 const double* x2, const int* active, int* a32, double* far,
                                                 long long* a64) {
    __shared__ __align__(16) double cs[CH][D];
    __shared__ double c2[CH];
    const int set = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
    if (KM && !active[set]) return;
    const bool ok = p < P;
    const float* xp = x + ((size_t)set * P + (ok ? p : 0)) * D;
    const double xx = KM && ok ? x2[(size_t)set * P + p] : 0.0;
    double best = inf();
    int bj = 0;
    for (int j0 = 0; j0 < M; j0 += CH) {
        const int mc = min(CH, M - j0);
        __syncthreads();  // the previous chunk is done with
        for (int e = threadIdx.x; e < CH * D; e += blockDim.x) {
            const size_t src = ((size_t)set * M + j0) * D + e;
            (&cs[0][0])[e] = e >= mc * D ? 0.0 : KM ? static_cast<const double*>(cen)[src]
                                                    : (double)static_cast<const float*>(cen)[src];
        }
        __syncthreads();
        for (int j = threadIdx.x >> 3; j < CH; j += blockDim.x >> 3) {
            const double s = sq8<D>([&](int i) { return cs[j][i]; });
            if ((threadIdx.x & 7) == 0) c2[j] = s;
        }
        __syncthreads();
        double acc[CH] = {};
#pragma unroll 1
        for (int d = 0; d < D; d += 4) {
            const float4 xv = *reinterpret_cast<const float4*>(xp + d);
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                if (j >= mc) continue;
                const double2 u = *reinterpret_cast<const double2*>(&cs[j][d]);
                const double2 v = *reinterpret_cast<const double2*>(&cs[j][d + 2]);
                acc[j] = __fma_rn(xv.w, v.y, __fma_rn(xv.z, v.x, __fma_rn(xv.y, u.y, __fma_rn(xv.x, u.x, acc[j]))));
            }
        }
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const double t = __dmul_rn(2.0, acc[j]);
            const double d = KM ? __dadd_rn(__dsub_rn(xx, t), c2[j]) : __dsub_rn(c2[j], t);
            if (j < mc && d < best) best = d, bj = j0 + j;
        }
    }
    if (!ok) return;
    const size_t o = (size_t)set * P + p;
    if (KM) a32[o] = bj, far[o] = best;
    else a64[o] = bj;
}

// Cluster sums (N, m, D) float64 and counts (N, m) int32 of the active sets; both are zero on
// entry (km_update re-zeroes them). Grid (ceil(P / TP), N), D threads: thread d walks the block's
// points. Per-block sums sit in shared memory where m * D <= ACC, else go to global atomics.
template <int D>
__global__ void __launch_bounds__(D) km_sums(const float* __restrict__ x, int P, int m, int TP,
                                             const int* __restrict__ a, const int* active, double* sums, int* counts) {
    __shared__ double acc[ACC];
    __shared__ int cnt[256];
    const int set = blockIdx.y, d = threadIdx.x;
    if (!active[set]) return;
    const bool local = m * D <= ACC;
    double* gs = sums + (size_t)set * m * D;
    for (int e = d; local && e < m * D; e += D) acc[e] = 0.0;
    for (int j = d; j < m; j += D) cnt[j] = 0;
    __syncthreads();
    const int p1 = min(P, (int)(blockIdx.x + 1) * TP);
#pragma unroll 4
    for (int p = blockIdx.x * TP; p < p1; ++p) {
        const int j = a[(size_t)set * P + p];
        const double v = x[((size_t)set * P + p) * D + d];
        if (local) acc[j * D + d] += v;
        else atomicAdd(gs + j * D + d, v);
        if (d == 0) ++cnt[j];
    }
    __syncthreads();
    for (int e = d; local && e < m * D; e += D)
        if (cnt[e / D]) atomicAdd(gs + e, acc[e]);
    for (int j = d; j < m; j += D)
        if (cnt[j]) atomicAdd(counts + (size_t)set * m + j, cnt[j]);
}

// The Lloyd update of one active set per block (256 threads = 32 groups of 8 lanes, m <= 256).
// The k-th empty cluster (in index order) takes the k-th point in order of decreasing far
// (ties: lower index; round k finds the first point after round k - 1's), the others
// sums / counts. move = max_j |new_j - c_j|^2 (numpy pairwise); active = move > limit.
// c (N, m, D) float64 is updated in place; sums and counts are zeroed for the next step.
template <int D>
__global__ void __launch_bounds__(256) km_update(const float* __restrict__ x, int P, int m, const double* far,
                                                 const double* limit, double* c, double* sums, int* counts,
                                                 int* active) {
    __shared__ int rank[256], pick[256], n_empty, si[32];
    __shared__ double sv[32];
    const int set = blockIdx.x;
    if (!active[set]) return;
    const int* cnt = counts + (size_t)set * m;
    if (threadIdx.x == 0) {
        int e = 0;
        for (int j = 0; j < m; ++j) rank[j] = cnt[j] == 0 ? e++ : -1;
        n_empty = e;
    }
    __syncthreads();
    const double* fs = far + (size_t)set * P;
    double pv = inf();
    int pi = -1;  // the previous round's pick
    for (int e = 0; e < n_empty; ++e) {
        double v = -inf();
        int i = NONE;
        for (int p = threadIdx.x; p < P; p += blockDim.x)
            if (first<true>(pv, pi, fs[p], p) && first<true>(fs[p], p, v, i)) v = fs[p], i = p;
        block_first<true>(v, i, sv, si);
        pv = v, pi = i;
        if (threadIdx.x == 0) pick[e] = i;
    }
    __syncthreads();
    double move = 0.0;
    for (int j0 = 0; j0 < m; j0 += 32) {
        const int j = min(j0 + (int)(threadIdx.x >> 3), m - 1);
        const bool ok = j0 + (int)(threadIdx.x >> 3) < m;
        const int n = cnt[j];
        double* cj = c + ((size_t)set * m + j) * D;
        double* sj = sums + ((size_t)set * m + j) * D;
        const float* xj = x + ((size_t)set * P + (n ? 0 : pick[rank[j]])) * D;
        const double mv = sq8<D>([&](int i) {  // |new - c|^2, writing new over c
            if (!ok) return 0.0;
            const double nw = n ? __ddiv_rn(sj[i], (double)n) : (double)xj[i], diff = __dsub_rn(nw, cj[i]);
            cj[i] = nw, sj[i] = 0.0;
            return diff;
        });
        move = mv > move ? mv : move;
    }
    int unused = 0;
    block_first<true>(move, unused, sv, si);  // the block's max
    for (int j = threadIdx.x; j < m; j += blockDim.x) counts[(size_t)set * m + j] = 0;
    if (threadIdx.x == 0) active[set] = move > limit[set];
}
