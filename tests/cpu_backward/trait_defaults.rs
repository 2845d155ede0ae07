//! The `Backend` trait's default backward implementations (the CUDA backend's path), run through a
//! backend that forwards the required ops to the CPU, against the CPU's overrides.

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, AttentionGrads, Backend, RelPos};
use medsa::sam::random::Rng;
use medsa::{Result, Tensor};

use super::agree;

/// A backend that forwards every required op to the CPU but keeps the trait's default
/// `sum_rows`, `linear_backward_input`, `linear_backward_weight` and
/// `conv_transpose2x2_backward`, which are built from forward ops.
struct DefaultsOnly(Cpu);

impl Backend for DefaultsOnly {
    type Tensor = Tensor;

    fn name(&self) -> String {
        format!("defaults over {}", self.0.name())
    }
    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        self.0.upload(t)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        self.0.download(t)
    }
    fn dims<'a>(&self, t: &'a Tensor) -> &'a [usize] {
        self.0.dims(t)
    }
    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Result<Tensor> {
        self.0.reshape(t, shape)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        self.0.permute(x, perm)
    }
    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        self.0.concat(xs, dim)
    }
    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.0.narrow(x, dim, start, len)
    }
    fn index_select0(&self, x: &Tensor, index: &[usize]) -> Result<Tensor> {
        self.0.index_select0(x, index)
    }
    fn window_partition(&self, x: &Tensor, ws: usize) -> Result<Tensor> {
        self.0.window_partition(x, ws)
    }
    fn window_unpartition(&self, x: &Tensor, ws: usize, hw: (usize, usize)) -> Result<Tensor> {
        self.0.window_unpartition(x, ws, hw)
    }
    fn add_scaled(&self, a: &Tensor, alpha: f32, b: &Tensor, beta: f32) -> Result<Tensor> {
        self.0.add_scaled(a, alpha, b, beta)
    }
    fn activate(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.0.activate(x, act)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Result<Tensor> {
        self.0.linear(x, w, b, act)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        self.0.matmul(a, b, trans_b)
    }
    fn layer_norm(&self, x: &Tensor, g: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        self.0.layer_norm(x, g, b, eps)
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<Tensor> {
        self.0.attention(q, k, v, heads, scale, rel)
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        self.0.conv2d(x, w, b, stride, pad)
    }
    fn conv_transpose2x2(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.0.conv_transpose2x2(x, w, b)
    }
    fn resize_bilinear(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.0.resize_bilinear(x, size)
    }
    fn resize_bicubic(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.0.resize_bicubic(x, size)
    }
    fn activate_backward(&self, x: &Tensor, dy: &Tensor, act: Act) -> Result<Tensor> {
        self.0.activate_backward(x, dy, act)
    }
    fn layer_norm_backward(
        &self,
        x: &Tensor,
        g: &Tensor,
        dy: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.0.layer_norm_backward(x, g, dy, eps)
    }
    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<AttentionGrads<Tensor>> {
        self.0
            .attention_backward(q, k, v, o, d_o, heads, scale, rel)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        bias: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        self.0.conv2d_backward(x, w, dy, stride, pad, need_dx, bias)
    }
}

#[test]
fn trait_defaults_agree_with_cpu_overrides() {
    let cpu = Cpu::new();
    let def = DefaultsOnly(Cpu::new());
    let mut rng = Rng::new(12);
    // Both sides are f32 with different summation orders (a GEMM against ones vs. chunked column
    // sums; one GEMM vs. another's blocking): 1e-5 of the RMS.
    for (shape, cols) in [
        (&[7usize, 5][..], 5usize),
        (&[70000, 3], 3),
        (&[3, 4, 64], 256),
    ] {
        let x = rng.tensor(shape, 1.0);
        agree(
            &format!("sum_rows {shape:?}"),
            &def.sum_rows(&x, cols).unwrap(),
            &cpu.sum_rows(&x, cols).unwrap(),
            1e-5,
        );
    }
    assert!(def.sum_rows(&rng.tensor(&[4, 5], 1.0), 3).is_err());
    for (lead, k, n) in [(&[2usize, 7][..], 13usize, 11usize), (&[600][..], 96, 80)] {
        let xs: Vec<usize> = lead.iter().copied().chain([k]).collect();
        let ys: Vec<usize> = lead.iter().copied().chain([n]).collect();
        let x = rng.tensor(&xs, 1.0);
        let w = rng.tensor(&[n, k], 1.0);
        let dy = rng.tensor(&ys, 1.0);
        agree(
            "linear_backward_input",
            &def.linear_backward_input(&dy, &w).unwrap(),
            &cpu.linear_backward_input(&dy, &w).unwrap(),
            1e-5,
        );
        let (dw_d, db_d) = def.linear_backward_weight(&x, &dy, true).unwrap();
        let (dw_c, db_c) = cpu.linear_backward_weight(&x, &dy, true).unwrap();
        agree("linear_backward_weight dw", &dw_d, &dw_c, 1e-5);
        agree(
            "linear_backward_weight db",
            &db_d.unwrap(),
            &db_c.unwrap(),
            1e-5,
        );
        assert!(def
            .linear_backward_weight(&x, &dy, false)
            .unwrap()
            .1
            .is_none());
    }
    for (b, h, w, ci, co) in [
        (2usize, 3usize, 5usize, 6usize, 4usize),
        (1, 16, 16, 32, 16),
    ] {
        let x = rng.tensor(&[b, h, w, ci], 1.0);
        let wt = rng.tensor(&[ci, co, 2, 2], 1.0);
        let dy = rng.tensor(&[b, 2 * h, 2 * w, co], 1.0);
        let (dx_d, dw_d, db_d) = def.conv_transpose2x2_backward(&x, &wt, &dy).unwrap();
        let (dx_c, dw_c, db_c) = cpu.conv_transpose2x2_backward(&x, &wt, &dy).unwrap();
        agree("conv_transpose2x2_backward dx", &dx_d, &dx_c, 1e-5);
        agree("conv_transpose2x2_backward dw", &dw_d, &dw_c, 1e-5);
        agree("conv_transpose2x2_backward db", &db_d, &db_c, 1e-5);
    }
}

// ----- TinyViT's ops: the CPU's direct kernels, naive f64 loops and the composed defaults -----

/// `softmax(scale q k^T + table[h, |dy| w + |dx|]) v` per window and head, in f64, with
/// TinyViT's per-head `[q | k | v]` layout.
fn naive_attention_table(
    qkv: &Tensor,
    side: usize,
    heads: usize,
    scale: f64,
    t: &[f64],
) -> Vec<f64> {
    let s = qkv.shape();
    let (n, l) = (s[0], s[1]);
    let d = s[2] / (3 * heads);
    let x = qkv.data();
    let at = |w: usize, i: usize, h: usize, part: usize, c: usize| {
        x[(w * l + i) * 3 * heads * d + h * 3 * d + part * d + c] as f64
    };
    let mut out = vec![0.0f64; n * l * heads * d];
    for w in 0..n {
        for h in 0..heads {
            for i in 0..l {
                let (yi, xi) = (i / side, i % side);
                let scores: Vec<f64> = (0..l)
                    .map(|j| {
                        let (yj, xj) = (j / side, j % side);
                        let dot: f64 = (0..d).map(|c| at(w, i, h, 0, c) * at(w, j, h, 1, c)).sum();
                        scale * dot + t[h * l + yi.abs_diff(yj) * side + xi.abs_diff(xj)]
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(w * l + i) * heads * d + h * d + c] =
                        (0..l).map(|j| e[j] / z * at(w, j, h, 2, c)).sum();
                }
            }
        }
    }
    out
}

fn naive_depthwise(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: usize,
) -> (Vec<f64>, Vec<usize>) {
    let (sx, k) = (x.shape(), w.shape()[2]);
    let (bn, h, wd, c) = (sx[0], sx[1], sx[2], sx[3]);
    let ho = (h + 2 * pad - k) / stride + 1;
    let wo = (wd + 2 * pad - k) / stride + 1;
    let mut out = vec![0.0f64; bn * ho * wo * c];
    for bi in 0..bn {
        for oy in 0..ho {
            for ox in 0..wo {
                for ch in 0..c {
                    let mut acc = b.data()[ch] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            let xv = x.data()[((bi * h + iy as usize) * wd + ix as usize) * c + ch];
                            acc += xv as f64 * w.data()[(ch * k + ky) * k + kx] as f64;
                        }
                    }
                    out[((bi * ho + oy) * wo + ox) * c + ch] = acc;
                }
            }
        }
    }
    (out, vec![bn, ho, wo, c])
}

