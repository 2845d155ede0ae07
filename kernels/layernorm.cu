// layernorm.cu -- row-wise LayerNorm over the last dimension, optionally after a residual add.
//
// layernorm_<t>(const T* x, const T* g, const T* b, T* y, int rows, int C, float eps)
//   x, y: [rows, C]; g, b: [C]. Per row: mean = sum(x)/C, var = sum((x-mean)^2)/C (biased,
//   two-pass), y = (x - mean) * rsqrtf(var + eps) * g + b. f32 math. In-place (y == x) is fine.
//
// add_layernorm_<t>(const T* a, const T* r, float beta, T* s, const T* g, const T* b, T* y,
//                   int rows, int C, float eps)
//   a, r, s, y: [rows, C]. s = a + beta * r (stored as T), then y = LayerNorm(s) exactly as
//   layernorm_<t> computes it from the stored s: the residual stream's add and the next norm
//   in one pass (s may alias a; y must not alias a, r or s).
//
// add_layernorm_warp_<t>(same arguments as add_layernorm_<t>)
// layernorm_warp_<t>(same arguments as layernorm_<t>)
//   The same computations with one warp per row: 16-byte vector loads and stores (VEC = 8
//   elements for bf16, 4 for f32), the row kept in registers, shuffle reductions (no shared
//   memory, no barrier). s is identical to add_layernorm's; y agrees to f32 rounding (the
//   mean and variance are summed in another order). Requires C % VEC == 0, C <= 2048, and
//   every pointer 16-byte aligned: the launchers take the block kernels otherwise.
//
// Launch geometry: layernorm_<t>, add_layernorm_<t>: grid = (rows, 1, 1), block = (128, 1, 1),
//   dynamic shared memory = 0. (block MUST be 128: each thread caches up to 16 elements of its
//   row in registers, which covers C <= 2048; larger C still works, the excess is re-read from
//   global memory.)
//   add_layernorm_warp_<t>, layernorm_warp_<t>: grid = (ceil(rows/4), 1, 1), block = (128, 1,
//   1) (warp w of block x normalises row 4x + w), dynamic shared memory = 0.
#include "common.cuh"

#define LN_THREADS 128
#define LN_CACHE 16  // elements per thread kept in registers: 128*16 = 2048

