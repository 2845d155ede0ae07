// common.cuh -- shared helpers for the medsa CUDA kernels.
//
// * ld/st: load a T (float or __nv_bfloat16) as f32, store an f32 as T (bf16: round to
//   nearest even). All kernel arithmetic and accumulation is done in f32.
// * warp_sum / warp_max: full-warp butterfly reductions (all 32 lanes must participate).
// * block_sum: block-wide sum for any blockDim.x that is a multiple of 32 (<= 1024); every
//   thread of the block must call it; every thread gets the total.
// * PermArgs: the by-value argument of permute_<t> (see elementwise.cu).
// * GRID_STRIDE(i, n): 64-bit grid-stride loop over [0, n).
// * dyn_smem_bytes: the dynamic shared memory this launch was given (kernels that need a minimum
//   check it and trap, so a launcher's mistake is a launch error, not a silent overrun).
// * EXTERN_SMEM_F4(name): declares the dynamic shared memory as float4 name[].
// * ex2_approx(x): 2^x on the special-function unit.
// * MEDSA_KEMU: defined when a kernel is compiled as C++ for the CPU emulator (tools/kemu,
//   tests/kernel_emu.rs); this file and mma.cuh then call the emulator instead of inline PTX.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Argument of permute_<t>, passed by value. 8 + 48 + 48 = 104 bytes, 8-byte aligned.
struct __align__(8) PermArgs {
    int rank;                 // 1..6
    int pad;                  // unused
    long long out_dims[6];    // output dims, row-major; entries >= rank ignored
    long long in_strides[6];  // input stride (in elements) of the input axis feeding output axis d
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// `sh` must point to at least 32 floats of shared memory. Safe to call repeatedly with the
// same buffer (it synchronises before overwriting it). Summation order is fixed, so the
// result is deterministic and identical in every thread.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();                  // previous readers of sh are done
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    float r = 0.f;
    for (int i = 0; i < nw; ++i) r += sh[i];
    return r;
}

#define GRID_STRIDE(i, n)                                                        \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

#ifndef MEDSA_KEMU
// 2^x with the special-function unit's ex2.approx (flush-to-zero): what __expf uses after
// multiplying by log2(e).
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ unsigned dyn_smem_bytes() {
    unsigned r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
// The block's dynamic shared memory, as float4 (a macro so the CPU emulator, tools/kemu, can
// supply it).
#define EXTERN_SMEM_F4(name) extern __shared__ float4 name[]
#else
__device__ __forceinline__ float ex2_approx(float x) { return exp2f(x); }
__device__ __forceinline__ unsigned dyn_smem_bytes() { return kemu::dyn_smem; }
#define EXTERN_SMEM_F4(name) float4* const name = kemu::dyn_smem_f4()
#endif
