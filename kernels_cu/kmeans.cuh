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
// The points x (T) are fp16 or float32 (the same values: the cache hands over fp16 ones, half the
// bytes, so that a prefill's sets stay in L2 across the m + 1 seed rounds and the Lloyd steps).
#pragma once
#include "kivi.cuh"  // kivi::Rows, kivi::Slots: a flush's token rows and index storage

namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr int U = 8;       // independent loads a thread issues before using them
constexpr int CH = 32;     // centres per shared-memory chunk (nearest; km_step's sums where m <= CH)
constexpr int TT = 16;     // tokens per block (minmax_assign)
constexpr int NONE = 0x7fffffff;  // index of no candidate (after every real one)

__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }  // NVRTC: no INFINITY

__device__ __forceinline__ double as_f64(double v) { return v; }
__device__ __forceinline__ double as_f64(float v) { return v; }
__device__ __forceinline__ double as_f64(__half v) { return __half2float(v); }

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

// The nearest centre of this thread's point xp (ok: a real point; all threads of the block must
// call it, it syncs). Centres cen (M, D) of the point's set go through shared memory CH at a time
// as float64, with numpy's pairwise |c|^2. KM (a KMeans step): cen float64, d = (xx - 2 x.c) +
// |c|^2, xx = |x|^2; !KM (nearest_l2): cen float32 or fp16, d = |c|^2 - 2 x.c. Returns (distance,
// index) through best / bj.
template <int D, bool KM, class T, class C>
__device__ __forceinline__ void nearest(const T* __restrict__ xp, bool ok, const C* __restrict__ cen, int M, double xx,
                                        double (&cs)[CH][D], double* c2, double& best, int& bj) {
    best = inf(), bj = 0;
    for (int j0 = 0; j0 < M; j0 += CH) {
        const int mc = min(CH, M - j0);
        __syncthreads();  // the previous chunk is done with
        for (int e0 = threadIdx.x; e0 < CH * D; e0 += U * blockDim.x) {  // U loads in flight, then U stores
            double v[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int e = e0 + u * blockDim.x;
                v[u] = e >= mc * D ? 0.0 : as_f64(cen[(size_t)j0 * D + e]);
            }
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (e0 + u * blockDim.x < CH * D) (&cs[0][0])[e0 + u * blockDim.x] = v[u];
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
            float xv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (ok) minikv::quant::ld4(xp + d, xv);
            const double x0 = xv[0], x1 = xv[1], x2 = xv[2], x3 = xv[3];  // converted once, not per centre
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                if (j >= mc) continue;
                const double2 u = *reinterpret_cast<const double2*>(&cs[j][d]);
                const double2 v = *reinterpret_cast<const double2*>(&cs[j][d + 2]);
                acc[j] = __fma_rn(x3, v.y, __fma_rn(x2, v.x, __fma_rn(x1, u.y, __fma_rn(x0, u.x, acc[j]))));
            }
        }
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const double t = __dmul_rn(2.0, acc[j]);
            const double d = KM ? __dadd_rn(__dsub_rn(xx, t), c2[j]) : __dsub_rn(c2[j], t);
            if (j < mc && d < best) best = d, bj = j0 + j;
        }
    }
}

// nearest_l2 of a flush's tokens, written as pattern indices: token t < TS of set s (kivi::Rows
// x, fp16 or float32) against the first m of the set's Mc centres cen[slots.base(s) * Mc * D]
// (C: float32 or fp16), index to out[slots.at(s, t)] uint8 (m <= 256). Grid (ceil(TS / 128), S),
// 128 threads.
template <int D, class T, class C>
__global__ void __launch_bounds__(128) km_assign(const T* __restrict__ x, long long xb, long long xh, long long xt,
                                                 int H, const int* __restrict__ rows, const C* __restrict__ cen, int Mc,
                                                 int m, unsigned char* __restrict__ out, int cap, int off, int TS) {
    __shared__ __align__(16) double cs[CH][D];
    __shared__ double c2[CH];
    const int set = blockIdx.y, t = blockIdx.x * blockDim.x + threadIdx.x;
    const kivi::Slots slots{rows, H, cap, off};
    double best;
    int bj;
    nearest<D, false>(kivi::Rows<T>{x, xb, xh, xt, H}.row(set, t < TS ? t : 0), t < TS, cen + slots.base(set) * Mc * D,
                      m, 0.0, cs, c2, best, bj);
    if (t < TS) out[slots.at(set, t)] = (unsigned char)bj;
}

