// attention_simt.cuh -- the SIMT (f32 FMA) path of attention.cu: attention_f32 for every head
// dim, and attention_bf16 for head dims without a tensor-core path. Math, shapes, shared memory
// (SMEM_SIMT) and thread mapping are in attention.cu's header. Included by attention.cu only
// (after ATT_BQ, ATT_BK, ATT_THREADS, common.cuh and token_rows.cuh).
#pragma once

// ----------------------------------------------------------------------------------------
// SIMT path (f32 FMAs), any d <= D (D = compile-time padded head dim, multiple of 16).
// ----------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void attn_simt(const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, T* __restrict__ o,
                                          const T* __restrict__ rh, const T* __restrict__ rw,
                                          int heads, int Lq, int Lk, int d, float scale, int qw,
                                          int kh, int kw, int has_rel, int ldi,
                                          const Rows& rq, const Rows& rk, const T* pq,
                                          const T* pk, const T* pv) {
    constexpr int QS = D + 1;       // row stride of Qs/Ks (odd: conflict-free column reads)
    constexpr int PS = ATT_BK + 1;  // row stride of Ps
    constexpr int NC = D / 16;      // output columns per thread
    EXTERN_SMEM_F4(smem_f4);
    float* smem = reinterpret_cast<float*>(smem_f4);
    const int R = has_rel ? (kh + kw) : 0;
    {
        const unsigned need = 4u * (unsigned)(ATT_BQ * QS * 2 + ATT_BK * D + ATT_BQ * PS + ATT_BQ * R);
        if (dyn_smem_bytes() < need) __trap();
    }
    float* Qs = smem;
    float* Ks = Qs + ATT_BQ * QS;
    float* Vs = Ks + ATT_BK * QS;
    float* Ps = Vs + ATT_BK * D;
    float* RH = Ps + ATT_BQ * PS;
    float* RW = RH + ATT_BQ * (has_rel ? kh : 0);

    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
    const long long rs = (long long)heads * d;  // row stride of o
    const long long ri = ldi;                   // row stride of q/k/v (3*heads*d when packed)
    const long long hd = (long long)h * d;
    const T* qh = q + hd;
    const T* kh_ = k + hd;
    const T* vh = v + hd;
    const T* pqh = pq ? pq + hd : nullptr;
    const T* pkh = pk ? pk + hd : nullptr;
    const T* pvh = pv ? pv + hd : nullptr;

    for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
        const int i = e / D, c = e - i * D;
        float x = 0.f;
        if (q0 + i < Lq && c < d) {
            const T* p = token_ptr(qh, pqh, rq, q0 + i, ri);
            if (p) x = ld(p + c);
        }
        Qs[i * QS + c] = x;
    }
    __syncthreads();
    if (has_rel) {
        for (int e = tid; e < ATT_BQ * kh; e += ATT_THREADS) {
            const int i = e / kh, ky = e - i * kh, qi = q0 + i;
            float s = 0.f;
            if (qi < Lq) {
                const T* r = rh + ((long long)(qi / qw) * kh + ky) * d;
                for (int c = 0; c < d; ++c) s += Qs[i * QS + c] * ld(r + c);
            }
            RH[e] = s;
        }
        for (int e = tid; e < ATT_BQ * kw; e += ATT_THREADS) {
            const int i = e / kw, kx = e - i * kw, qi = q0 + i;
            float s = 0.f;
            if (qi < Lq) {
                const T* r = rw + ((long long)(qi % qw) * kw + kx) * d;
                for (int c = 0; c < d; ++c) s += Qs[i * QS + c] * ld(r + c);
            }
            RW[e] = s;
        }
    }

    float m[8], l[8], acc[8][NC];
#pragma unroll
    for (int a = 0; a < 8; ++a) {
        m[a] = -INFINITY;
        l[a] = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[a][c] = 0.f;
    }

    for (int k0 = 0; k0 < Lk; k0 += ATT_BK) {
        __syncthreads();  // previous tile's Ks/Vs/Ps readers done (and RH/RW written)
        for (int e = tid; e < ATT_BK * D; e += ATT_THREADS) {
            const int j = e / D, c = e - j * D;
            float kx = 0.f, vx = 0.f;
            if (k0 + j < Lk && c < d) {
                const long long row = row_of(rk, k0 + j);
                const T* kp = row >= 0 ? kh_ + row * ri : pkh;
                const T* vp = row >= 0 ? vh + row * ri : pvh;
                if (kp) kx = ld(kp + c);
                if (vp) vx = ld(vp + c);
            }
            Ks[j * QS + c] = kx;
            Vs[j * D + c] = vx;
        }
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int a = 0; a < 8; ++a)
#pragma unroll
            for (int bb = 0; bb < 4; ++bb) s[a][bb] = 0.f;
