// attention_tc.cuh -- the building blocks of attention.cu's bf16 tensor-core path (d == D
// exactly, D = 64 or 80): row loads, K/V tile staging, the rel-pos terms with mma, the softmax
// exponential and the whole-tile score loop. Included by attention.cu only, after its ATT_*
// constants; the kernel body (attn_tc) and the entry points stay there. The math, the shared
// memory layout and the paths are documented in attention.cu's header.
#pragma once

// ----------------------------------------------------------------------------------------
// bf16 tensor-core path, d == D exactly (D = 64 or 80).
// (fragment layouts and the mma / ldmatrix / cp.async wrappers: mma.cuh)
// ----------------------------------------------------------------------------------------

// Copy 8 consecutive bf16 (row `row` of a [L, rs] matrix, columns c..c+7) into dst[0..7];
// zero when !valid. vec: 16-byte loads allowed (base pointer 16-byte aligned).
__device__ __forceinline__ void load8(const __nv_bfloat16* src, bool valid, bool vec,
                                      __nv_bfloat16 dst[8]) {
    if (!valid) {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = __float2bfloat16_rn(0.f);
    } else if (vec) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(src));
        *reinterpret_cast<uint4*>(dst) = u;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = src[e];
    }
}

// dot(qrow[0..D), r[0..D)): qrow in shared memory (16-byte aligned), r in global memory.
// vec: r is 16-byte aligned (D is a multiple of 8, so every rh/rw row is then aligned too).
template <int D>
__device__ __forceinline__ float dot_row(const __nv_bfloat16* qrow, const __nv_bfloat16* r,
                                         bool vec) {
    float s = 0.f;
    if (vec) {
#pragma unroll 2
        for (int c = 0; c < D; c += 8) {
            const uint4 qq = *reinterpret_cast<const uint4*>(qrow + c);
            const uint4 rr = __ldg(reinterpret_cast<const uint4*>(r + c));
            const __nv_bfloat162* qp = reinterpret_cast<const __nv_bfloat162*>(&qq);
            const __nv_bfloat162* rp = reinterpret_cast<const __nv_bfloat162*>(&rr);
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const float2 a = __bfloat1622float2(qp[x]), b = __bfloat1622float2(rp[x]);
                s = fmaf(a.x, b.x, s);
                s = fmaf(a.y, b.y, s);
            }
        }
    } else {
#pragma unroll 8
        for (int c = 0; c < D; ++c) s = fmaf(__bfloat162float(qrow[c]), __bfloat162float(r[c]), s);
    }
    return s;
}

// One 64-key tile of K or V, tokens k0 .. k0+63 (rows through `rk`: `src` is the head's column
// 0 of the [rows, ri] matrix, `pad` the head's part of the pad row or null), columns 0..D-1,
// into dst[64][D+8] (row-major, row stride D+8 bf16 = a multiple of 16 bytes). Tokens >= Lk
// (and padding tokens without a pad row) are zero-filled. vec: asynchronous 16-byte cp.async
// (the caller commits and waits); otherwise synchronous scalar loads (visible after the
// caller's __syncthreads).
template <int D>
__device__ __forceinline__ void load_kv_tile(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                             const __nv_bfloat16* pad, const Rows& rk, int k0,
                                             int Lk, long long ri, bool vec, int tid) {
    constexpr int QST = D + 8, CH = D / 8;
    static_assert((ATT_BK * CH) % ATT_THREADS == 0, "tile chunks must divide evenly");
#pragma unroll
    for (int it = 0; it < ATT_BK * CH / ATT_THREADS; ++it) {
        const int e = tid + it * ATT_THREADS;
        const int j = e / CH, c = (e - j * CH) * 8;  // column chunk fastest: coalesced
        const __nv_bfloat16* row = k0 + j < Lk ? token_ptr(src, pad, rk, k0 + j, ri) : nullptr;
        const bool valid = row != nullptr;
        __nv_bfloat16* d = dst + j * QST + c;
        if (vec) {
            cp_async16(smem_u32(d), valid ? row + c : src, valid);
        } else {
            __align__(16) __nv_bfloat16 tmp[8];
            load8(valid ? row + c : src, valid, false, tmp);
            *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(tmp);
        }
    }
}

