// backward.cu -- gradients of the pointwise and normalisation ops (activation, column sums,
// LayerNorm, col2im for conv2d); attention's are in attention_backward.cu.
//
// Every entry point exists as <name>_f32 (T = float) and <name>_bf16 (T = __nv_bfloat16): T is
// the storage type of the tensors; scratch buffers (partial sums) are always f32, and ALL
// arithmetic and accumulation is f32. Every reduction has a fixed
// order (no atomics): results are bit-for-bit reproducible run to run.
//
// ---- elementwise (block = (256,1,1), grid = (min(ceil(N/256), 65535*4),1,1), smem 0) -------
// act_bwd_<t>(const T* x, const T* dy, T* dx, long long n, int act)
//   dx = dy * act'(x), N = n. act 0: dx = dy; 1 (exact GELU): act'(x) = Phi(x) + x*phi(x),
//   Phi(x) = 0.5*(1+erf(x/sqrt2)), phi(x) = exp(-x^2/2)/sqrt(2pi); 2 (ReLU): x > 0 ? dy : 0.
//   In-place (dx == dy) is fine.
// col2im_<t>(const T* dcols, T* dx, int B, int H, int W, int C, int kh, int kw, int stride,
//            int pad, int Ho, int Wo)
//   Adjoint of im2col (elementwise.cu): dcols [B*Ho*Wo, C*kh*kw] (column c*kh*kw + ky*kw + kx)
//   -> dx [B,H,W,C] (NHWC), gathered (one thread per dx element, no atomics):
//   dx[b,iy,ix,c] = sum over (ky,kx) with iy+pad-ky = oy*stride, ix+pad-kx = ox*stride,
//   0 <= oy < Ho, 0 <= ox < Wo of dcols[(b*Ho+oy)*Wo+ox, c*kh*kw+ky*kw+kx]. Only the ky with
//   ky = (iy+pad) mod stride (step stride) are visited. N = B*H*W*C.
//
// ---- column sums (the gradient of a broadcast) ---------------------------------------------
// colsum_part_<t>(const T* x, float* part, int rows, int cols, int chunk)
//   x [rows, cols] -> part [nparts, cols], part[p, c] = sum_{r in [p*chunk, min((p+1)*chunk,
//   rows))} x[r, c]. grid = (ceil(cols/32), nparts, 1) (nparts <= 65535), block = (32, 8, 1):
//   lane x = column, the 8 y-threads take every 8th row, then a fixed-order sum over y. smem 0.
// colsum_fin_<t>(const float* part, T* y, int nparts, int cols)
//   y[c] = sum_{p < nparts} part[p, c] (nparts may be 0: zeros). grid = (ceil(cols/32),1,1),
//   block = (32, 8, 1) (y-thread t sums p = t, t+8, ..., then a fixed-order sum over t). smem 0.
//
// ---- LayerNorm ------------------------------------------------------------------------------
// layernorm_bwd_<t>(const T* x, const T* g, const T* dy, T* dx, float* pg, float* pb,
//                   int rows, int C, float eps)
//   Per row (recomputing the forward's two-pass mean and biased variance): xh = (x-mean)*rstd,
//   rstd = rsqrt(var+eps), dh = dy*g, dx = rstd * (dh - mean(dh) - xh * mean(dh*xh)).
//   pg, pb [gridDim.x, C]: the per-block partial sums of dy*xh and dy over the rows the block
//   handled (rows blockIdx.x, blockIdx.x + gridDim.x, ...); colsum_fin reduces them to dg, db.
//   grid = (nblk, 1, 1) with 1 <= nblk <= rows, block = (128, 1, 1) (MUST be 128: each thread
//   caches columns tid + 128k, k < 16, in registers, covering C <= 2048; columns beyond are
//   re-read from global memory and their partials accumulated in pg/pb directly). smem 0.
#include "common.cuh"

// Grid-stride loop with index type I.
#define BW_GRID_STRIDE(I, i, n)                                                  \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)(n);      \
         i += (I)gridDim.x * (I)blockDim.x)
#define BW_FITS(n) ((long long)(n) <= 2147483647LL)