// v rounded to T's precision (the value a store of v as T would read back).
__device__ __forceinline__ float as_stored(const float*, float v) { return v; }
__device__ __forceinline__ float as_stored(const __nv_bfloat16*, float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

// r == nullptr: plain LayerNorm of x. Otherwise the row is s = x + beta * r, written to s.
template <typename T>
__device__ __forceinline__ void layernorm_body(const T* x, const T* r, float beta, T* s,
                                               const T* __restrict__ g,
                                               const T* __restrict__ bb, T* y, int rows, int C,
                                               float eps) {
    __shared__ float red[32];
    const int row = blockIdx.x;
    if (row >= rows) return;  // whole block exits together (grid == rows)
    const int tid = threadIdx.x;
    const long long off = (long long)row * C;
    const T* xr = x + off;
    const T* rr = r ? r + off : nullptr;
    T* sr = r ? s + off : nullptr;
    // Elements past the register cache are re-read from the row's input, or from s, which this
    // same thread wrote (no other thread touches that element).
    const T* src = r ? (const T*)sr : xr;
    T* yr = y + off;
    const int cached = LN_THREADS * LN_CACHE;

    float v[LN_CACHE];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < LN_CACHE; ++k) {
        const int c = tid + k * LN_THREADS;
        float e = 0.f;
        if (c < C) {
            e = ld(xr + c);
            if (rr) {
                e = as_stored(xr, e + beta * ld(rr + c));
                st(sr + c, e);
            }
        }
        v[k] = e;
        sum += e;
    }
    for (int c = tid + cached; c < C; c += LN_THREADS) {
        float e = ld(xr + c);
        if (rr) {
            e = as_stored(xr, e + beta * ld(rr + c));
            st(sr + c, e);
        }
        sum += e;
    }
    const float mean = block_sum(sum, red) / (float)C;

    float q = 0.f;
#pragma unroll
    for (int k = 0; k < LN_CACHE; ++k) {
        const int c = tid + k * LN_THREADS;
        const float d = v[k] - mean;
        q += (c < C) ? d * d : 0.f;
    }
    for (int c = tid + cached; c < C; c += LN_THREADS) {
        const float d = ld(src + c) - mean;
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
        st(yr + c, (ld(src + c) - mean) * rstd * ld(g + c) + ld(bb + c));
}

extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_f32(const float* x, const float* g, const float* b, float* y, int rows, int C,
                  float eps) {
    layernorm_body<float>(x, nullptr, 0.f, nullptr, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g, const __nv_bfloat16* b,
                   __nv_bfloat16* y, int rows, int C, float eps) {
    layernorm_body<__nv_bfloat16>(x, nullptr, 0.f, nullptr, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    add_layernorm_f32(const float* a, const float* r, float beta, float* s, const float* g,
                      const float* b, float* y, int rows, int C, float eps) {
    layernorm_body<float>(a, r, beta, s, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    add_layernorm_bf16(const __nv_bfloat16* a, const __nv_bfloat16* r, float beta,
                       __nv_bfloat16* s, const __nv_bfloat16* g, const __nv_bfloat16* b,
                       __nv_bfloat16* y, int rows, int C, float eps) {
    layernorm_body<__nv_bfloat16>(a, r, beta, s, g, b, y, rows, C, eps);
}

// ---- one warp per row, vectorised (add_layernorm_warp_<t>, layernorm_warp_<t>) ---------------
// Elements per 16-byte vector (N) and vectors per lane kept in registers (K): 32*N*K = 2048.
template <typename T>
struct LnVec;
template <>
struct LnVec<float> {
    static constexpr int N = 4, K = 16;
};
template <>
struct LnVec<__nv_bfloat16> {
    static constexpr int N = 8, K = 8;
};

__device__ __forceinline__ void load_vec(const float* p, float* o) {
    const float4 u = *reinterpret_cast<const float4*>(p);
    o[0] = u.x;
    o[1] = u.y;
    o[2] = u.z;
    o[3] = u.w;
}
__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float* o) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void store_vec(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float* v) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

// r == nullptr: plain LayerNorm of a (s unused). Otherwise the row is s = a + beta * r, written
// to s.
template <typename T>
__device__ __forceinline__ void layernorm_warp_body(const T* a, const T* r, float beta, T* s,
                                                        const T* __restrict__ g,
                                                        const T* __restrict__ bb, T* y,
                                                        int rows, int C, float eps) {
    constexpr int N = LnVec<T>::N, K = LnVec<T>::K;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (LN_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp
    const long long off = (long long)row * C;
    const int nv = C / N;  // vectors in the row, <= 32 * K
    float e[K][N];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int vi = lane + 32 * k;
#pragma unroll
        for (int i = 0; i < N; ++i) e[k][i] = 0.f;
        if (vi < nv) {
            const long long c = off + (long long)vi * N;
            load_vec(a + c, e[k]);
            if (r) {
                float rv[N];
                load_vec(r + c, rv);
#pragma unroll
                for (int i = 0; i < N; ++i) e[k][i] = as_stored(a, e[k][i] + beta * rv[i]);
                store_vec(s + c, e[k]);
            }
#pragma unroll
            for (int i = 0; i < N; ++i) sum += e[k][i];
        }
    }
    const float mean = warp_sum(sum) / (float)C;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        if (lane + 32 * k < nv) {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float d = e[k][i] - mean;
                q += d * d;
            }
        }
    }
    const float rstd = rsqrtf(warp_sum(q) / (float)C + eps);
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int vi = lane + 32 * k;
        if (vi < nv) {
            float gv[N], bv[N], o[N];
            load_vec(g + vi * N, gv);
            load_vec(bb + vi * N, bv);
#pragma unroll
            for (int i = 0; i < N; ++i) o[i] = (e[k][i] - mean) * rstd * gv[i] + bv[i];
            store_vec(y + off + (long long)vi * N, o);
        }
    }
}

extern "C" __global__ void __launch_bounds__(LN_THREADS)
    add_layernorm_warp_f32(const float* a, const float* r, float beta, float* s, const float* g,
                           const float* b, float* y, int rows, int C, float eps) {
    layernorm_warp_body<float>(a, r, beta, s, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    add_layernorm_warp_bf16(const __nv_bfloat16* a, const __nv_bfloat16* r, float beta,
                            __nv_bfloat16* s, const __nv_bfloat16* g, const __nv_bfloat16* b,
                            __nv_bfloat16* y, int rows, int C, float eps) {
    layernorm_warp_body<__nv_bfloat16>(a, r, beta, s, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_warp_f32(const float* x, const float* g, const float* b, float* y, int rows, int C,
                       float eps) {
    layernorm_warp_body<float>(x, nullptr, 0.f, nullptr, g, b, y, rows, C, eps);
}
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_warp_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g, const __nv_bfloat16* b,
                        __nv_bfloat16* y, int rows, int C, float eps) {
    layernorm_warp_body<__nv_bfloat16>(x, nullptr, 0.f, nullptr, g, b, y, rows, C, eps);
}
