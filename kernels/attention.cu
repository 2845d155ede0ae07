// attention.cu -- multi-head attention forward (flash style, online softmax, optional SAM
// decomposed relative-position bias). Scores are never materialised beyond one 64x64 tile.
//
// Entry points (same signature, T = float / __nv_bfloat16):
//   attention_f32 / attention_bf16(const T* q, const T* k, const T* v, T* o,
//       const T* rh, const T* rw, int B, int heads, int Lq, int Lk, int d, float scale,
//       int qh, int qw, int kh, int kw, int has_rel, int ldi,
//       int map, int ma, int mb, int mc, int md, int b_off,
//       const T* pad_q, const T* pad_k, const T* pad_v, int opts)
//   attention_q128_bf16(same arguments as attention_bf16): the 128-query variant, d == 64 only.
//   attention_exp2_bf16, attention_q128_exp2_bf16 (same arguments): attention_bf16 and
//   attention_q128_bf16 with the tensor-core path's softmax in log2 units (see Paths).
//   ldi: row stride (elements) of q, k and v, heads*d for separate tensors or 3*heads*d when
//   they are column slices of one packed qkv projection (no split copies); o has row stride
//   heads*d.
//
// Token rows (`map`): sequence b (= blockIdx.z + b_off) and position j (< Lq or < Lk) name
//   row(b, j) of q/k/v (row stride ldi) and of o (row stride heads*d):
//   map 0, plain:   row = b * L + j  (q/o with L = Lq, k/v with L = Lk): o is [B, Lq, heads*d].
//   map 1, windows of a [N, H, W] token map (ma = ws, mb = H, mc = W, md = nw = ceil(W/ws),
//          nh = ceil(H/ws), B = N * nh * nw, Lq = Lk = ws*ws): window b is image b / (nh*nw),
//          window row wy = (b % (nh*nw)) / nw, column wx = (b % (nh*nw)) % nw; token j is
//          (y, x) = (wy*ws + j/ws, wx*ws + j%ws) and row = (img*H + y)*W + x when y < H and
//          x < W. Otherwise j is a padding token: its q/k/v are read from pad_q/pad_k/pad_v
//          (one row each, column h*d + c for head h) and its output is not written. This is
//          SAM's window partition + padding + unpartition folded into the indexing.
//   map 2, depth (ma = P, the tokens per slice; B = V * P, Lq = Lk = D slices): sequence
//          b = (v, p) = (b / P, b % P), row = (v*D + j) * P + p: token p of slice j of
//          volume v in the slice-major layout (the SD-Trans transposes folded in).
//   The launcher splits B over several launches (b_off) when it exceeds 65535.
//
// Math: q [B, Lq, heads*d], k/v [B, Lk, heads*d], o [B, Lq, heads*d]; head h uses columns
//   h*d .. h*d+d-1. For each (b, h, query i):
//     s_j = scale * dot(q_i, k_j) + bias(i, j),   o_i = sum_j softmax_j(s) v_j
//   has_rel != 0: qy = i / qw, qx = i % qw, ky = j / kw, kx = j % kw,
//     bias(i, j) = dot(q_i, rh[qy, ky, :]) + dot(q_i, rw[qx, kx, :])  (UNSCALED q),
//     rh [qh, kh, d], rw [qw, kw, d], shared by all heads; requires Lq = qh*qw, Lk = kh*kw.
//   has_rel == 0: bias = 0; rh/rw may be null and qh/qw/kh/kw are ignored.
//   Requires 1 <= d <= 128 (the kernel does nothing for d > 128: the launcher must reject it),
//   Lq >= 1, Lk >= 1. All softmax statistics and accumulators are f32.
//
// opts (bit set; the tensor-core path reads it, the SIMT path ignores it):
//   ATT_OPT_REL_MMA (1): the caller promises that the rel-pos tables depend on the offset only
//     (qh == kh, qw == kw, rh[qy, ky] = Th[qy - ky + kh - 1], rw likewise: SAM's gathered
//     tables), so the terms may be computed with mma (see Paths). Same sums, another order.
//   ATT_OPT_TRIM (2): skip the mma and softmax work of a warp's 16-row query m-tiles that lie
//     wholly past Lq, and of 16-key groups of a key tile that lie wholly past Lk (the last
//     tiles of a 196-token window: 208 of 256 query rows and 208 of 256 keys carry work).
//     Outputs are bit-identical: the skipped rows are never stored, and the skipped keys'
//     probabilities are exact zeros against zero-filled V rows. It also drops the key-validity
//     masking of the whole-tile rel-pos path (kw % 64 == 0, so Lk is a multiple of 64 and no
//     key of any tile is past Lk: the global blocks' score loop loses a compare and a select
//     per score).
//   ATT_OPT_PREFETCH (4): second K and V buffers, so each K and V tile is fetched one whole key
//     tile ahead (instead of during the previous tile's P*V, and during Q*K^T + softmax) and
//     each key tile needs one block barrier instead of two. The second K buffer is the Q
//     tile's shared memory, dead once the key loop starts, and so is the second V buffer in
//     attention_q128_bf16 (its Q tile holds two); attention_bf16 needs 2*64*(d+8) bytes more
//     (see Launch geometry). Same arithmetic: outputs are bit-identical.
//
// Launch geometry (attention_f32, attention_bf16; attention_q128_bf16 differs where noted):
//   grid  = (ceil(Lq/64), heads, nb)      (heads <= 65535, nb <= 65535; sequences b_off .. +nb)
//           attention_q128_bf16: (ceil(Lq/128), heads, nb)
//   block = (128, 1, 1)
//   dynamic shared memory (bytes), with R = has_rel ? (kh + kw) : 0 and
//     Dp = 16 if d <= 16, 32 if d <= 32, 64 if d <= 64, 80 if d <= 80, else 128:
//   * attention_f32 (any d), and attention_bf16 when d is NOT 64 or 80 (SIMT path):
//       SMEM_SIMT = 4 * (64*(Dp+1)*2 + 64*Dp + 64*65 + 64*R)
//       e.g. d=64, kh=kw=64: 4*(8320+4096+4160+8192) = 99072;  d=80, kh=kw=64: 111360;
//            d=128, kh=kw=64: 148224;  d=64, no rel: 66304
//   * attention_bf16 when d == 64 or d == 80 (tensor-core path):
//       SMEM_TC = 2 * (2*64*(d+8) + d*72) + (has_rel ? 4 * 64*(kh + kw + 2) : 0)
//       e.g. d=64, kh=kw=64: 27648 + 33280 = 60928;  d=80, kh=kw=64: 34048 + 33280 = 67328;
//            d=64, no rel: 27648
//       (the kernel itself uses 2*3*64*(d+8) + (has_rel ? 4*64*(kh+1 + kw + (kw%64 ? 1 : 0))
//        : 0) <= SMEM_TC for d = 64, 80, and traps only if given less than that.)
//     (SMEM_SIMT >= SMEM_TC always, so passing SMEM_SIMT is also correct, only slower.)
//   * attention_q128_bf16 (d == 64):
//       SMEM_TC2 = 2 * (128 + 2*64) * 72 + (has_rel ? 4 * 128*(kh + kw + 2) : 0)
//       e.g. kh=kw=64: 36864 + 66560 = 103424 (two blocks per SM on sm_90, one on sm_80; more
//       than sm_86/sm_89 allow, where the launcher keeps attention_bf16);  kh=kw=14: 52224
//       (the kernel uses 2*256*72 + (has_rel ? 4*128*(kh+1 + kw + (kw%64 ? 1 : 0)) : 0)).
//   * attention_bf16 (and attention_exp2_bf16), tensor-core path, with ATT_OPT_PREFETCH:
//       SMEM_TC + 2*64*(d+8) (the second V buffer), e.g. d=64, kh=kw=64: 70144 (still three
//       blocks per SM on sm_90, two on sm_80, one on sm_86/89, as without it).
//   Above 48 KB the launcher must raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES.
//   The kernel reads %dynamic_smem_size and TRAPS (launch failure) if given less than needed.
//   attention_f32 and attention_bf16 are compiled with __launch_bounds__(128, 3) (<= 168
//   registers, no spills), attention_q128_bf16 with (128, 2) (<= 255 registers; 240-254 used,
//   no spills).
//
// Paths:
//   * attention_f32: SIMT f32 FMAs from shared memory for every d ("exact": f32 all through,
//     expf). Thread (ty = tid/16, tx = tid%16) owns query rows ty+8a (a < 8) and key columns
//     tx+16b (b < 4) of the 64x64 score tile, and output columns tx+16c (c < Dp/16).
//   * attention_bf16, d == 64 or 80: bf16 tensor cores, mma.sync.m16n8k16 (f32 accumulate);
//     each of the 4 warps owns 16 query rows; P is rounded to bf16 for the P*V product (as in
//     FlashAttention-2); softmax uses __expf (fast ex2.approx; arguments are <= 0 after max
//     subtraction, relative error ~1e-6, far below bf16 resolution). K and V tiles are
//     fetched with cp.async (16-byte, zero-filled past Lk; synchronous scalar loads when q/k/v,
//     the pad rows or ldi are not 16-byte aligned) into row-major [64][d+8] buffers: the V tile load
//     overlaps Q*K^T + softmax, the next K tile load overlaps P*V. B fragments come from
//     ldmatrix (.trans for V). With has_rel and kw % 64 == 0 the rh term is read once per
//     row per key tile and the rw term as swizzled float2.
//     Rel-pos terms (f32 tables RH [rows][kh], RW [rows][kw] in shared memory, written once
//     before the key loop): by default SIMT dot products, one per (row, ky) and (row, kx),
//     64 * (kh + kw) of length d per 64 rows; with ATT_OPT_REL_MMA (and 4-byte aligned tables), each
//     warp multiplies its 16 rows' Q fragments with the table rows Th[cmin .. cmax + kh - 1]
//     (cmin/cmax: the rows' smallest and largest qy; likewise Tw and qx) on tensor cores and
//     scatters the products to their (row, ky): (cmax - cmin + kh, rounded up to 8) * 16 * d
//     tensor-core multiply-adds per table and warp (global 64x64 grid: 64 rows for rh, 79 -> 80
//     for rw) instead of 16 * kh SIMT dot products (rel_terms_mma). Same sums in another order
//     (f32).
//   * attention_bf16, other d: the SIMT path above (bf16 loads, f32 math).
//   * attention_exp2_bf16, attention_q128_exp2_bf16: the tensor-core path (other d: the SIMT
//     path, as attention_bf16) with the softmax in log2 units: log2(e) folded into the score
//     scale and into the RH/RW terms as they are written, so each probability is ex2(score -
//     offset) (ex2.approx, as __expf uses after its multiply); on the whole-tile rel-pos path the
//     row's RH term (constant over a key tile) stays out of the scores and their maxima and goes
//     into the row's offset. Two instructions fewer per score; same math in another rounding.
//   * attention_q128_bf16: the tensor-core path with 128 query rows per block, each warp owning
//     two 16-row m-tiles (rows 16w.. and 64+16w..): every K and V fragment loaded from shared
//     memory feeds two mmas instead of one, and each K/V tile staged in shared memory serves
//     twice the queries (half the ldmatrix traffic and block barriers per FLOP), at the cost of
//     ~250 registers (two blocks per SM instead of three). Same math and rounding as
//     attention_bf16: its outputs are bit-identical.
#include "common.cuh"
#include "mma.cuh"
#include "token_rows.cuh"

