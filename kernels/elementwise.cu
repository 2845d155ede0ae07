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
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void add_scaled_body(const T* a, float alpha, const T* b, float beta,
                                                T* y, long long n, long long nb) {
    const bool plain = (nb == n);
    GRID_STRIDE(i, n) {
        const long long ib = plain ? i : (i % nb);
        st(y + i, alpha * ld(a + i) + beta * ld(b + ib));
    }
}

template <typename T>
__device__ __forceinline__ void activate_body(const T* x, T* y, long long n, int act) {
    GRID_STRIDE(i, n) {
        const float v = ld(x + i);
        float r;
        if (act == 1) r = v * 0.5f * (1.0f + erff(v * 0.70710678f));
        else if (act == 2) r = fmaxf(v, 0.0f);
        else r = v;
        st(y + i, r);
    }
}

template <typename T>
__device__ __forceinline__ void permute_body(const T* x, T* y, long long n, const PermArgs& p) {
    GRID_STRIDE(i, n) {
        long long rem = i, off = 0;
#pragma unroll
        for (int d = 5; d >= 0; --d) {
            if (d < p.rank) {
                const long long dim = p.out_dims[d];
                const long long q = rem / dim;
                off += (rem - q * dim) * p.in_strides[d];
                rem = q;
            }
        }
        y[i] = x[off];
    }
}

template <typename T>
__device__ __forceinline__ void copy_block_body(const T* x, T* y, long long outer, int src_dim,
                                                int src_off, int dst_dim, int dst_off, int len,
                                                long long inner) {
    const long long n = outer * (long long)len * inner;
    GRID_STRIDE(t, n) {
        const long long i = t % inner;
        const long long r = t / inner;
        const long long j = r % len;
        const long long o = r / len;
        y[(o * dst_dim + dst_off + j) * inner + i] = x[(o * src_dim + src_off + j) * inner + i];
    }
}

template <typename T>
__device__ __forceinline__ void window_partition_body(const T* x, T* y, int B, int H, int W,
                                                      int C, int ws, int nh, int nw) {
    const long long n = (long long)B * nh * nw * ws * ws * C;
    GRID_STRIDE(t, n) {
        long long r = t;
        const int ch = (int)(r % C); r /= C;
        const int c = (int)(r % ws); r /= ws;
        const int rr = (int)(r % ws); r /= ws;
        const int wx = (int)(r % nw); r /= nw;
        const int wy = (int)(r % nh); r /= nh;
        const long long b = r;
        const int yy = wy * ws + rr, xx = wx * ws + c;
        T v = T(0.0f);
        if (yy < H && xx < W) v = x[((b * H + yy) * W + xx) * C + ch];
        y[t] = v;
    }
}

template <typename T>
__device__ __forceinline__ void window_unpartition_body(const T* x, T* y, int B, int H, int W,
                                                        int C, int ws, int nh, int nw) {
    const long long n = (long long)B * H * W * C;
    GRID_STRIDE(t, n) {
        long long r = t;
        const int ch = (int)(r % C); r /= C;
        const int xx = (int)(r % W); r /= W;
        const int yy = (int)(r % H); r /= H;
        const long long b = r;
        const int wy = yy / ws, rr = yy - wy * ws;
        const int wx = xx / ws, c = xx - wx * ws;
        const long long win = (b * nh + wy) * nw + wx;
        y[t] = x[((win * ws + rr) * ws + c) * C + ch];
    }
}

template <typename T>
__device__ __forceinline__ void scatter2x2_body(const T* tmp, const T* bias, T* y, int B, int H,
                                                int W, int Cout) {
    const long long n = (long long)B * 4 * H * W * Cout;
    const int W2 = 2 * W, H2 = 2 * H;
    GRID_STRIDE(t, n) {
        long long r = t;
        const int o = (int)(r % Cout); r /= Cout;
        const int X = (int)(r % W2); r /= W2;
        const int Y = (int)(r % H2); r /= H2;
        const long long b = r;
        const int i = Y >> 1, di = Y & 1, j = X >> 1, dj = X & 1;
        const long long row = (b * H + i) * W + j;
        float v = ld(tmp + row * (4LL * Cout) + o * 4 + di * 2 + dj);
        if (bias) v += ld(bias + o);
        st(y + t, v);
    }
}

template <typename T>
__device__ __forceinline__ void im2col_body(const T* x, T* cols, int B, int H, int W, int C,
                                            int kh, int kw, int stride, int pad, int Ho, int Wo) {
    const int khw = kh * kw;
    const long long K = (long long)C * khw;
    const long long n = (long long)B * Ho * Wo * K;
    GRID_STRIDE(t, n) {
        const long long col = t % K;
        long long row = t / K;
        const int c = (int)(col / khw);
        const int r2 = (int)(col - (long long)c * khw);
        const int ky = r2 / kw, kx = r2 - ky * kw;
        const int ox = (int)(row % Wo); row /= Wo;
        const int oy = (int)(row % Ho); row /= Ho;
        const long long b = row;
        const int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        T v = T(0.0f);
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = x[((b * H + iy) * W + ix) * C + c];
        cols[t] = v;
    }
}

#define EW_EXPORTS(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        add_scaled_##S(const T* a, float alpha, const T* b, float beta, T* y, long long n,      \
                       long long nb) {                                                          \
        add_scaled_body<T>(a, alpha, b, beta, y, n, nb);                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        activate_##S(const T* x, T* y, long long n, int act) {                                  \
        activate_body<T>(x, y, n, act);                                                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        permute_##S(const T* x, T* y, long long n, PermArgs p) {                                \
        permute_body<T>(x, y, n, p);                                                            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        copy_block_##S(const T* x, T* y, long long outer, int src_dim, int src_off,             \
                       int dst_dim, int dst_off, int len, long long inner) {                    \
        copy_block_body<T>(x, y, outer, src_dim, src_off, dst_dim, dst_off, len, inner);        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        window_partition_##S(const T* x, T* y, int B, int H, int W, int C, int ws, int nh,      \
                             int nw) {                                                          \
        window_partition_body<T>(x, y, B, H, W, C, ws, nh, nw);                                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        window_unpartition_##S(const T* x, T* y, int B, int H, int W, int C, int ws, int nh,    \
                               int nw) {                                                        \
        window_unpartition_body<T>(x, y, B, H, W, C, ws, nh, nw);                               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        scatter2x2_##S(const T* tmp, const T* bias, T* y, int B, int H, int W, int Cout) {      \
        scatter2x2_body<T>(tmp, bias, y, B, H, W, Cout);                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        im2col_##S(const T* x, T* cols, int B, int H, int W, int C, int kh, int kw, int stride, \
                   int pad, int Ho, int Wo) {                                                   \
        im2col_body<T>(x, cols, B, H, W, C, kh, kw, stride, pad, Ho, Wo);                       \
    }

EW_EXPORTS(float, f32)
EW_EXPORTS(__nv_bfloat16, bf16)