// The Lloyd update of one set by one block (after every point's assignment, m <= 256): the
// k-th empty cluster (in index order) takes the k-th point in order of decreasing far (ties:
// lower index; round k finds the first point after round k - 1's), the others sums / counts.
// move = max_j |new_j - c_j|^2 (numpy pairwise); active = move > limit. c (N, m, D) float64 is
// updated in place; sums and counts are zeroed for the next step. Other blocks wrote far, sums
// and counts in this launch: they are read past L1 (__ldcg). diff: CH * D doubles of scratch.
template <int D, class T>
__device__ void lloyd_update(const T* __restrict__ x, int P, int m, int set, const double* far,
                             const double* limit, double* c, double* sums, int* counts, int* active, double* diff) {
    __shared__ int n_of[256], rank[256], pick[256], warp_empty[32], si[32];
    __shared__ double sv[32];
    int* cnt = counts + (size_t)set * m;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
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
    double* cs = c + (size_t)set * m * D;
    double* ss = sums + (size_t)set * m * D;
    for (int j0 = 0; j0 < m; j0 += CH) {  // new centres and their differences, CH at a time
        const int mc = min(CH, m - j0);
        for (int e0 = threadIdx.x; e0 < mc * D; e0 += U * blockDim.x) {  // U loads in flight, then U stores
            double sum[U], old[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int e = min(e0 + u * (int)blockDim.x, mc * D - 1), j = j0 + e / D, n = n_of[j];
                sum[u] = n ? __ldcg(ss + (size_t)j0 * D + e) : as_f64(x[((size_t)set * P + pick[rank[j]]) * D + e % D]);
                old[u] = cs[(size_t)j0 * D + e];
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int e = e0 + u * blockDim.x, n = e < mc * D ? n_of[j0 + e / D] : 0;
                if (e >= mc * D) break;
                const double nw = n ? __ddiv_rn(sum[u], (double)n) : sum[u];
                diff[e] = __dsub_rn(nw, old[u]);
                cs[(size_t)j0 * D + e] = nw, ss[(size_t)j0 * D + e] = 0.0;
            }
        }
        __syncthreads();
        for (int j = threadIdx.x >> 3; j < CH; j += blockDim.x >> 3) {  // |new - c|^2, 8 lanes per centre
            const double mv = sq8<D>([&](int i) { return j < mc ? diff[j * D + i] : 0.0; });
            move = mv > move ? mv : move;
        }
        __syncthreads();
    }
    int unused = 0;
    block_first<true>(move, unused, sv, si);  // the block's max
    for (int j = threadIdx.x; j < m; j += blockDim.x) cnt[j] = 0;
    if (threadIdx.x == 0) active[set] = move > limit[set];
}

// One Lloyd step of the active sets in one launch. Grid (ceil(P / 128), N), 128 threads, a
// thread per point: the nearest centre (a (N, P) int32, far (N, P) its distance), then the
// block's cluster sums (in shared memory where m <= CH, else straight to global atomics; sums
// of fp16 values are exact in float64, so any order gives the same sums) added into
// sums (N, m, D) / counts (N, m), both zero on entry. The set's last block to finish (done
// (N,) counts them, reset after) applies the update.
template <int D, class T>
__global__ void __launch_bounds__(128) km_step(const T* __restrict__ x, int P, int m, const double* x2,
                                               const double* limit, double* c, int* a, double* far, double* sums,
                                               int* counts, int* done, int* active) {
    __shared__ __align__(16) double cs[CH][D];  // centres, then the block's cluster sums
    __shared__ double c2[CH];
    __shared__ int pa[128], cnt[256];
    __shared__ bool last;
    const int set = blockIdx.y, p0 = blockIdx.x * blockDim.x, p = p0 + threadIdx.x, np = min(P - p0, (int)blockDim.x);
    if (!active[set]) return;
    double best;
    int bj;
    nearest<D, true>(x + ((size_t)set * P + (p < P ? p : 0)) * D, p < P, c + (size_t)set * m * D, m,
                     p < P ? x2[(size_t)set * P + p] : 0.0, cs, c2, best, bj);
    if (p < P) a[(size_t)set * P + p] = bj, far[(size_t)set * P + p] = best;
    pa[threadIdx.x] = bj;
    for (int j = threadIdx.x; j < m; j += blockDim.x) cnt[j] = 0;
    const bool local = m <= CH;
    double* acc = &cs[0][0];
    __syncthreads();  // every thread is done with cs
    for (int e = threadIdx.x; local && e < m * D; e += blockDim.x) acc[e] = 0.0;
    if (threadIdx.x < np) atomicAdd(cnt + bj, 1);
    __syncthreads();
    double* gs = sums + (size_t)set * m * D;
    const T* xb = x + ((size_t)set * P + p0) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x)  // thread d owns column d: no conflicts
        for (int i0 = 0; i0 < np; i0 += U) {
            double v[U];
#pragma unroll
            for (int u = 0; u < U; ++u) v[u] = i0 + u < np ? as_f64(xb[(size_t)(i0 + u) * D + d]) : 0.0;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (i0 + u >= np) break;
                if (local) acc[pa[i0 + u] * D + d] += v[u];
                else atomicAdd(gs + pa[i0 + u] * D + d, v[u]);
            }
        }
    __syncthreads();
    for (int e = threadIdx.x; local && e < m * D; e += blockDim.x)
        if (cnt[e / D]) atomicAdd(gs + e, acc[e]);
    for (int j = threadIdx.x; j < m; j += blockDim.x)
        if (cnt[j]) atomicAdd(counts + (size_t)set * m + j, cnt[j]);
    __threadfence();  // this block's a, far, sums and counts are visible before it counts as done
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done + set, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    lloyd_update<D>(x, P, m, set, far, limit, c, sums, counts, active, &cs[0][0]);
    if (threadIdx.x == 0) done[set] = 0;
}