#define ATT_BQ 64
#define ATT_BK 64
#define ATT_THREADS 128
#define ATT_OPT_REL_MMA 1
#define ATT_OPT_TRIM 2
#define ATT_OPT_PREFETCH 4
#define ATT_LOG2E 1.4426950408889634f

#include "attention_simt.cuh"

// ----------------------------------------------------------------------------------------
// bf16 tensor-core path, d == D exactly (D = 64 or 80): its helpers are in attention_tc.cuh.
// ----------------------------------------------------------------------------------------
#include "attention_tc.cuh"

// MT = query m-tiles per warp: the block owns BQ = 64*MT query rows; warp w owns rows
// 64*mt + 16*w + 0..15 (mt < MT), so every K/V fragment read from shared memory feeds MT mmas.
// Shared memory (bf16 elements, QST = D + 8): Qs [BQ][QST], Ks [64][QST], Vs [64][QST]
// (V row-major: key rows), then f32 RH [BQ][kh+1] and RW [BQ][RWS] when has_rel
// (RWS = kw when kw % 64 == 0, else kw + 1). Total <= SMEM_TC (MT = 1) or SMEM_TC2 (MT = 2)
// of the header.
// Pipeline per key tile t (FlashAttention-2 style, one K and one V buffer):
//   wait(K_t), sync | issue V_t async | S = Q K_t^T, softmax | wait(V_t), sync |
//   issue K_{t+1} async | O += P V_t
// so the V load overlaps QK^T + softmax and the next K load overlaps P V.
// ATT_OPT_PREFETCH (two K and two V buffers; tile t in Ks/Vs for even t, K2/V2 for odd t):
//   wait(K_t, V_t), sync | issue K_{t+1}, V_{t+1} (the other buffers) | S = Q K_t^T, softmax |
//   O += P V_t
// so both loads overlap a whole tile's work, and one barrier per tile is enough: the one at
// the top also tells every thread that the other buffers' previous tile is done with.
template <int D, int MT, bool E2>
__device__ __forceinline__ void attn_tc(const __nv_bfloat16* __restrict__ q,
                                        const __nv_bfloat16* __restrict__ k,
                                        const __nv_bfloat16* __restrict__ v,
                                        __nv_bfloat16* __restrict__ o,
                                        const __nv_bfloat16* __restrict__ rh,
                                        const __nv_bfloat16* __restrict__ rw, int heads, int Lq,
                                        int Lk, float scale, int qw, int kh, int kw,
                                        int has_rel, int ldi, const Rows& rq, const Rows& rk,
                                        const __nv_bfloat16* pq, const __nv_bfloat16* pk,
                                        const __nv_bfloat16* pv, int opts) {
    static_assert(D % 16 == 0 && (D / 8) % 2 == 0, "D must be a multiple of 16");
    constexpr int QST = D + 8;       // bf16 row stride of Qs/Ks/Vs (conflict-free ldmatrix)
    constexpr int KS = D / 16;       // k-steps over the head dim
    constexpr int NT = ATT_BK / 8;   // score n-tiles per key tile
    constexpr int DT = D / 8;        // output n-tiles (even)
    constexpr int CH = D / 8;        // 8-element chunks per row
    constexpr int BQ = ATT_BQ * MT;  // query rows per block
    EXTERN_SMEM_F4(smem_f4);
    // fast: kw % 64 == 0 (global attention). Every 64-key tile then has one ky (k0 % 64 == 0)
    // and kx = (k0 % kw) + 0..63, so RH is read once per row per tile and RW is read as
    // float2 from rows stored with an XOR swizzle (col kx ^ 8*(row & 3), stride kw):
    // conflict-free 8-byte reads.
    // Otherwise bias rows are padded to an odd length (kh + 1, kw + 1): the 8 row groups of a
    // warp hit 8 different banks.
    const bool fast = has_rel && (kw % ATT_BK) == 0;
    const int RHS = kh + 1, RWS = fast ? kw : kw + 1;
    const int R = has_rel ? (RHS + RWS) : 0;  // <= kh + kw + 2
    const bool pf = (opts & ATT_OPT_PREFETCH) != 0;
    const bool v2_extra = pf && BQ < 2 * ATT_BK;  // the Q tile holds no second V buffer
    {
        const unsigned need = 2u * (unsigned)((BQ + (v2_extra ? 3 : 2) * ATT_BK) * QST) +
                              4u * (unsigned)(BQ * R);
        if (dyn_smem_bytes() < need) __trap();
    }
    __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem_f4);
    __nv_bfloat16* Ks = Qs + BQ * QST;
    __nv_bfloat16* Vs = Ks + ATT_BK * QST;
    // byte offset 2*(BQ+128)*QST, then + 4*BQ*RHS: both multiples of 16 (QST = D + 8, D % 16 == 0)
    float* RH = reinterpret_cast<float*>(Vs + ATT_BK * QST);
    float* RW = RH + BQ * (has_rel ? RHS : 0);
    // ATT_OPT_PREFETCH: the second K buffer is Qs: Q is read only before the key loop (into the
    // warps' Q fragments and by the rel-pos dot products), and the first fetch into K2 comes
    // after the first tile's barrier, when every thread is done with it. BQ >= 64 rows hold a
    // K tile; with BQ = 128 the second V buffer is the rest of Qs, otherwise it follows the
    // rel-pos tables (byte offset of RH + 4*BQ*R: a multiple of 16, BQ being 64 or 128).
    __nv_bfloat16* K2 = Qs;
    __nv_bfloat16* V2 = v2_extra ? reinterpret_cast<__nv_bfloat16*>(RH + BQ * R) : Qs + ATT_BK * QST;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, q0 = blockIdx.x * BQ;
    const long long rs = (long long)heads * D;  // row stride of o
    const long long ri = ldi;                   // row stride of q/k/v
    const long long hd = (long long)h * D;
    const __nv_bfloat16* qb = q + hd;
    const __nv_bfloat16* kb = k + hd;
    const __nv_bfloat16* vb = v + hd;
    const __nv_bfloat16* pqb = pq ? pq + hd : nullptr;
    const __nv_bfloat16* pkb = pk ? pk + hd : nullptr;
    const __nv_bfloat16* pvb = pv ? pv + hd : nullptr;
    // 16-byte vector loads need 16-byte aligned bases and row strides (multiples of 8 elements;
    // D is one, so every head's column 0 is aligned too).
    const bool vec = ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                       reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(pq) |
                       reinterpret_cast<uintptr_t>(pk) | reinterpret_cast<uintptr_t>(pv)) & 15) == 0 &&
                     (ldi % 8) == 0;

    // Prefetch K tile 0 (PREFETCH: and V tile 0) while Q and the bias tables are prepared.
    load_kv_tile<D>(Ks, kb, pkb, rk, 0, Lk, ri, vec, tid);
    if (pf) load_kv_tile<D>(Vs, vb, pvb, rk, 0, Lk, ri, vec, tid);
    cp_async_commit();

    for (int e = tid; e < BQ * CH; e += ATT_THREADS) {
        const int i = e / CH, c = (e - i * CH) * 8;
        __align__(16) __nv_bfloat16 tmp[8];
        const __nv_bfloat16* row = q0 + i < Lq ? token_ptr(qb, pqb, rq, q0 + i, ri) : nullptr;
        load8(row ? row + c : qb, row != nullptr, vec, tmp);
        *reinterpret_cast<uint4*>(Qs + i * QST + c) = *reinterpret_cast<const uint4*>(tmp);
    }
    __syncthreads();

    // Q fragments of this warp's 16*MT rows, kept in registers for the whole kernel.
    const int r00 = warp * 16 + g;  // m-tile mt: tile-local rows 64*mt + r00 and + 8
    uint32_t qa[MT][KS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int r0 = 64 * mt + r00;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            qa[mt][kk][0] = lds32(Qs + r0 * QST + 16 * kk + 2 * t);
            qa[mt][kk][1] = lds32(Qs + (r0 + 8) * QST + 16 * kk + 2 * t);
            qa[mt][kk][2] = lds32(Qs + r0 * QST + 16 * kk + 8 + 2 * t);
            qa[mt][kk][3] = lds32(Qs + (r0 + 8) * QST + 16 * kk + 8 + 2 * t);
        }
    }

    // Rel-pos terms. ATT_OPT_REL_MMA (shift-invariant tables, equal query and key grids: Lq == Lk
    // and qw == kw, so qh == kh): each warp computes its own rows' terms with mma
    // (rel_terms_mma); otherwise the block computes every row's as SIMT dot products.
    const bool rel_mma = has_rel && (opts & ATT_OPT_REL_MMA) && qw == kw && Lq == Lk &&
                         ((reinterpret_cast<uintptr_t>(rh) | reinterpret_cast<uintptr_t>(rw)) & 3) == 0;
    if (rel_mma) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int i0 = 64 * mt + 16 * warp;  // tile-local row of the m-tile's first row
            rel_terms_mma<D, E2>(qa[mt], rh, kh, 0, q0 + i0, Lq, qw, RH, RHS, false, i0, lane);
            rel_terms_mma<D, E2>(qa[mt], rw, kw, 1, q0 + i0, Lq, qw, RW, RWS, fast, i0, lane);
        }
    } else if (has_rel) {
        const bool vec_rel = ((reinterpret_cast<uintptr_t>(rh) | reinterpret_cast<uintptr_t>(rw)) & 15) == 0;
        for (int e = tid; e < BQ * kh; e += ATT_THREADS) {
            const int i = e / kh, ky = e - i * kh, qi = q0 + i;
            float s = 0.f;
            if (qi < Lq) {
                s = dot_row<D>(Qs + i * QST, rh + ((long long)(qi / qw) * kh + ky) * D, vec_rel);
            }
            RH[i * RHS + ky] = E2 ? s * ATT_LOG2E : s;
        }
        for (int e = tid; e < BQ * kw; e += ATT_THREADS) {
            const int i = e / kw, kx = e - i * kw, qi = q0 + i;
            float s = 0.f;
            if (qi < Lq) {
                s = dot_row<D>(Qs + i * QST, rw + ((long long)(qi % qw) * kw + kx) * D, vec_rel);
            }
            // fast: kx ^ 8*(i&3) flips bits 3..4 only, so it stays in kx's aligned 32-block
            // (kw % 64 == 0): a permutation of 0..kw-1 within the row.
            RW[i * RWS + (fast ? (kx ^ (8 * (i & 3))) : kx)] = E2 ? s * ATT_LOG2E : s;
        }
    }

    // Per-lane ldmatrix row addresses (bytes, .shared window).
    // K (plain x4), n-tile pair (nt, nt+1) = (2p, 2p+1), k-step kk: matrix m = lane/8 is
    //   keys 8*nt + 8*(m/2) + 0..7, cols 16*kk + 8*(m%2) + 0..7
    //   -> r[0], r[1] = b0, b1 of n-tile nt; r[2], r[3] = b0, b1 of n-tile nt+1.
    const uint32_t k_lane = smem_u32(Ks + (8 * (lane >> 4) + (lane & 7)) * QST + 8 * ((lane >> 3) & 1));
    // ATT_OPT_PREFETCH: odd key tiles live in K2 and V2, this many bytes from Ks and Vs (mod 2^32
    // where they come first)
    const uint32_t k2_off = (uint32_t)((K2 - Ks) * 2), v2_off = (uint32_t)((V2 - Vs) * 2);
    // V (x4.trans), k-step kk (keys 16kk..16kk+15), output n-tile pair (dt, dt+1) = (2p, 2p+1):
    //   matrix m is keys 16*kk + 8*(m%2) + 0..7, cols 8*dt + 8*(m/2) + 0..7
    //   -> r[0], r[1] = b0, b1 of n-tile dt; r[2], r[3] = b0, b1 of n-tile dt+1.
    const uint32_t v_lane = smem_u32(Vs + (lane & 15) * QST + 8 * (lane >> 4));

    const float inv_kw = has_rel ? 1.0f / (float)kw : 0.f;
    // E2 (the exp2 kernels): scores, maxima and the RH/RW terms are in log2 units (log2(e) folded
    // into the scale and the tables), so each probability is one ex2 of score minus offset.
    const float sc = E2 ? scale * ATT_LOG2E : scale;
    // Per m-tile: running max and (per-lane partial) sum of rows r0 and r0 + 8, and O.
    float m0[MT], m1[MT], l0[MT], l1[MT];
    float oacc[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m0[mt] = m1[mt] = -INFINITY;
        l0[mt] = l1[mt] = 0.f;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) oacc[mt][dt][e] = 0.f;
    }
    // ATT_OPT_TRIM: m-tile mt does work only if its first row is a query (< Lq); key groups of
    // 16 only below kvalid (warp-uniform conditions: whole mmas are skipped, no divergence).
    const bool trim = (opts & ATT_OPT_TRIM) != 0;
    bool act[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) act[mt] = !trim || q0 + 64 * mt + 16 * warp < Lq;

    for (int k0 = 0, it = 0; k0 < Lk; k0 += ATT_BK, ++it) {
        const int kvalid = trim ? Lk - k0 : ATT_BK;  // keys of this tile worth an mma (>= 1)
        const bool more = k0 + ATT_BK < Lk;          // a next key tile exists
        cp_async_wait_all();  // this thread's copies of K tile k0 (PREFETCH: and V) have landed
        __syncthreads();      // ... everyone's: Ks complete; all warps done with the previous
                              // tile (its P V: Vs free; PREFETCH: its K and V buffers free);
                              // first tile: RH/RW written, Q read
        const bool odd = pf && (it & 1);  // PREFETCH: this tile is in K2/V2
        if (!pf) {
            load_kv_tile<D>(Vs, vb, pvb, rk, k0, Lk, ri, vec, tid);
            cp_async_commit();
        } else if (more) {  // the next tile into the buffers the previous tile used
            load_kv_tile<D>(odd ? Ks : K2, kb, pkb, rk, k0 + ATT_BK, Lk, ri, vec, tid);
            load_kv_tile<D>(odd ? Vs : V2, vb, pvb, rk, k0 + ATT_BK, Lk, ri, vec, tid);
            cp_async_commit();
        }
        const uint32_t k_tile = k_lane + (odd ? k2_off : 0u);
        const uint32_t v_tile = v_lane + (odd ? v2_off : 0u);

        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int p = 0; p < NT / 2; ++p) {
                if (16 * p >= kvalid) continue;  // keys k0 + 16p .. +15 all past Lk: scores masked
                uint32_t kf[4];
                ldsm_x4(kf, k_tile + (uint32_t)((16 * p * QST + 16 * kk) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (!act[mt]) continue;
                    mma_bf16(s[mt][2 * p], qa[mt][kk], kf[0], kf[1]);
                    mma_bf16(s[mt][2 * p + 1], qa[mt][kk], kf[2], kf[3]);
                }
            }
        }

        // scale, bias, mask, online softmax: per m-tile (rows r0 and r0 + 8)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (!act[mt]) continue;  // rows past Lq: never stored
            const int r0 = 64 * mt + r00;
            float mx0 = -INFINITY, mx1 = -INFINITY;
            float fo0 = 0.f, fo1 = 0.f;  // E2, whole-tile path: the RH terms left out of the scores
            if (fast) {
                const int ky = k0 / kw, kxb = k0 - ky * kw;  // kxb % 64 == 0
                const float rh0 = RH[r0 * RHS + ky], rh1 = RH[(r0 + 8) * RHS + ky];
                const float* rw0 = RW + r0 * kw + kxb + 2 * t;  // row r0; row r0 + 8 at + 8*kw
                const int sw = r0 & 3;                         // == (r0 + 8) & 3
                // With trim, no masking: kw % 64 == 0 makes Lk = kh*kw a multiple of 64, so
                // every key of every tile is valid (same values, less work).
                const int j0 = k0 + 2 * t;
                if (trim)
                    scores_whole_tile<false, E2>(s[mt], sc, rh0, rh1, rw0, kw, sw, j0, Lk, mx0, mx1);
                else
                    scores_whole_tile<true, E2>(s[mt], sc, rh0, rh1, rw0, kw, sw, j0, Lk, mx0, mx1);
                if (E2) {
                    fo0 = rh0;
                    fo1 = rh1;
                }
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int j = k0 + 8 * nt + 2 * t + e;
                        const bool valid = j < Lk;
                        float x0 = s[mt][nt][e] * sc, x1 = s[mt][nt][2 + e] * sc;
                        if (has_rel && valid) {
                            // j / kw without an integer division: (j + 0.5) / kw is at least
                            // 0.5/kw away from an integer, far more than the float error for
                            // j < 2^20.
                            const int ky = __float2int_rd(((float)j + 0.5f) * inv_kw), kx = j - ky * kw;
                            x0 += RH[r0 * RHS + ky] + RW[r0 * RWS + kx];
                            x1 += RH[(r0 + 8) * RHS + ky] + RW[(r0 + 8) * RWS + kx];
                        }
                        s[mt][nt][e] = valid ? x0 : -INFINITY;
                        s[mt][nt][2 + e] = valid ? x1 : -INFINITY;
                        mx0 = fmaxf(mx0, s[mt][nt][e]);
                        mx1 = fmaxf(mx1, s[mt][nt][2 + e]);
                    }
                }
            }
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {  // the 4 lanes sharing g hold one row
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            // finite (valid key k0); E2: the row maxima of the scores plus their folded terms
            const float mn0 = fmaxf(m0[mt], E2 ? mx0 + fo0 : mx0);
            const float mn1 = fmaxf(m1[mt], E2 ? mx1 + fo1 : mx1);
            const float al0 = softmax_exp<E2>(m0[mt] - mn0), al1 = softmax_exp<E2>(m1[mt] - mn1);
            m0[mt] = mn0;
            m1[mt] = mn1;
            float ps0 = 0.f, ps1 = 0.f;
            // exp offsets: the row maxima; E2: minus the folded terms (score - c = score + fo - max)
            const float c0 = E2 ? mn0 - fo0 : mn0, c1 = E2 ? mn1 - fo1 : mn1;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[mt][nt][0] = softmax_exp<E2>(s[mt][nt][0] - c0);
                s[mt][nt][1] = softmax_exp<E2>(s[mt][nt][1] - c0);
                s[mt][nt][2] = softmax_exp<E2>(s[mt][nt][2] - c1);
                s[mt][nt][3] = softmax_exp<E2>(s[mt][nt][3] - c1);
                ps0 += s[mt][nt][0] + s[mt][nt][1];
                ps1 += s[mt][nt][2] + s[mt][nt][3];
            }
            l0[mt] = l0[mt] * al0 + ps0;
            l1[mt] = l1[mt] * al1 + ps1;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                oacc[mt][dt][0] *= al0;
                oacc[mt][dt][1] *= al0;
                oacc[mt][dt][2] *= al1;
                oacc[mt][dt][3] *= al1;
            }
        }

        if (!pf) {
            cp_async_wait_all();  // this thread's copies of V tile k0 have landed
            __syncthreads();      // ... everyone's: Vs complete; all warps done with Ks
            if (more) {
                load_kv_tile<D>(Ks, kb, pkb, rk, k0 + ATT_BK, Lk, ri, vec, tid);
                cp_async_commit();
            }
        }

        // O += P V  (P from the score fragments, 16 keys per k-step)
