// kemu.h -- the CUDA device dialect of kernels/*.cu, for running those kernels on the CPU
// (tests/kernel_emu.rs). Force-included (-include) before a kernel source compiled as C++ by
// tools/kemu/kemu.cpp; kernels/common.cuh and kernels/mma.cuh switch their inline PTX to the
// kemu:: functions below when MEDSA_KEMU is defined.
//
// Execution model (kemu.cpp): one block at a time per host thread; each thread of the block is a coroutine on
// its own stack. A thread runs until it reaches a barrier (__syncthreads) or a warp collective
// (shuffles, warp reductions, mma.sync, ldmatrix), where it waits until every thread the
// barrier needs has arrived; the last one to arrive performs the collective for all lanes.
// This is enough to run the kernels' real code, fragment layouts and index math, and to catch:
//   - lanes of a warp that reach different collectives (divergent mma/shuffle), and deadlocks;
//   - reads of shared memory nobody wrote (it is filled with NaN bytes before every block);
//   - shared-memory addresses out of the launch's dynamic size, misaligned ldmatrix/cp.async;
//   - missing cp.async waits (copies can be deferred to the wait) and barrier races (threads
//     can be scheduled in several orders: results that differ between orders are races);
//   - __trap() (the launch fails with the trap's location, as a real launch would).
// It does not model timing, the memory consistency of real hardware or register limits, and
// mma.sync sums in double (the hardware's own rounding inside a tensor-core sum is not
// emulated): results match the CPU reference within the same tolerances as on a GPU.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>

#define MEDSA_KEMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
// Static shared arrays: a host thread runs one block at a time, so a function-level static of
// that thread is the block's shared memory. (Dynamic shared memory: common.cuh's
// EXTERN_SMEM_F4.) Every emulator state is per host thread: launches from several threads run
// in parallel.
#define __shared__ static thread_local

// ---- vector types -------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- bf16 (round to nearest even, like cuda_bf16.h and the `half` crate) ------------------
struct __nv_bfloat16;
inline __nv_bfloat16 __float2bfloat16_rn(float f);
struct alignas(2) __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f);  // round to nearest even, as cuda_bf16.h's constructor
    static __nv_bfloat16 from_bits(uint16_t b) {
        __nv_bfloat16 h;
        h.bits = b;
        return h;
    }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = uint32_t(h.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return __nv_bfloat16::from_bits(uint16_t((u >> 16) | 0x40u));  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16::from_bits(uint16_t(u >> 16));
}
inline __nv_bfloat16::__nv_bfloat16(float f) : bits(__float2bfloat16_rn(f).bits) {}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return {__bfloat162float(v.x), __bfloat162float(v.y)};
}

// ---- the emulator's state and collectives (kemu.cpp) --------------------------------------
namespace kemu {
struct Thread;
extern thread_local Thread* cur;  // the running thread
extern thread_local uint3 block_idx;  // blockIdx of the running block
extern thread_local dim3 grid_dim, block_dim;
extern thread_local unsigned dyn_smem;  // dynamic shared memory bytes of this launch
const uint3& thread_idx();

[[noreturn]] void fail(const char* what);  // ends the launch with an error
void syncthreads();
uint64_t shfl(uint64_t v, int lane_or_mask, bool xor_mode, unsigned mask);
int64_t reduce(int64_t v, bool is_max, unsigned mask);
void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
void ldsm_x4(uint32_t r[4], uint32_t addr, bool trans);
void cp_async16(uint32_t dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait_group(int n);  // all committed groups but the newest n land
uint32_t smem_offset(const void* p);  // __cvta_generic_to_shared, checked
float4* dyn_smem_f4();
}  // namespace kemu

#define threadIdx (kemu::thread_idx())
#define blockIdx (kemu::block_idx)
#define blockDim (kemu::block_dim)
#define gridDim (kemu::grid_dim)

#define KEMU_STR2(x) #x
#define KEMU_STR(x) KEMU_STR2(x)
#define __trap() kemu::fail("__trap() at " __FILE__ ":" KEMU_STR(__LINE__))

inline void __syncthreads() { kemu::syncthreads(); }

namespace kemu {
template <typename T>
inline T shuffle(unsigned mask, T v, int lane, bool xor_mode, int width) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    if (width != 32) fail("shuffles with width != 32 are not emulated");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    u = shfl(u, lane, xor_mode, mask);
    T r;
    memcpy(&r, &u, sizeof(T));
    return r;
}
}  // namespace kemu
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return kemu::shuffle(mask, v, lane_mask, true, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return kemu::shuffle(mask, v, src_lane, false, width);
}
inline int __reduce_max_sync(unsigned mask, int v) { return (int)kemu::reduce(v, true, mask); }
inline int __reduce_min_sync(unsigned mask, int v) { return (int)kemu::reduce(v, false, mask); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return (unsigned)kemu::reduce(v, true, mask);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return (unsigned)kemu::reduce(v, false, mask);
}
inline size_t __cvta_generic_to_shared(const void* p) { return kemu::smem_offset(p); }

// ---- device math --------------------------------------------------------------------------
// __expf is ex2.approx of x * log2(e) on the GPU.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
