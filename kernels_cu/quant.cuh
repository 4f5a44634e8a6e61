// Helpers shared by the quantizer kernels (kivi.cu, nqkv.cu): the packing.py steps they all
// reproduce bit for bit, and 4- and 8-wide loads (fp16 or float32 rows as float32) and stores
// (16-byte aligned rows, D % 8 == 0).
#pragma once
#include "common.cuh"

namespace minikv::quant {

// packing.f16_round: fp16 round-to-nearest, then one fp16 step towards `dir` (+1 up, -1 down)
// where the rounding went the wrong way (the step is done on the uint16 bits; +-0 steps to
// the smallest subnormal 0x0001 / 0x8001).
__device__ __forceinline__ __half f16_round(float x, int dir) {
    const __half h = __float2half_rn(x);
    const float hf = __half2float(h);
    const bool wrong = dir > 0 ? hf < x : hf > x;
    const int bits = __half_as_ushort(h);
    int stepped = bits + (bits >= 0x8000 ? -dir : dir);
    if ((bits & 0x7FFF) == 0) stepped = dir > 0 ? 0x0001 : 0x8001;
    return __ushort_as_half((unsigned short)(wrong ? stepped : bits));
}

__device__ __forceinline__ void ld8(const float* p, float (&v)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// 4 or 8 values of a row as float32, from fp16 (fp16 compute) or float32 rows; p is 8-byte (4)
// or 16-byte (8) aligned.
__device__ __forceinline__ void ld4(const float* p, float (&v)[4]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
__device__ __forceinline__ void ld4(const __half* p, float (&v)[4]) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    const float2 l = __half22float2(*reinterpret_cast<const __half2*>(&a.x));
    const float2 h = __half22float2(*reinterpret_cast<const __half2*>(&a.y));
    v[0] = l.x; v[1] = l.y; v[2] = h.x; v[3] = h.y;
}
__device__ __forceinline__ void ld8(const __half* p, float (&v)[8]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
        v[2 * k] = f.x, v[2 * k + 1] = f.y;
    }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = float4{v[0], v[1], v[2], v[3]};
    reinterpret_cast<float4*>(p)[1] = float4{v[4], v[5], v[6], v[7]};
}

// packing.pack of 8 consecutive codes of a row: the B bytes of their little-endian bit stream.
template <int B>
__device__ __forceinline__ void pack8(const unsigned (&c)[8], unsigned char* dst) {
    if constexpr (B == 16) {
        uint4 w;
        w.x = c[0] | c[1] << 16; w.y = c[2] | c[3] << 16; w.z = c[4] | c[5] << 16; w.w = c[6] | c[7] << 16;
        *reinterpret_cast<uint4*>(dst) = w;
    } else {
        unsigned long long w = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) w |= (unsigned long long)c[k] << (B * k);
        if constexpr (B == 2) {
            *reinterpret_cast<unsigned short*>(dst) = (unsigned short)w;
        } else if constexpr (B == 3) {
            dst[0] = (unsigned char)w; dst[1] = (unsigned char)(w >> 8); dst[2] = (unsigned char)(w >> 16);
        } else if constexpr (B == 4) {
            *reinterpret_cast<unsigned*>(dst) = (unsigned)w;
        } else {
            *reinterpret_cast<unsigned long long*>(dst) = w;
        }
    }
}

}  // namespace minikv::quant