#pragma unroll 4
        for (int c = 0; c < d; ++c) {
            float qv[8], kv[4];
#pragma unroll
            for (int a = 0; a < 8; ++a) qv[a] = Qs[(ty + 8 * a) * QS + c];
#pragma unroll
            for (int bb = 0; bb < 4; ++bb) kv[bb] = Ks[(tx + 16 * bb) * QS + c];
#pragma unroll
            for (int a = 0; a < 8; ++a)
#pragma unroll
                for (int bb = 0; bb < 4; ++bb) s[a][bb] = fmaf(qv[a], kv[bb], s[a][bb]);
        }

#pragma unroll
        for (int bb = 0; bb < 4; ++bb) {
            const int j = k0 + tx + 16 * bb;
            const bool valid = j < Lk;
            int ky = 0, kx = 0;
            if (has_rel && valid) { ky = j / kw; kx = j - ky * kw; }
#pragma unroll
            for (int a = 0; a < 8; ++a) {
                const int i = ty + 8 * a;
                float x = s[a][bb] * scale;
                if (has_rel && valid) x += RH[i * kh + ky] + RW[i * kw + kx];
                s[a][bb] = valid ? x : -INFINITY;
            }
        }

#pragma unroll
        for (int a = 0; a < 8; ++a) {
            float mx = fmaxf(fmaxf(s[a][0], s[a][1]), fmaxf(s[a][2], s[a][3]));
#pragma unroll
            for (int off = 8; off > 0; off >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));  // 16-lane row group
            const float mnew = fmaxf(m[a], mx);  // finite: every tile has a valid key
            const float alpha = expf(m[a] - mnew);  // m = -inf on the first tile -> 0
            float ps = 0.f;
#pragma unroll
            for (int bb = 0; bb < 4; ++bb) {
                const float p = expf(s[a][bb] - mnew);  // masked: exp(-inf) = 0
                Ps[(ty + 8 * a) * PS + tx + 16 * bb] = p;
                ps += p;
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
            l[a] = l[a] * alpha + ps;
            m[a] = mnew;
#pragma unroll
            for (int c = 0; c < NC; ++c) acc[a][c] *= alpha;
        }
        __syncthreads();

        const int kn = min(ATT_BK, Lk - k0);
#pragma unroll 2
        for (int j = 0; j < kn; ++j) {
            float pv[8], vv[NC];
#pragma unroll
            for (int a = 0; a < 8; ++a) pv[a] = Ps[(ty + 8 * a) * PS + j];
#pragma unroll
            for (int c = 0; c < NC; ++c) vv[c] = Vs[j * D + tx + 16 * c];
#pragma unroll
            for (int a = 0; a < 8; ++a)
#pragma unroll
                for (int c = 0; c < NC; ++c) acc[a][c] = fmaf(pv[a], vv[c], acc[a][c]);
        }
    }

#pragma unroll
    for (int a = 0; a < 8; ++a) {
        const int qi = q0 + ty + 8 * a;
        const long long row = qi < Lq ? row_of(rq, qi) : -1;
        if (row >= 0) {
            const float inv = l[a] > 0.f ? 1.f / l[a] : 0.f;
            T* orow = o + row * rs + hd;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int col = tx + 16 * c;
                if (col < d) st(orow + col, acc[a][c] * inv);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void attn_simt_dispatch(const T* q, const T* k, const T* v, T* o,
                                                   const T* rh, const T* rw, int heads, int Lq,
                                                   int Lk, int d, float scale, int qw, int kh,
                                                   int kw, int has_rel, int ldi, const Rows& rq,
                                                   const Rows& rk, const T* pq, const T* pk,
                                                   const T* pv) {
#define ATT_SIMT(DP) \
    attn_simt<T, DP>(q, k, v, o, rh, rw, heads, Lq, Lk, d, scale, qw, kh, kw, has_rel, ldi, rq, rk, pq, pk, pv)
    if (d <= 16) ATT_SIMT(16);
    else if (d <= 32) ATT_SIMT(32);
    else if (d <= 64) ATT_SIMT(64);
    else if (d <= 80) ATT_SIMT(80);
    else if (d <= 128) ATT_SIMT(128);
    // d > 128: unsupported, nothing is written (the launcher rejects it).
#undef ATT_SIMT
}

