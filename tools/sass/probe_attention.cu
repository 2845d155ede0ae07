// probe_attention.cu -- the tensor-core attention kernel (kernels/attention.cu) specialised to
// the vit_b encoder's global blocks, for reading its SASS (tools/sass/hot-loops.sh): one
// sequence of 4096 tokens (a 64 x 64 grid with SAM's rel-pos tables), 12 heads of 64, q/k/v as
// column thirds of a packed qkv projection (row stride 2304), 16-byte aligned. With every
// runtime flag a constant, the compiler folds the paths these calls never take, so the key
// loop left in each probe is what a warp executes per 64-key tile on that shape.
// Not part of the build: nothing launches these kernels.
#include "attention.cu"

template <typename T>
__device__ __forceinline__ T* aligned16(T* p) {
    return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) & ~(uintptr_t)15);
}

template <int MT, bool E2, int OPTS>
__device__ __forceinline__ void probe(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                      const __nv_bfloat16* v, __nv_bfloat16* o,
                                      const __nv_bfloat16* rh, const __nv_bfloat16* rw,
                                      float scale) {
    const Rows rows = make_rows(0, blockIdx.z, 4096, 0, 0, 0, 0);
    attn_tc<64, MT, E2>(aligned16(q), aligned16(k), aligned16(v), aligned16(o), aligned16(rh),
                        aligned16(rw), 12, 4096, 4096, scale, 64, 64, 64, 1, 2304, rows, rows,
                        nullptr, nullptr, nullptr, OPTS);
}

#define PROBE(name, MT, E2, OPTS, MINB)                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, MINB)                           \
        name(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,          \
             __nv_bfloat16* o, const __nv_bfloat16* rh, const __nv_bfloat16* rw, float s) {   \
        probe<MT, E2, OPTS>(q, k, v, o, rh, rw, s);                                           \
    }

// The default kernel and each option of AttentionOptions alone (rel_mma only changes the
// prologue before the key loop), then all of them.
PROBE(probe_default, 1, false, 0, 3)
PROBE(probe_trim, 1, false, ATT_OPT_TRIM, 3)
PROBE(probe_exp2, 1, true, 0, 3)
PROBE(probe_prefetch, 1, false, ATT_OPT_PREFETCH, 3)
PROBE(probe_q128, 2, false, 0, 2)
PROBE(probe_q128_all, 2, true, ATT_OPT_TRIM | ATT_OPT_PREFETCH | ATT_OPT_REL_MMA, 2)
