// The model's hot elementwise ops, fused where that saves a pass over the activations.
// Float math mirrors minikv.ops.ArrayOps (the oracle): normalise in float32, round to fp16,
// then scale by the fp16 weight.
#include "common.cuh"

using minikv::block_sum;

// h = fp16(fp16(x * rstd) * w), rstd = 1 / sqrt(mean(x^2) + eps). One block per row.
// x (rows, C) float32; w (C,) fp16; h (rows, C) fp16.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const __half* __restrict__ w,
                                    __half* __restrict__ h, int C, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) ss += xr[i] * xr[i];
    const float rstd = 1.0f / sqrtf(block_sum(ss, scratch) / C + eps);
    __half* hr = h + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        hr[i] = __float2half_rn(__half2float(__float2half_rn(xr[i] * rstd)) * __half2float(w[i]));
}

// x += y (the residual stream absorbs a branch output), then h = rms_norm(x). Fused: one
// read of x and y, one write of x and h. x (rows, C) float32 in place; y (rows, C) fp16.
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const __half* __restrict__ y,
                                        const __half* __restrict__ w, __half* __restrict__ h,
                                        int C, float eps) {
    __shared__ float scratch[32];
    float* xr = x + (size_t)blockIdx.x * C;
    const __half* yr = y + (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = xr[i] + __half2float(yr[i]);
        xr[i] = v;
        ss += v * v;
    }
    const float rstd = 1.0f / sqrtf(block_sum(ss, scratch) / C + eps);
    __half* hr = h + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        hr[i] = __float2half_rn(__half2float(__float2half_rn(xr[i] * rstd)) * __half2float(w[i]));
}

// Rotate-half RoPE in place on the q and k heads of a fused qkv activation.
// qkv (B*T, (H + 2*Hkv) * D) fp16; pos (B*T,) int32 positions; inv_freq (D/2,) float32.
// One thread per (token, rotated head, pair i < D/2); v heads are left alone.
extern "C" __global__ void rope_qkv(__half* __restrict__ qkv, const int* __restrict__ pos,
                                    const float* __restrict__ inv_freq, int n_tokens, int n_rot_heads,
                                    int n_all_heads, int D) {
    const int half_d = D >> 1;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_tokens * n_rot_heads * half_d) return;
    const int i = idx % half_d;
    const int head = (idx / half_d) % n_rot_heads;
    const int tok = idx / ((long long)half_d * n_rot_heads);
    float s, c;
    sincosf((float)pos[tok] * inv_freq[i], &s, &c);
    __half* row = qkv + ((size_t)tok * n_all_heads + head) * D;
    const float a = __half2float(row[i]), b = __half2float(row[i + half_d]);
    row[i] = __float2half_rn(a * c - b * s);  // x * cos + rotate_half(x) * sin
    row[i + half_d] = __float2half_rn(b * c + a * s);
}

// out = silu(gate) * up for gate_up = [gate | up] along the last axis.
// gate_up (rows, 2 I) fp16; out (rows, I) fp16.
extern "C" __global__ void swiglu(const __half* __restrict__ gate_up, __half* __restrict__ out, int I,
                                  long long n) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const long long row = idx / I, col = idx % I;
    const float g = __half2float(gate_up[row * 2 * I + col]);
    const float u = __half2float(gate_up[row * 2 * I + I + col]);
    out[idx] = __float2half_rn(g / (1.0f + expf(-g)) * u);
}

// x (N, C) float32 = table[tokens] (table (V, C) fp16, tokens (N,) int64).
extern "C" __global__ void embed(const __half* __restrict__ table, const long long* __restrict__ tokens,
                                 float* __restrict__ x, int C) {
    const __half* src = table + (size_t)tokens[blockIdx.x] * C;
    float* dst = x + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) dst[i] = __half2float(src[i]);
}