#pragma unroll
        for (int kk = 0; kk < ATT_BK / 16; ++kk) {
            if (16 * kk >= kvalid) continue;  // keys past Lk: P is exactly 0 there, V zero-filled
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int p = 0; p < DT / 2; ++p) {
                uint32_t vf[4];
                ldsm_x4_trans(vf, v_tile + (uint32_t)((16 * kk * QST + 16 * p) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (!act[mt]) continue;
                    mma_bf16(oacc[mt][2 * p], pa[mt], vf[0], vf[1]);
                    mma_bf16(oacc[mt][2 * p + 1], pa[mt], vf[2], vf[3]);
                }
            }
        }
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int r0 = 64 * mt + r00;
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            l0[mt] += __shfl_xor_sync(0xffffffffu, l0[mt], off);
            l1[mt] += __shfl_xor_sync(0xffffffffu, l1[mt], off);
        }
        const float inv0 = l0[mt] > 0.f ? 1.f / l0[mt] : 0.f, inv1 = l1[mt] > 0.f ? 1.f / l1[mt] : 0.f;
        const int qi0 = q0 + r0, qi1 = q0 + r0 + 8;
        const long long ro0 = qi0 < Lq ? row_of(rq, qi0) : -1;  // -1: past Lq or padding
        const long long ro1 = qi1 < Lq ? row_of(rq, qi1) : -1;
        __nv_bfloat16* ob0 = ro0 >= 0 ? o + ro0 * rs + hd : o;
        __nv_bfloat16* ob1 = ro1 >= 0 ? o + ro1 * rs + hd : o;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const int col = 8 * dt + 2 * t;
            if (ro0 >= 0) {
                st(ob0 + col, oacc[mt][dt][0] * inv0);
                st(ob0 + col + 1, oacc[mt][dt][1] * inv0);
            }
            if (ro1 >= 0) {
                st(ob1 + col, oacc[mt][dt][2] * inv1);
                st(ob1 + col + 1, oacc[mt][dt][3] * inv1);
            }
        }
    }
}

