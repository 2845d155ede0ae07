// elementwise.cu -- elementwise / data-movement kernels. Every entry point exists as
// <name>_f32 (T = float) and <name>_bf16 (T = __nv_bfloat16); math in f32.
//
// Launch geometry (ALL kernels in this file): grid-stride loops.
//   block = (256,1,1), grid = (min(ceil(N/256), 65535*4), 1, 1), dynamic shared memory = 0,
//   where N is the number of OUTPUT elements named below for each kernel.
//
// add_scaled_<t>(const T* a, float alpha, const T* b, float beta, T* y, long long n, long long nb)
//   y[i] = alpha*a[i] + beta*b[i % nb], i < n. nb divides n (nb == n: plain). N = n.
//   In-place (y == a or y == b when nb == n) is fine.
// activate_<t>(const T* x, T* y, long long n, int act)
//   act 0: y = x; 1: exact GELU x*0.5*(1+erf(x/sqrt2)); 2: ReLU. N = n. In-place fine.
// permute_<t>(const T* x, T* y, long long n, PermArgs p)       (PermArgs in common.cuh, by value)
//   y[i] = x[sum_d idx_d(i)*p.in_strides[d]] where idx(i) unravels i over p.out_dims[0..rank)
//   row-major (rank <= 6). N = n = prod(out_dims).
// copy_block_<t>(const T* x, T* y, long long outer, int src_dim, int src_off, int dst_dim,
//                int dst_off, int len, long long inner)
//   y[(o*dst_dim + dst_off + j)*inner + i] = x[(o*src_dim + src_off + j)*inner + i]
//   for o < outer, j < len, i < inner. N = outer*len*inner.
// window_partition_<t>(const T* x, T* y, int B, int H, int W, int C, int ws, int nh, int nw)
//   x [B,H,W,C] -> y [B*nh*nw, ws, ws, C]; y[b*nh*nw + wy*nw + wx, r, c, ch] =
//   x[b, wy*ws+r, wx*ws+c, ch] inside HxW, else 0. N = B*nh*nw*ws*ws*C.
// window_unpartition_<t>(const T* x, T* y, int B, int H, int W, int C, int ws, int nh, int nw)
//   inverse: x [B*nh*nw, ws, ws, C] -> y [B,H,W,C] (padding dropped). N = B*H*W*C.
// scatter2x2_<t>(const T* tmp, const T* bias, T* y, int B, int H, int W, int Cout)
//   tmp [B*H*W, Cout*4] (col o*4+di*2+dj) -> y [B,2H,2W,Cout]:
//   y[b,2i+di,2j+dj,o] = tmp[(b*H+i)*W+j, o*4+di*2+dj] + bias[o]  (bias may be null = 0).
//   N = B*4*H*W*Cout.
// im2col_<t>(const T* x, T* cols, int B, int H, int W, int C, int kh, int kw, int stride,
//            int pad, int Ho, int Wo)
//   x NHWC -> cols [B*Ho*Wo, C*kh*kw], column c*kh*kw + ky*kw + kx (PyTorch [Cout,Cin,kh,kw]
//   weight order); value x[b, oy*stride-pad+ky, ox*stride-pad+kx, c] or 0 outside.
//   N = B*Ho*Wo*C*kh*kw.
//
// Index arithmetic: every body is instantiated with 32-bit indices, used whenever N and every
// input offset fit in int (all realistic sizes), and 64-bit ones otherwise. 64-bit division is
// a ~70-instruction software routine on the GPU, which made these memory-bound kernels
// instruction-bound.
#include "common.cuh"

// Grid-stride loop with index type I.
#define GRID_STRIDE_I(I, i, n)                                                    \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)(n);        \
         i += (I)gridDim.x * (I)blockDim.x)

template <typename T, typename I>
__device__ __forceinline__ void add_scaled_body(const T* a, float alpha, const T* b, float beta,
                                                T* y, I n, I nb) {
    if (nb == n) {
        GRID_STRIDE_I(I, i, n) { st(y + i, alpha * ld(a + i) + beta * ld(b + i)); }
    } else {
        GRID_STRIDE_I(I, i, n) { st(y + i, alpha * ld(a + i) + beta * ld(b + (i % nb))); }
    }
}