#[test]
fn tinyvit_ops_agree_with_naive_loops_and_the_composed_defaults() {
    let cpu = Cpu::new();
    let def = DefaultsOnly(Cpu::new());
    let mut rng = Rng::new(77);
    // Bias-table attention: windows of 3x3 and 7x7, head dims 4 and 8.
    for (n, side, heads, d) in [(3, 3, 2, 4), (2, 7, 3, 8)] {
        let l = side * side;
        let qkv = rng.tensor(&[n, l, 3 * heads * d], 1.0);
        let table = rng.tensor(&[heads, l], 2.0);
        let scale = (d as f32).powf(-0.5);
        let got = cpu
            .attention_table(&qkv, side, heads, scale, &table)
            .unwrap();
        let want = naive_attention_table(&qkv, side, heads, scale as f64, &super::f64s(&table));
        super::check(
            "attention_table vs naive",
            &got,
            &[n, l, heads * d],
            &want,
            1e-5,
        );
        let composed = def
            .attention_table(&qkv, side, heads, scale, &table)
            .unwrap();
        agree("attention_table: composed default", &composed, &got, 1e-5);
        let d_o = rng.tensor(&[n, l, heads * d], 1.0);
        let (g, gt) = cpu
            .attention_table_backward(&qkv, &table, &d_o, side, heads, scale, true)
            .unwrap();
        let (cg, cgt) = def
            .attention_table_backward(&qkv, &table, &d_o, side, heads, scale, true)
            .unwrap();
        agree("attention_table_backward dqkv", &g, &cg, 1e-4);
        agree(
            "attention_table_backward dtable",
            &gt.unwrap(),
            &cgt.unwrap(),
            1e-4,
        );
        // The table gradient against central differences of <d_o, o> in f64.
        let fd = super::finite_diff(&super::f64s(&table), |tv| {
            let o = naive_attention_table(&qkv, side, heads, scale as f64, tv);
            o.iter().zip(d_o.data()).map(|(a, &b)| a * b as f64).sum()
        });
        let (_, dt) = cpu
            .attention_table_backward(&qkv, &table, &d_o, side, heads, scale, true)
            .unwrap();
        super::check(
            "dtable vs finite differences",
            &dt.unwrap(),
            &[heads, l],
            &fd,
            1e-3,
        );
    }
    // Depthwise convolution: 3x3 stride 1 and 2 (odd and even sides), 1x1.
    for (shape, k, stride, pad) in [
        ([2, 7, 6, 5], 3, 1, 1),
        ([1, 9, 8, 4], 3, 2, 1),
        ([2, 4, 4, 3], 1, 1, 0),
    ] {
        let c = shape[3];
        let x = rng.tensor(&shape, 1.0);
        let w = rng.tensor(&[c, 1, k, k], 1.0);
        let b = rng.tensor(&[c], 1.0);
        let got = cpu.depthwise_conv2d(&x, &w, Some(&b), stride, pad).unwrap();
        let (want, ys) = naive_depthwise(&x, &w, &b, stride, pad);
        super::check("depthwise_conv2d vs naive", &got, &ys, &want, 1e-5);
        let composed = def.depthwise_conv2d(&x, &w, Some(&b), stride, pad).unwrap();
        agree("depthwise_conv2d: composed default", &composed, &got, 1e-5);
        let dy = rng.tensor(&ys, 1.0);
        let (dx, dw, db) = cpu
            .depthwise_conv2d_backward(&x, &w, &dy, stride, pad, true, true, true)
            .unwrap();
        let (cdx, cdw, cdb) = def
            .depthwise_conv2d_backward(&x, &w, &dy, stride, pad, true, true, true)
            .unwrap();
        agree("depthwise dx", &dx.unwrap(), &cdx.unwrap(), 1e-5);
        agree("depthwise dw", &dw.unwrap(), &cdw.unwrap(), 1e-5);
        agree("depthwise db", &db.unwrap(), &cdb.unwrap(), 1e-5);
    }
}