// The parameter list of every entry point (element type T), and its arguments.
#define ATT_PARAMS(T)                                                                            \
    const T *q, const T *k, const T *v, T *o, const T *rh, const T *rw, int B, int heads, int Lq, \
        int Lk, int d, float scale, int qh, int qw, int kh, int kw, int has_rel, int ldi,         \
        int map, int ma, int mb, int mc, int md, int b_off, const T *pad_q, const T *pad_k,      \
        const T *pad_v, int opts
#define ATT_ARGS                                                                                 \
    q, k, v, o, rh, rw, B, heads, Lq, Lk, d, scale, qh, qw, kh, kw, has_rel, ldi, map, ma, mb, mc, \
        md, b_off, pad_q, pad_k, pad_v, opts

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attention_f32(ATT_PARAMS(float)) {
    (void)opts;
    (void)B;
    (void)qh;
    const int b = blockIdx.z + b_off;
    const Rows rq = make_rows(map, b, Lq, ma, mb, mc, md), rk = make_rows(map, b, Lk, ma, mb, mc, md);
    attn_simt_dispatch<float>(q, k, v, o, rh, rw, heads, Lq, Lk, d, scale, qw, kh, kw, has_rel, ldi,
                              rq, rk, pad_q, pad_k, pad_v);
}

