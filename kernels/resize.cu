// resize.cu -- 2-D resize of channels-first planes, matching PyTorch F.interpolate with
// align_corners=False (no scale_factor: scale = (float)in/out).
//
// resize_bilinear_<t>(const T* x, T* y, int BC, int H, int W, int h, int w)
// resize_bicubic_<t>(const T* x, T* y, int BC, int H, int W, int h, int w)
//   x: [BC, H, W] -> y: [BC, h, w] (BC = batch*channels planes).
//   bilinear: src = (dst+0.5)*(in/out) - 0.5, clamped below at 0; i0 = floor(src) (= trunc),
//     i1 = min(i0+1, in-1), l = src - i0; y = (1-ly)*((1-lx)*x00 + lx*x01) + ly*(...row i1...).
//   bicubic: src = (dst+0.5)*(in/out) - 0.5 (no clamp); i = floor(src), t = src - i; taps
//     i-1..i+2 clamped to [0, in-1]; Keys cubic convolution with A = -0.75; rows are
//     interpolated along x first, then the 4 results along y (PyTorch's order).
//
// Launch geometry (both): grid-stride; block = (256,1,1),
//   grid = (min(ceil(BC*h*w/256), 65535*4), 1, 1), dynamic shared memory = 0.
#include "common.cuh"

__device__ __forceinline__ float src_index(float scale, int dst) {
    return scale * ((float)dst + 0.5f) - 0.5f;
}

template <typename T>
__device__ __forceinline__ void bilinear_body(const T* __restrict__ x, T* __restrict__ y, int BC,
                                              int H, int W, int h, int w) {
    const float sh = (float)H / (float)h, sw = (float)W / (float)w;
    const long long n = (long long)BC * h * w;
    GRID_STRIDE(t, n) {
        const int ox = (int)(t % w);
        const long long r = t / w;
        const int oy = (int)(r % h);
        const long long p = r / h;
        const float fy = fmaxf(src_index(sh, oy), 0.f);
        const float fx = fmaxf(src_index(sw, ox), 0.f);
        const int y0 = min((int)fy, H - 1), x0 = min((int)fx, W - 1);
        const int y1 = min(y0 + 1, H - 1), x1 = min(x0 + 1, W - 1);
        const float ly = fy - (float)y0, lx = fx - (float)x0;
        const T* xp = x + p * H * W;
        const float v00 = ld(xp + (long long)y0 * W + x0), v01 = ld(xp + (long long)y0 * W + x1);
        const float v10 = ld(xp + (long long)y1 * W + x0), v11 = ld(xp + (long long)y1 * W + x1);
        const float v = (1.f - ly) * ((1.f - lx) * v00 + lx * v01) +
                        ly * ((1.f - lx) * v10 + lx * v11);
        st(y + t, v);
    }
}

// Keys cubic convolution weights for fractional offset t in [0,1), A = -0.75.
__device__ __forceinline__ void cubic_weights(float t, float wt[4]) {
    const float A = -0.75f;
    // |x| <= 1: ((A+2)|x| - (A+3))|x|^2 + 1 ; 1 < |x| < 2: ((A|x| - 5A)|x| + 8A)|x| - 4A
    const float x0 = t + 1.f, x1 = t, x2 = 1.f - t, x3 = 2.f - t;
    wt[0] = ((A * x0 - 5.f * A) * x0 + 8.f * A) * x0 - 4.f * A;
    wt[1] = ((A + 2.f) * x1 - (A + 3.f)) * x1 * x1 + 1.f;
    wt[2] = ((A + 2.f) * x2 - (A + 3.f)) * x2 * x2 + 1.f;
    wt[3] = ((A * x3 - 5.f * A) * x3 + 8.f * A) * x3 - 4.f * A;
}

template <typename T>
__device__ __forceinline__ void bicubic_body(const T* __restrict__ x, T* __restrict__ y, int BC,
                                             int H, int W, int h, int w) {
    const float sh = (float)H / (float)h, sw = (float)W / (float)w;
    const long long n = (long long)BC * h * w;
    GRID_STRIDE(t, n) {
        const int ox = (int)(t % w);
        const long long r = t / w;
        const int oy = (int)(r % h);
        const long long p = r / h;
        const float fy = src_index(sh, oy), fx = src_index(sw, ox);
        const float iyf = floorf(fy), ixf = floorf(fx);
        const int iy = (int)iyf, ix = (int)ixf;
        float wy[4], wx[4];
        cubic_weights(fy - iyf, wy);
        cubic_weights(fx - ixf, wx);
        int xs[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) xs[k] = min(max(ix - 1 + k, 0), W - 1);
        const T* xp = x + p * H * W;
        float acc = 0.f;
#pragma unroll
        for (int ky = 0; ky < 4; ++ky) {
            const int yy = min(max(iy - 1 + ky, 0), H - 1);
            const T* rp = xp + (long long)yy * W;
            const float rv = ld(rp + xs[0]) * wx[0] + ld(rp + xs[1]) * wx[1] +
                             ld(rp + xs[2]) * wx[2] + ld(rp + xs[3]) * wx[3];
            acc += rv * wy[ky];
        }
        st(y + t, acc);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    resize_bilinear_f32(const float* x, float* y, int BC, int H, int W, int h, int w) {
    bilinear_body<float>(x, y, BC, H, W, h, w);
}
extern "C" __global__ void __launch_bounds__(256)
    resize_bilinear_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int BC, int H, int W, int h,
                         int w) {
    bilinear_body<__nv_bfloat16>(x, y, BC, H, W, h, w);
}
extern "C" __global__ void __launch_bounds__(256)
    resize_bicubic_f32(const float* x, float* y, int BC, int H, int W, int h, int w) {
    bicubic_body<float>(x, y, BC, H, W, h, w);
}
extern "C" __global__ void __launch_bounds__(256)
    resize_bicubic_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int BC, int H, int W, int h,
                        int w) {
    bicubic_body<__nv_bfloat16>(x, y, BC, H, W, h, w);
}
