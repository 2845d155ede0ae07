// layernorm.cu -- row-wise LayerNorm over the last dimension.
//
// layernorm_<t>(const T* x, const T* g, const T* b, T* y, int rows, int C, float eps)
//   x, y: [rows, C]; g, b: [C]. Per row: mean = sum(x)/C, var = sum((x-mean)^2)/C (biased,
//   two-pass), y = (x - mean) * rsqrtf(var + eps) * g + b. f32 math. In-place (y == x) is fine.
//
// Launch geometry: grid = (rows, 1, 1), block = (128, 1, 1), dynamic shared memory = 0.
//   (block MUST be 128: each thread caches up to 16 elements of its row in registers, which
//   covers C <= 2048; larger C still works, the excess is re-read from global memory.)
#include "common.cuh"

#define LN_THREADS 128
#define LN_CACHE 16  // elements per thread kept in registers: 128*16 = 2048

template <typename T>
__device__ __forceinline__ void layernorm_body(const T* __restrict__ x, const T* __restrict__ g,
                                               const T* __restrict__ bb, T* y, int rows, int C,
                                               float eps) {
    __shared__ float red[32];
    const int row = blockIdx.x;
    if (row >= rows) return;  // whole block exits together (grid == rows)
    const int tid = threadIdx.x;
    const T* xr = x + (long long)row * C;
    T* yr = y + (long long)row * C;
    const int cached = LN_THREADS * LN_CACHE;

    float v[LN_CACHE];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < LN_CACHE; ++k) {
        const int c = tid + k * LN_THREADS;
        v[k] = (c < C) ? ld(xr + c) : 0.f;
        s += v[k];
    }
    for (int c = tid + cached; c < C; c += LN_THREADS) s += ld(xr + c);
    const float mean = block_sum(s, red) / (float)C;

    float q = 0.f;
#pragma unroll
    for (int k = 0; k < LN_CACHE; ++k) {
        const int c = tid + k * LN_THREADS;
        const float d = v[k] - mean;
        q += (c < C) ? d * d : 0.f;
    }
    for (int c = tid + cached; c < C; c += LN_THREADS) {
        const float d = ld(xr + c) - mean;
        q += d * d;
    }
    const float var = block_sum(q, red) / (float)C;
    const float rstd = rsqrtf(var + eps);

#pragma unroll
    for (int k = 0; k < LN_CACHE; ++k) {
        const int c = tid + k * LN_THREADS;
        if (c < C) st(yr + c, (v[k] - mean) * rstd * ld(g + c) + ld(bb + c));
    }
    for (int c = tid + cached; c < C; c += LN_THREADS)
        st(yr + c, (ld(xr + c) - mean) * rstd * ld(g + c) + ld(bb + c));
}

extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_f32(const float* x, const float* g, const float* b, float* y, int rows, int C,
                  float eps) {
    layernorm_body<float>(x, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g, const __nv_bfloat16* b,
                   __nv_bfloat16* y, int rows, int C, float eps) {
    layernorm_body<__nv_bfloat16>(x, g, b, y, rows, C, eps);
}