// attention_bf16 (E2 = false) and attention_exp2_bf16 (E2 = true, the log2-unit softmax of the
// tensor-core path): separate entries, so the default kernel's code is untouched by the option.
template <bool E2>
__device__ __forceinline__ void attention_bf16_body(ATT_PARAMS(__nv_bfloat16)) {
    (void)B;
    (void)qh;
    const int b = blockIdx.z + b_off;
    const Rows rq = make_rows(map, b, Lq, ma, mb, mc, md), rk = make_rows(map, b, Lk, ma, mb, mc, md);
    if (d == 64)
        attn_tc<64, 1, E2>(q, k, v, o, rh, rw, heads, Lq, Lk, scale, qw, kh, kw, has_rel, ldi, rq,
                           rk, pad_q, pad_k, pad_v, opts);
    else if (d == 80)
        attn_tc<80, 1, E2>(q, k, v, o, rh, rw, heads, Lq, Lk, scale, qw, kh, kw, has_rel, ldi, rq,
                           rk, pad_q, pad_k, pad_v, opts);
    else
        attn_simt_dispatch<__nv_bfloat16>(q, k, v, o, rh, rw, heads, Lq, Lk, d, scale, qw, kh, kw,
                                          has_rel, ldi, rq, rk, pad_q, pad_k, pad_v);
}