// Rel-pos terms of one warp's 16 query rows from a shift-invariant table (ATT_OPT_REL_MMA), on
// tensor cores. The table tab [n, n, D] (rh or rw as gathered for equal query and key sides)
// has tab[c, kc] = T[c - kc + n - 1] for a table T of 2n - 1 rows, and T[m] is the row
// tab[max(m - n + 1, 0), max(n - 1 - m, 0)]. Row r (0..15) of the warp is query
// qi = min(qf + r, Lq - 1) (rows past Lq have zero q, so they get zeros), its coordinate
// c = qi / qw (axis 0, rh) or qi % qw (axis 1, rw), and its terms are
//   dst[(i0 + r) * ds + col(kc)] = dot(q_qi, T[c - kc + n - 1]),  kc = 0 .. n-1,
// col(kc) = kc, or kc ^ 8*((i0 + r) & 3) when swz (the fast RW layout). The warp's coordinates
// span [cmin, cmax], so it needs T rows cmin .. cmax + n - 1: F = Q T^T over that range in
// 8-row n-tiles (m16n8k16, A = qa, the warp's Q fragments; B straight from the table rows, 4-byte
// loads through L1), each F[r][m] stored at kc = c(r) - m + n - 1 when 0 <= kc < n. Every
// (row, kc) is written exactly once. n-tile rows past 2n - 2 are clamped loads whose results
// map to kc < 0 and are dropped. tab must be 4-byte aligned.
template <int D, bool E2>
__device__ __forceinline__ void rel_terms_mma(const uint32_t (&qa)[D / 16][4],
                                              const __nv_bfloat16* __restrict__ tab, int n,
                                              int axis, int qf, int Lq, int qw, float* dst,
                                              int ds, bool swz, int i0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    auto coord = [&](int r) {
        const int qi = min(qf + r, Lq - 1);
        return axis == 0 ? qi / qw : qi - (qi / qw) * qw;
    };
    const int cl = coord(lane & 15);
    const int cmin = __reduce_min_sync(0xffffffffu, cl), cmax = __reduce_max_sync(0xffffffffu, cl);
    const int c0 = coord(g), c1 = coord(g + 8);  // coordinates of this lane's rows g and g + 8
    const int ntiles = (cmax - cmin + n + 7) >> 3;
    float* d0 = dst + (i0 + g) * ds;
    float* d1 = dst + (i0 + g + 8) * ds;
    const int sw0 = swz ? 8 * ((i0 + g) & 3) : 0, sw1 = swz ? 8 * ((i0 + g + 8) & 3) : 0;
    for (int nt = 0; nt < ntiles; ++nt) {
        const int mb = cmin + 8 * nt;              // first T row of this n-tile
        const int mr = min(mb + g, 2 * n - 2);     // this lane's B row (n index g)
        const __nv_bfloat16* trow =
            tab + ((long long)max(mr - n + 1, 0) * n + max(n - 1 - mr, 0)) * D;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t b0 = __ldg(reinterpret_cast<const unsigned int*>(trow + 16 * kk + 2 * t));
            const uint32_t b1 = __ldg(reinterpret_cast<const unsigned int*>(trow + 16 * kk + 8 + 2 * t));
            mma_bf16(acc, qa[kk], b0, b1);
        }
        // acc: (row g, m), (g, m + 1), (g + 8, m), (g + 8, m + 1) with m = mb + 2t
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = mb + 2 * t + (e & 1);
            const int kc = (e < 2 ? c0 : c1) - m + n - 1;
            if (kc >= 0 && kc < n) {
                const float term = E2 ? acc[e] * ATT_LOG2E : acc[e];
                if (e < 2)
                    d0[kc ^ sw0] = term;
                else
                    d1[kc ^ sw1] = term;
            }
        }
    }
}

// The softmax's exponential: e^x (__expf), or 2^x for the log2-unit scores of the exp2 kernels.
template <bool E2>
__device__ __forceinline__ float softmax_exp(float x) {
    return E2 ? ex2_approx(x) : __expf(x);
}

// Scale and rel-pos bias of one m-tile's scores on the whole-tile path (kw % 64 == 0: one ky
// per key tile, RW rows swizzled), and the rows' running maxima. s[nt][e] is row g (e < 2) or
// g + 8, key j0 + 8*nt + (e & 1); rw0 points at row g's RW entry for that key (row g + 8 at
// + 8*kw); kx = kxb + 8*nt + 2t (+1) is stored at kxb + 8*(nt ^ sw) + 2t (+1).
// MASK: keys past Lk score -inf. FOLD (the exp2 kernels): the row's RH term is left out of the
// scores and their maxima (the caller folds it into the rows' exp offsets), one add less per
// score.
template <bool MASK, bool FOLD, int NT>
__device__ __forceinline__ void scores_whole_tile(float (&s)[NT][4], float scale, float rh0,
                                                  float rh1, const float* rw0, int kw, int sw,
                                                  int j0, int Lk, float& mx0, float& mx1) {
    if (FOLD) rh0 = rh1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const float2 w0 = *reinterpret_cast<const float2*>(rw0 + 8 * (nt ^ sw));
        const float2 w1 = *reinterpret_cast<const float2*>(rw0 + 8 * kw + 8 * (nt ^ sw));
        const int j = j0 + 8 * nt;
        const bool v0 = !MASK || j < Lk, v1 = !MASK || j + 1 < Lk;
        if (FOLD) {
            s[nt][0] = v0 ? fmaf(s[nt][0], scale, w0.x) : -INFINITY;
            s[nt][1] = v1 ? fmaf(s[nt][1], scale, w0.y) : -INFINITY;
            s[nt][2] = v0 ? fmaf(s[nt][2], scale, w1.x) : -INFINITY;
            s[nt][3] = v1 ? fmaf(s[nt][3], scale, w1.y) : -INFINITY;
        } else {
            s[nt][0] = v0 ? s[nt][0] * scale + (rh0 + w0.x) : -INFINITY;
            s[nt][1] = v1 ? s[nt][1] * scale + (rh0 + w0.y) : -INFINITY;
            s[nt][2] = v0 ? s[nt][2] * scale + (rh1 + w1.x) : -INFINITY;
            s[nt][3] = v1 ? s[nt][3] * scale + (rh1 + w1.y) : -INFINITY;
        }
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
}