// ------------------------------------------------------------------------------------------
// elementwise
// ------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ __forceinline__ void act_bwd_body(const T* x, const T* dy, T* dx, I n, int act) {
    BW_GRID_STRIDE(I, i, n) {
        const float g = ld(dy + i);
        float r;
        if (act == 1) {
            const float v = ld(x + i);
            const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
            const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
            r = g * (cdf + v * pdf);
        } else if (act == 2) {
            r = ld(x + i) > 0.f ? g : 0.f;
        } else {
            r = g;
        }
        st(dx + i, r);
    }
}

template <typename T, typename I>
__device__ __forceinline__ void col2im_body(const T* dcols, T* dx, I B, I H, I W, I C, I kh,
                                            I kw, I stride, I pad, I Ho, I Wo) {
    const I n = B * H * W * C;
    const I khw = kh * kw, K = C * khw;
    BW_GRID_STRIDE(I, t, n) {
        I r = t;
        const I c = r % C; r /= C;
        const I ix = r % W; r /= W;
        const I iy = r % H; r /= H;
        const I b = r;
        const I ty = iy + pad, tx = ix + pad;  // = oy*stride + ky
        float s = 0.f;
        for (I ky = ty % stride; ky < kh && ky <= ty; ky += stride) {
            const I oy = (ty - ky) / stride;
            if (oy >= Ho) continue;
            for (I kx = tx % stride; kx < kw && kx <= tx; kx += stride) {
                const I ox = (tx - kx) / stride;
                if (ox >= Wo) continue;
                s += ld(dcols + ((b * Ho + oy) * Wo + ox) * K + c * khw + ky * kw + kx);
            }
        }
        st(dx + t, s);
    }
}

// ------------------------------------------------------------------------------------------
// column sums
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void colsum_part_body(const T* x, float* part, int rows, int cols,
                                                 int chunk) {
    __shared__ float red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * chunk;
    const long long r1 = min(r0 + chunk, (long long)rows);
    float s = 0.f;
    if (c < cols)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) s += ld(x + r * cols + c);
    red[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
        part[(long long)blockIdx.y * cols + c] = t;
    }
}

template <typename T>
__device__ __forceinline__ void colsum_fin_body(const float* part, T* y, int nparts, int cols) {
    __shared__ float red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < cols)
        for (int p = threadIdx.y; p < nparts; p += 8) s += part[(long long)p * cols + c];
    red[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
        st(y + c, t);
    }
}

// ------------------------------------------------------------------------------------------
// LayerNorm backward
// ------------------------------------------------------------------------------------------
#define LNB_THREADS 128
#define LNB_CACHE 16

