// token_rows.cuh -- where the tokens of one attention sequence live in memory: the plain,
// window (partition + padding folded in) and depth (slice-major) token-row maps that
// attention.cu's header defines ("Token rows"), as a per-sequence Rows value and the row of
// token j.
#pragma once

// Where the tokens of one sequence live (attention.cu, "Token rows"): token j is row
// base + (j / cw) * rstride + j % cw when j / cw < hy and j % cw < hx, else padding.
struct Rows {
    long long base, rstride;
    int map, cw, hy, hx;
    float inv_cw;  // 1 / cw
};

__device__ __forceinline__ Rows make_rows(int map, int b, int L, int ma, int mb, int mc, int md) {
    Rows r;
    r.map = map;
    if (map == 1) {
        const int ws = ma, H = mb, W = mc, nw = md, nh = (H + ws - 1) / ws, nwin = nh * nw;
        const int img = b / nwin, w = b - img * nwin, wy = w / nw, wx = w - wy * nw;
        r.base = ((long long)img * H + (long long)wy * ws) * W + (long long)wx * ws;
        r.rstride = W;
        r.cw = ws;
        r.hy = min(ws, H - wy * ws);
        r.hx = min(ws, W - wx * ws);
        r.inv_cw = 1.0f / (float)ws;
    } else if (map == 2) {
        const int P = ma, v = b / P, p = b - v * P;
        r.base = (long long)v * L * P + p;
        r.rstride = P;
        r.cw = 1;
        r.hy = L;
        r.hx = 1;
        r.inv_cw = 1.f;
    } else {
        r.base = (long long)b * L;
        r.rstride = 0;
        r.cw = L;
        r.hy = 1;
        r.hx = L;
        r.inv_cw = 0.f;
    }
    return r;
}

// Row of token j (0 <= j < L), or -1 for a padding token. The branches are uniform over the
// block (one Rows per sequence); the plain and depth maps need no division, and windows divide
// by a float reciprocal: (j + 0.5) / cw is at least 0.5/cw from an integer, far more than the
// float error for j < 2^20.
__device__ __forceinline__ long long row_of(const Rows& r, int j) {
    if (r.map == 0) return r.base + j;                        // plain: j < L
    if (r.map == 2) return r.base + (long long)j * r.rstride;  // depth: j < L
    const int y = __float2int_rd(((float)j + 0.5f) * r.inv_cw), x = j - y * r.cw;
    return (y < r.hy && x < r.hx) ? r.base + (long long)y * r.rstride + x : -1;
}

// Address of column 0 of token j's row: base (head offset included) + row * ri, or the pad
// row (head offset included; null = zeros) for a padding token.
template <typename T>
__device__ __forceinline__ const T* token_ptr(const T* base, const T* pad, const Rows& r, int j,
                                              long long ri) {
    const long long row = row_of(r, j);
    return row >= 0 ? base + row * ri : pad;
}
