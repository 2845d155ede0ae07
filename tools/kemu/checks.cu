// checks.cu -- kernels that are wrong on purpose, built into the emulator library only (never
// by build.rs, which compiles kernels/*.cu): tests/kernel_emu.rs launches each and requires the
// emulator to report its fault, and checks the emulated mma.sync against a plain product.
//
// Entry points (block (64, 1, 1) unless noted, grid (1, 1, 1)):
//   kemu_check_unsynced(float* out): each thread writes smem[t] = t and, with no barrier in
//     between, reads smem[63 - t] into out[t] (reads of unwritten, NaN-filled shared memory).
//   kemu_check_divergent(int* out): lanes 0-15 shuffle, lanes 16-31 reduce (block 32).
//   kemu_check_lost_lane(int* out): lane 0 returns, the others shuffle (block 32): a deadlock.
//   kemu_check_smem_range(float* out): a cp.async 16 bytes past the launch's dynamic shared
//     memory (launched with 256 bytes).
//   kemu_check_trap(float* out): __trap().
//   kemu_check_mma(const uint16_t* a, const uint16_t* b, float* d): one m16n8k16 product,
//     A [16][16] and B [16][8] row-major bf16, D [16][8] row-major = A B, through the fragment
//     layout of mma.cuh (block 32).
#include "common.cuh"
#include "mma.cuh"

extern "C" __global__ void kemu_check_unsynced(float* out) {
    EXTERN_SMEM_F4(smem_f4);
    float* s = reinterpret_cast<float*>(smem_f4);
    const int t = threadIdx.x;
    s[t] = (float)t;
    out[t] = s[63 - t];
}

extern "C" __global__ void kemu_check_divergent(int* out) {
    const int lane = threadIdx.x & 31;
    out[lane] = lane < 16 ? __shfl_xor_sync(0xffffffffu, lane, 1)
                          : __reduce_max_sync(0xffffffffu, lane);
}

extern "C" __global__ void kemu_check_lost_lane(int* out) {
    const int lane = threadIdx.x & 31;
    if (lane == 0) return;
    out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
}

extern "C" __global__ void kemu_check_smem_range(float* out) {
    EXTERN_SMEM_F4(smem_f4);
    if (threadIdx.x == 0) cp_async16(smem_u32(smem_f4) + 256, out, true);
    cp_async_wait_all();
}

extern "C" __global__ void kemu_check_trap(float* out) {
    if (threadIdx.x == 3) __trap();
    out[threadIdx.x] = 1.f;
}

extern "C" __global__ void kemu_check_mma(const uint16_t* a, const uint16_t* b, float* d) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto pair = [](const uint16_t* p, int i, int j) {  // p[i], p[j] packed, p[i] low
        return (uint32_t)p[i] | ((uint32_t)p[j] << 16);
    };
    const uint32_t fa[4] = {
        pair(a, g * 16 + 2 * t, g * 16 + 2 * t + 1),
        pair(a, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1),
        pair(a, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9),
        pair(a, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9),
    };
    const uint32_t b0 = pair(b, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
    const uint32_t b1 = pair(b, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16(c, fa, b0, b1);
    d[g * 8 + 2 * t] = c[0];
    d[g * 8 + 2 * t + 1] = c[1];
    d[(g + 8) * 8 + 2 * t] = c[2];
    d[(g + 8) * 8 + 2 * t + 1] = c[3];
}