template <typename T>
__device__ __forceinline__ void layernorm_bwd_body(const T* __restrict__ x,
                                                   const T* __restrict__ g,
                                                   const T* __restrict__ dy, T* __restrict__ dx,
                                                   float* __restrict__ pg,
                                                   float* __restrict__ pb, int rows, int C,
                                                   float eps) {
    __shared__ float red[32];
    const int tid = threadIdx.x;
    const int cached = LNB_THREADS * LNB_CACHE;
    float* pgr = pg + (long long)blockIdx.x * C;
    float* pbr = pb + (long long)blockIdx.x * C;
    float ag[LNB_CACHE], ab[LNB_CACHE];
#pragma unroll
    for (int k = 0; k < LNB_CACHE; ++k) {
        ag[k] = 0.f;
        ab[k] = 0.f;
    }
    // Columns past the register cache: this thread owns them in its block's partial rows.
    for (int c = tid + cached; c < C; c += LNB_THREADS) {
        pgr[c] = 0.f;
        pbr[c] = 0.f;
    }
    const float invC = 1.0f / (float)C;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {  // uniform per block
        const T* xr = x + (long long)row * C;
        const T* dyr = dy + (long long)row * C;
        T* dxr = dx + (long long)row * C;
        float v[LNB_CACHE], dyv[LNB_CACHE];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < LNB_CACHE; ++k) {
            const int c = tid + k * LNB_THREADS;
            v[k] = c < C ? ld(xr + c) : 0.f;
            dyv[k] = c < C ? ld(dyr + c) : 0.f;
            s += v[k];
        }
        for (int c = tid + cached; c < C; c += LNB_THREADS) s += ld(xr + c);
        const float mean = block_sum(s, red) * invC;
        float q = 0.f;
#pragma unroll
        for (int k = 0; k < LNB_CACHE; ++k) {
            const int c = tid + k * LNB_THREADS;
            const float dd = v[k] - mean;
            q += c < C ? dd * dd : 0.f;
        }
        for (int c = tid + cached; c < C; c += LNB_THREADS) {
            const float dd = ld(xr + c) - mean;
            q += dd * dd;
        }
        const float rstd = rsqrtf(block_sum(q, red) * invC + eps);
        float s1 = 0.f, s2 = 0.f;  // sum dh, sum dh*xh
#pragma unroll
        for (int k = 0; k < LNB_CACHE; ++k) {
            const int c = tid + k * LNB_THREADS;
            const float xh = (v[k] - mean) * rstd;
            const float dh = c < C ? dyv[k] * ld(g + c) : 0.f;  // dyv = 0 past C
            ag[k] += dyv[k] * xh;
            ab[k] += dyv[k];
            dyv[k] = dh;  // from here on dyv holds dh = dy * g
            s1 += dh;
            s2 += dh * xh;
        }
        for (int c = tid + cached; c < C; c += LNB_THREADS) {
            const float xh = (ld(xr + c) - mean) * rstd;
            const float d0 = ld(dyr + c);
            const float dh = d0 * ld(g + c);
            pgr[c] += d0 * xh;
            pbr[c] += d0;
            s1 += dh;
            s2 += dh * xh;
        }
        const float m1 = block_sum(s1, red) * invC;
        const float m2 = block_sum(s2, red) * invC;
#pragma unroll
        for (int k = 0; k < LNB_CACHE; ++k) {
            const int c = tid + k * LNB_THREADS;
            if (c < C) {
                const float xh = (v[k] - mean) * rstd;
                st(dxr + c, rstd * (dyv[k] - m1 - xh * m2));
            }
        }
        for (int c = tid + cached; c < C; c += LNB_THREADS) {
            const float xh = (ld(xr + c) - mean) * rstd;
            st(dxr + c, rstd * (ld(dyr + c) * ld(g + c) - m1 - xh * m2));
        }
    }
#pragma unroll
    for (int k = 0; k < LNB_CACHE; ++k) {
        const int c = tid + k * LNB_THREADS;
        if (c < C) {
            pgr[c] = ag[k];
            pbr[c] = ab[k];
        }
    }
}

// ------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------
#define BW_EXPORTS(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        act_bwd_##S(const T* x, const T* dy, T* dx, long long n, int act) {                     \
        if (BW_FITS(n)) act_bwd_body<T, int>(x, dy, dx, (int)n, act);                           \
        else act_bwd_body<T, long long>(x, dy, dx, n, act);                                     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        col2im_##S(const T* dcols, T* dx, int B, int H, int W, int C, int kh, int kw,           \
                   int stride, int pad, int Ho, int Wo) {                                       \
        const long long big = (long long)B * Ho * Wo * C * kh * kw;                              \
        const long long bin = (long long)B * H * W * C;                                          \
        if (BW_FITS(big) && BW_FITS(bin))                                                       \
            col2im_body<T, int>(dcols, dx, B, H, W, C, kh, kw, stride, pad, Ho, Wo);            \
        else col2im_body<T, long long>(dcols, dx, B, H, W, C, kh, kw, stride, pad, Ho, Wo);     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        colsum_part_##S(const T* x, float* part, int rows, int cols, int chunk) {               \
        colsum_part_body<T>(x, part, rows, cols, chunk);                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        colsum_fin_##S(const float* part, T* y, int nparts, int cols) {                         \
        colsum_fin_body<T>(part, y, nparts, cols);                                              \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(LNB_THREADS)                                   \
        layernorm_bwd_##S(const T* x, const T* g, const T* dy, T* dx, float* pg, float* pb,     \
                          int rows, int C, float eps) {                                         \
        layernorm_bwd_body<T>(x, g, dy, dx, pg, pb, rows, C, eps);                              \
    }

BW_EXPORTS(float, f32)
BW_EXPORTS(__nv_bfloat16, bf16)
