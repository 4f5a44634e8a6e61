// The matmuls of a decode step: y (M, N) = x (M, K) . W (N, K)^T (+ b) for M <= 8 rows (a step's
// tokens), fp16 in and out, float32 sums. A CuPy matmul costs ~27 us of host time per call and
// CuPy refuses cuBLAS calls inside a CUDA-graph capture; this is one plain kernel launch.
// Bound by reading W once: each warp streams R rows of W, 16 bytes per lane per load with U loads
// in flight per row, and reads x (a few KB, L1/L2-resident) once per R rows.
#include "common.cuh"

namespace {

// 8 products of fp16 pairs, summed in float32
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b, float s) {
    const __half2* x = reinterpret_cast<const __half2*>(&a);
    const __half2* y = reinterpret_cast<const __half2*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 fx = __half22float2(x[i]), fy = __half22float2(y[i]);
        s = fmaf(fx.x, fy.x, s);
        s = fmaf(fx.y, fy.y, s);
    }
    return s;
}
}  // namespace

// x (M, K), w (N, K), bias (N) or null, y (M, N): all contiguous fp16, K a multiple of 8 and
// rows 16-byte aligned. R rows of W per warp (the wrapper picks it), U = 8 / R 16-byte loads per
// lane per row and iteration: 8 loads in flight. Blocks of 256 threads: 8 R rows of W per block.
template <int M, int R>
__global__ void __launch_bounds__(256) gemv(const __half* __restrict__ x, const __half* __restrict__ w,
                                            const __half* __restrict__ bias, __half* __restrict__ y, int N, int K) {
    constexpr int U = 8 / R;
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * R;
    if (n0 >= N) return;  // warp-uniform
    const int K8 = K / 8;  // 16-byte chunks per row
    const uint4* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint4*>(w + (size_t)min(n0 + r, N - 1) * K);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;
    for (int c = lane; c < K8; c += 32 * U) {
        uint4 wv[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r)  // W is read once: streamed past L1
                wv[u][r] = c + 32 * u < K8 ? __ldcs(wr[r] + c + 32 * u) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c + 32 * u >= K8) break;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 xv = __ldg(xr + (size_t)m * K8 + c + 32 * u);
#pragma unroll
                for (int r = 0; r < R; ++r) acc[m][r] = dot8(xv, wv[u][r], acc[m][r]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);
            // lane m R + r writes (m, n0 + r): the warp's M R outputs in one store instruction
            if (lane == m * R + r && n0 + r < N) {
                // as ArrayOps.linear: the product rounded to fp16, then the fp16 bias added
                const __half v = __float2half_rn(acc[m][r]);
                y[(size_t)m * N + n0 + r] = bias ? __hadd(v, bias[n0 + r]) : v;
            }
        }
}

#ifdef MINIKV_INSTANTIATE_ALL  // the CI compile check builds every variant the wrapper can ask for
template __global__ void gemv<1, 2>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<2, 2>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<3, 2>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<4, 4>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<5, 4>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<6, 4>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<7, 4>(const __half*, const __half*, const __half*, __half*, int, int);
template __global__ void gemv<8, 4>(const __half*, const __half*, const __half*, __half*, int, int);
#endif
