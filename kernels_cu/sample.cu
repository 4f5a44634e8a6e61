// Token sampling in one launch (minikv/sampler.py's chain on CuPy costs ~1 ms a token in sorts and
// small kernels): the top-k logits by a radix select on their bits, then, on those k, top-p and
// min-p over the untempered softmax, the temperature, and one draw with the host's uniform u.
// The array-op Sampler is the oracle (same steps; float sums in index order here).
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024, SAMPLE_KMAX = 256;

// Order-preserving key of a float: a larger float has a larger key.
__device__ __forceinline__ unsigned okey(float f) {
    const unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// logits (V,) float32; 0 < k <= SAMPLE_KMAX, k < V. out[0]: the drawn id, or -1 where a logit is
// NaN or +inf or none is finite (the Sampler's "logits not all finite"). One block.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_top(const float* __restrict__ logits, int V, int k,
                                                                        float top_p, float min_p, float temp, float u,
                                                                        int* __restrict__ out) {
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_mask, s_need;
    __shared__ int s_gt, s_eq, s_bad, s_finite;
    __shared__ float cl[SAMPLE_KMAX], sl[SAMPLE_KMAX], w[SAMPLE_KMAX];
    __shared__ int ci[SAMPLE_KMAX], si[SAMPLE_KMAX];
    const int tid = threadIdx.x;
    if (tid == 0) s_prefix = 0u, s_mask = 0u, s_need = (unsigned)k, s_gt = 0, s_eq = 0, s_bad = 0, s_finite = 0;
    __syncthreads();
    // the key of the k-th largest logit, 8 bits a pass from the top; s_need: its rank among equals
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += SAMPLE_THREADS) hist[i] = 0u;
        __syncthreads();
        const unsigned prefix = s_prefix, mask = s_mask;
        int bad = 0, fin = 0;
        for (int i = tid; i < V; i += SAMPLE_THREADS) {
            const float f = logits[i];
            if (shift == 24) bad |= f != f || f == MINIKV_INF, fin |= fabsf(f) < MINIKV_INF;
            const unsigned key = okey(f);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        if (bad) s_bad = 1;
        if (fin) s_finite = 1;
        __syncthreads();
        if (tid == 0) {
            unsigned need = s_need;
            int b = 255;
            for (; b > 0 && hist[b] < need; --b) need -= hist[b];
            s_prefix = prefix | ((unsigned)b << shift), s_mask = mask | (255u << shift), s_need = need;
        }
        __syncthreads();
    }
    // the candidates: every key above the k-th, and the first s_need equal ones to arrive
    const unsigned kth = s_prefix;
    const int eq_take = (int)s_need, gt_n = k - eq_take;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        const float f = logits[i];
        const unsigned key = okey(f);
        if (key > kth) {
            const int p = atomicAdd(&s_gt, 1);
            cl[p] = f, ci[p] = i;
        } else if (key == kth) {
            const int p = atomicAdd(&s_eq, 1);
            if (p < eq_take) cl[gt_n + p] = f, ci[gt_n + p] = i;
        }
    }
    __syncthreads();
    // by descending logit (ties: lower id first): each candidate's rank
    if (tid < k) {
        const float f = cl[tid];
        const int id = ci[tid];
        int r = 0;
        for (int j = 0; j < k; ++j) r += cl[j] > f || (cl[j] == f && ci[j] < id);
        sl[r] = f, si[r] = id;
    }
    __syncthreads();
    if (tid == 0) {
        if (s_bad || !s_finite) {
            out[0] = -1;
            return;
        }
        const float l0 = sl[0];
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) w[j] = expf(sl[j] - l0), sum += w[j];
        // keep: the smallest prefix whose mass reaches top_p, and probabilities >= min_p * the top one's
        float cum = 0.0f, c = 0.0f;
        const float p0 = w[0] / sum;
        for (int j = 0; j < k; ++j) {
            const float p = w[j] / sum;
            cum += p;
            const bool keep = (top_p >= 1.0f || cum - p < top_p) && (min_p <= 0.0f || p >= min_p * p0);
            c += keep ? expf((sl[j] - l0) / temp) : 0.0f;
            w[j] = c;  // the cumulative tempered weights
        }
        const float target = c * u;
        int i = 0;
        while (i < k && w[i] <= target) ++i;  // searchsorted(c, target, side="right")
        out[0] = si[min(i, k - 1)];
    }
}
