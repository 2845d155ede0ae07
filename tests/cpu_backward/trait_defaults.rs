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
