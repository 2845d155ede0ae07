// mma.cuh -- sm_80+ warp-level tensor-core and async-copy wrappers (inline PTX) shared by the
// tensor-core kernels: mma.sync m16n8k16 bf16 with f32 accumulation, ldmatrix (plain and
// transposed), 16-byte cp.async with zero-fill, and the bf16 packing they need.
//
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// mma.sync.m16n8k16 fragment layout (g = lane/4, t = lane%4):
//   A (16x16 row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8 f32):        c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
// ----------------------------------------------------------------------------------------
#ifndef MEDSA_KEMU
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#else
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
    kemu::mma_bf16(c, a, b0, b1);
}
#endif

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&p);
}

__device__ __forceinline__ uint32_t lds32(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// Shared-memory address (32-bit, .shared window) of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous global -> shared copy (sm_80+), bypassing L1. valid == false copies
// nothing from src (src-size 0) and zero-fills the 16 destination bytes; src must still be
// a valid address (callers pass the tile base). dst and src must be 16-byte aligned.
#ifndef MEDSA_KEMU
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits for this thread's committed groups except the newest N (0: all of them). Copies not
// yet committed are not waited for.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait_group<0>(); }

// ldmatrix: four 8x8 bf16 matrices; lanes 8m..8m+7 give the 16-byte row addresses of
// matrix m, r[m] receives this lane's fragment of matrix m:
//   plain: (row lane/4, cols 2(lane%4), +1)   .trans: (rows 2(lane%4), +1; col lane/4)
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
#else  // the CPU emulator (tools/kemu): same semantics, checked
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    kemu::cp_async16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { kemu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    kemu::cp_async_wait_group(N);
}
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait_group<0>(); }
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) { kemu::ldsm_x4(r, addr, false); }
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], uint32_t addr) {
    kemu::ldsm_x4(r, addr, true);
}
#endif