template <typename T, typename I>
__device__ __forceinline__ void activate_body(const T* x, T* y, I n, int act) {
    GRID_STRIDE_I(I, i, n) {
        const float v = ld(x + i);
        float r;
        if (act == 1) r = v * 0.5f * (1.0f + erff(v * 0.70710678f));
        else if (act == 2) r = fmaxf(v, 0.0f);
        else r = v;
        st(y + i, r);
    }
}

template <typename T, typename I>
__device__ __forceinline__ void permute_body(const T* x, T* y, I n, const PermArgs& p) {
    I dims[6], strides[6];
#pragma unroll
    for (int d = 0; d < 6; ++d) {
        dims[d] = (I)p.out_dims[d];
        strides[d] = (I)p.in_strides[d];
    }
    GRID_STRIDE_I(I, i, n) {
        I rem = i, off = 0;
#pragma unroll
        for (int d = 5; d >= 0; --d) {
            if (d < p.rank) {
                const I q = rem / dims[d];
                off += (rem - q * dims[d]) * strides[d];
                rem = q;
            }
        }
        y[i] = x[off];
    }
}

template <typename T, typename I>
__device__ __forceinline__ void copy_block_body(const T* x, T* y, I outer, I src_dim, I src_off,
                                                I dst_dim, I dst_off, I len, I inner) {
    const I n = outer * len * inner;
    GRID_STRIDE_I(I, t, n) {
        const I r = t / inner;
        const I i = t - r * inner;
        const I o = r / len;
        const I j = r - o * len;
        y[(o * dst_dim + dst_off + j) * inner + i] = x[(o * src_dim + src_off + j) * inner + i];
    }
}

template <typename T, typename I>
__device__ __forceinline__ void window_partition_body(const T* x, T* y, I B, I H, I W, I C, I ws,
                                                      I nh, I nw) {
    const I n = B * nh * nw * ws * ws * C;
    GRID_STRIDE_I(I, t, n) {
        I r = t;
        const I ch = r % C; r /= C;
        const I c = r % ws; r /= ws;
        const I rr = r % ws; r /= ws;
        const I wx = r % nw; r /= nw;
        const I wy = r % nh; r /= nh;
        const I b = r;
        const I yy = wy * ws + rr, xx = wx * ws + c;
        T v = T(0.0f);
        if (yy < H && xx < W) v = x[((b * H + yy) * W + xx) * C + ch];
        y[t] = v;
    }
}

template <typename T, typename I>
__device__ __forceinline__ void window_unpartition_body(const T* x, T* y, I B, I H, I W, I C,
                                                        I ws, I nh, I nw) {
    const I n = B * H * W * C;
    GRID_STRIDE_I(I, t, n) {
        I r = t;
        const I ch = r % C; r /= C;
        const I xx = r % W; r /= W;
        const I yy = r % H; r /= H;
        const I b = r;
        const I wy = yy / ws, rr = yy - wy * ws;
        const I wx = xx / ws, c = xx - wx * ws;
        const I win = (b * nh + wy) * nw + wx;
        y[t] = x[((win * ws + rr) * ws + c) * C + ch];
    }
}

template <typename T, typename I>
__device__ __forceinline__ void scatter2x2_body(const T* tmp, const T* bias, T* y, I B, I H, I W,
                                                I Cout) {
    const I n = B * 4 * H * W * Cout;
    const I W2 = 2 * W, H2 = 2 * H;
    GRID_STRIDE_I(I, t, n) {
        I r = t;
        const I o = r % Cout; r /= Cout;
        const I X = r % W2; r /= W2;
        const I Y = r % H2; r /= H2;
        const I b = r;
        const I i = Y >> 1, di = Y & 1, j = X >> 1, dj = X & 1;
        const I row = (b * H + i) * W + j;
        float v = ld(tmp + row * (4 * Cout) + o * 4 + di * 2 + dj);
        if (bias) v += ld(bias + o);
        st(y + t, v);
    }
}

