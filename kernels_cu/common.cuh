// Shared device helpers for the minikv kernels.
#pragma once
#include <cuda_fp16.h>

// NVRTC (how CuPy compiles these) has no C standard headers: spell out what we use (the same
// types glibc gives them, so nvcc builds that also see <stdint.h> agree).
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
#define MINIKV_INF __int_as_float(0x7f800000)

namespace minikv {

// op (a sum, a max) over a block of blockDim.x threads (a multiple of 32, at most 1024) with
// identity `id`; every thread gets it.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch /* >= 32 floats */, float id, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int n = blockDim.x >> 5;
    v = lane < n ? scratch[lane] : id;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce(v, scratch, 0.0f, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce(v, scratch, -MINIKV_INF, [](float a, float b) { return fmaxf(a, b); });
}

}  // namespace minikv