// The 128-query variant (MT = 2) for d == 64 (vit_b, vit_l): same arguments as attention_bf16,
// grid.x = ceil(Lq/128); any other d writes nothing (the launcher only picks it for d = 64).
// Not built for d = 80: at MT = 2 its 40 Q-fragment and 80 accumulator registers per lane
// spill on sm_80. E2 as above (attention_q128_bf16, attention_q128_exp2_bf16).
template <bool E2>
__device__ __forceinline__ void attention_q128_body(ATT_PARAMS(__nv_bfloat16)) {
    (void)B;
    (void)qh;
    if (d != 64) return;
    const int b = blockIdx.z + b_off;
    const Rows rq = make_rows(map, b, Lq, ma, mb, mc, md), rk = make_rows(map, b, Lk, ma, mb, mc, md);
    attn_tc<64, 2, E2>(q, k, v, o, rh, rw, heads, Lq, Lk, scale, qw, kh, kw, has_rel, ldi, rq, rk,
                       pad_q, pad_k, pad_v, opts);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_bf16(ATT_PARAMS(__nv_bfloat16)) {
    attention_bf16_body<false>(ATT_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_exp2_bf16(ATT_PARAMS(__nv_bfloat16)) {
    attention_bf16_body<true>(ATT_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)
    attention_q128_bf16(ATT_PARAMS(__nv_bfloat16)) {
    attention_q128_body<false>(ATT_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)
    attention_q128_exp2_bf16(ATT_PARAMS(__nv_bfloat16)) {
    attention_q128_body<true>(ATT_ARGS);
}