// out (nb, H, T, D) fp16 contiguous = the rows of a 4-D view x at b*xb + h*xh + t*xt (elements:
// rows contiguous and 16-byte aligned, e.g. k or v heads of the qkv projection). One thread per
// 8 values (16 bytes); n = nb * H * T * D / 8.
extern "C" __global__ void gather_rows(const __half* __restrict__ x, long long xb, long long xh, long long xt, int H,
                                       int T, int D8, uint4* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long r = i / D8, s = r / T;
    out[i] = *reinterpret_cast<const uint4*>(x + (s / H) * xb + (s % H) * xh + (r % T) * xt + (i % D8) * 8);
}

// A step's keys and values into a cache buffer at offsets read on the device (so a captured
// decode step writes each token where the step's row info says): for row b, the first n[b] =
// rowinfo[b*6+3] tokens of the views k, v (B, H, T, D; strides kb, kh, kt in elements, rows
// contiguous and 16-byte aligned) go to dst_k, dst_v (B, H, cap, D) contiguous at token
// rowinfo[b*6+2] (the window length, or the cache length for fp16); v has its own strides
// vb, vh, vt (Qwen3's normed k is a fresh array, v a view). One thread per 8 values.
extern "C" __global__ void kv_append(const __half* __restrict__ k, const __half* __restrict__ v, long long kb,
                                     long long kh, long long kt, long long vb, long long vh, long long vt, int H,
                                     int T, int D8, uint4* __restrict__ dst_k, uint4* __restrict__ dst_v, int cap,
                                     const int* __restrict__ rowinfo, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long r = i / D8;  // (b, h, t) row
    const int t = (int)(r % T);
    const long long s = r / T;  // b * H + h
    const int b = (int)(s / H);
    const int off = rowinfo[b * 6 + 2];
    if (t >= rowinfo[b * 6 + 3] || off + t >= cap) return;
    const long long c = (i % D8) * 8, dst = (s * cap + off + t) * D8 + i % D8;
    dst_k[dst] = *reinterpret_cast<const uint4*>(k + (s / H) * kb + (s % H) * kh + (long long)t * kt + c);
    dst_v[dst] = *reinterpret_cast<const uint4*>(v + (s / H) * vb + (s % H) * vh + (long long)t * vt + c);
}

// The rows of a 4-D view x (nb, H, T, D; strides xb, xh, xt in elements, rows contiguous) turned
// by R = diag(s) H / sqrt(D), H the Sylvester Hadamard matrix (D a power of two, at most 256):
// x @ R, or x @ R^T when back, written to out (nb, T, H, D) contiguous (the layout a head-major
// view of the qkv projection, or of the attention's output, has). In float32, in
// ArrayOps.hadamard's order (signs, butterflies for h = 1, 2, 4, ..., the scale; back: the signs
// last). One block of D / 2 threads per row.
extern "C" __global__ void hadamard_f16(const __half* __restrict__ x, long long xb, long long xh, long long xt, int H,
                                        int T, int D, const float* __restrict__ s, float scale, int back,
                                        __half* __restrict__ out) {
    __shared__ float v[256];
    const long long r = blockIdx.x;  // (b, h, t) row
    const long long bh = r / T;
    const int t = (int)(r % T), h = (int)(bh % H);
    const long long b = bh / H;
    const __half* row = x + b * xb + h * xh + (long long)t * xt;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float a = __half2float(row[i]);
        v[i] = back ? a : __fmul_rn(a, s[i]);
    }
    for (int w = 1; w < D; w *= 2) {
        __syncthreads();
        const int j = threadIdx.x, i = (j / w) * 2 * w + j % w;
        const float a = v[i], c = v[i + w];
        v[i] = __fadd_rn(a, c);
        v[i + w] = __fsub_rn(a, c);
    }
    __syncthreads();
    __half* o = out + ((b * T + t) * H + h) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float a = __fmul_rn(v[i], scale);
        o[i] = __float2half_rn(back ? __fmul_rn(a, s[i]) : a);
    }
}