template <typename T, typename I>
__device__ __forceinline__ void im2col_body(const T* x, T* cols, I B, I H, I W, I C, I kh, I kw,
                                            I stride, I pad, I Ho, I Wo) {
    const I khw = kh * kw;
    const I K = C * khw;
    const I n = B * Ho * Wo * K;
    GRID_STRIDE_I(I, t, n) {
        I row = t / K;
        const I col = t - row * K;
        const I c = col / khw;
        const I r2 = col - c * khw;
        const I ky = r2 / kw, kx = r2 - ky * kw;
        const I ox = row % Wo; row /= Wo;
        const I oy = row % Ho; row /= Ho;
        const I b = row;
        const I iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        T v = T(0.0f);
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = x[((b * H + iy) * W + ix) * C + c];
        cols[t] = v;
    }
}

// 32-bit indices when every index of the call fits in int.
#define FITS(n) ((long long)(n) <= 2147483647LL)

#define EW_EXPORTS(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        add_scaled_##S(const T* a, float alpha, const T* b, float beta, T* y, long long n,      \
                       long long nb) {                                                          \
        if (FITS(n)) add_scaled_body<T, int>(a, alpha, b, beta, y, (int)n, (int)nb);            \
        else add_scaled_body<T, long long>(a, alpha, b, beta, y, n, nb);                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        activate_##S(const T* x, T* y, long long n, int act) {                                  \
        if (FITS(n)) activate_body<T, int>(x, y, (int)n, act);                                  \
        else activate_body<T, long long>(x, y, n, act);                                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        permute_##S(const T* x, T* y, long long n, PermArgs p) {                                \
        if (FITS(n)) permute_body<T, int>(x, y, (int)n, p);                                     \
        else permute_body<T, long long>(x, y, n, p);                                            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        copy_block_##S(const T* x, T* y, long long outer, int src_dim, int src_off,             \
                       int dst_dim, int dst_off, int len, long long inner) {                    \
        const long long big = outer * (long long)(src_dim > dst_dim ? src_dim : dst_dim) * inner; \
        if (FITS(big)) copy_block_body<T, int>(x, y, (int)outer, src_dim, src_off, dst_dim,     \
                                               dst_off, len, (int)inner);                       \
        else copy_block_body<T, long long>(x, y, outer, src_dim, src_off, dst_dim, dst_off,     \
                                           len, inner);                                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        window_partition_##S(const T* x, T* y, int B, int H, int W, int C, int ws, int nh,      \
                             int nw) {                                                          \
        const long long big = (long long)B * nh * nw * ws * ws * C;                              \
        if (FITS(big)) window_partition_body<T, int>(x, y, B, H, W, C, ws, nh, nw);             \
        else window_partition_body<T, long long>(x, y, B, H, W, C, ws, nh, nw);                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        window_unpartition_##S(const T* x, T* y, int B, int H, int W, int C, int ws, int nh,    \
                               int nw) {                                                        \
        const long long big = (long long)B * nh * nw * ws * ws * C;                              \
        if (FITS(big)) window_unpartition_body<T, int>(x, y, B, H, W, C, ws, nh, nw);           \
        else window_unpartition_body<T, long long>(x, y, B, H, W, C, ws, nh, nw);               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        scatter2x2_##S(const T* tmp, const T* bias, T* y, int B, int H, int W, int Cout) {      \
        const long long big = (long long)B * 4 * H * W * Cout;                                   \
        if (FITS(big)) scatter2x2_body<T, int>(tmp, bias, y, B, H, W, Cout);                    \
        else scatter2x2_body<T, long long>(tmp, bias, y, B, H, W, Cout);                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        im2col_##S(const T* x, T* cols, int B, int H, int W, int C, int kh, int kw, int stride, \
                   int pad, int Ho, int Wo) {                                                   \
        const long long big = (long long)B * Ho * Wo * C * kh * kw;                              \
        const long long bin = (long long)B * H * W * C;                                          \
        if (FITS(big) && FITS(bin))                                                             \
            im2col_body<T, int>(x, cols, B, H, W, C, kh, kw, stride, pad, Ho, Wo);              \
        else im2col_body<T, long long>(x, cols, B, H, W, C, kh, kw, stride, pad, Ho, Wo);       \
    }

EW_EXPORTS(float, f32)
EW_EXPORTS(__nv_bfloat16, bf16)
