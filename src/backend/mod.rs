//! The op set every backend implements.
//!
//! Layout conventions: tensors are contiguous and row-major. Images and feature maps inside the
//! model are channels-last (`[B, H, W, C]`, "NHWC"); only the public inputs and outputs (`images`,
//! `image_embeddings`, masks) are channels-first, and the model converts with [`Backend::permute`].
//! Token sequences are `[B, L, C]`; multi-head tensors keep heads interleaved in the last dimension
//! (`C = heads * head_dim`, head-major), exactly as a linear layer writes them, so attention reads
//! q/k/v straight out of the projection output.
//!
//! Every op returns a fresh tensor; inputs are never modified. Ops fail with
//! [`Error::Shape`](crate::Error::Shape) when shapes disagree (a caller bug, never user input).

pub mod composed;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod options;
pub use options::{AttentionOptions, Precision, RunOptions};

use crate::error::Result;
use crate::tensor::Tensor;

/// Activation applied in a fused epilogue or on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Identity.
    None,
    /// Exact GELU: `x * 0.5 * (1 + erf(x / sqrt(2)))`.
    Gelu,
    /// `max(x, 0)`.
    Relu,
}

/// Decomposed relative-position bias for attention over a 2D token grid (SAM's
/// `add_decomposed_rel_pos`).
///
/// Query token `(qy, qx)` (row-major in a `q_grid.0 x q_grid.1` grid) attending to key token
/// `(ky, kx)` gets the additive logit bias
/// `sum_c q[qy,qx,c] * rh[qy,ky,c] + sum_c q[qy,qx,c] * rw[qx,kx,c]`,
/// where `q` is the *unscaled* query of that head. The tables are already gathered for the grid
/// (see `sam::rel_pos::gather`), so `rh` is `[qh, kh, head_dim]` and `rw` is `[qw, kw, head_dim]`,
/// shared by all heads.
pub struct RelPos<'a, T> {
    /// `[qh, kh, head_dim]`.
    pub rh: &'a T,
    /// `[qw, kw, head_dim]`.
    pub rw: &'a T,
    /// Query grid `(qh, qw)`; `Lq = qh * qw`.
    pub q_grid: (usize, usize),
    /// Key grid `(kh, kw)`; `Lk = kh * kw`.
    pub k_grid: (usize, usize),
    /// The caller's promise that the tables depend on the offset only: `q_grid == k_grid` and
    /// `rh[qy, ky]` is a function of `qy - ky` (likewise `rw`), as SAM's gathered tables on one
    /// grid are. A backend may then compute the bias terms as one product with the `2k - 1`
    /// distinct rows (the CUDA tensor-core kernel does, when asked); the result is the same
    /// either way. False promises give wrong biases, so set it only through
    /// [`RelPos::shift_invariant`] on tables built that way.
    pub shift_invariant: bool,
}

/// Which tokens of a packed qkv projection attend to which ([`Backend::attention_qkv`]).
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a, T> {
    /// `[B, L, 3C]`: each of the `B` sequences attends within itself.
    Sequences,
    /// `[B, H, W, 3C]`: each `ws x ws` window of each map attends within itself; padding tokens
    /// have the projection `pad` `[3C]`.
    Windows {
        /// Window side.
        ws: usize,
        /// The projection of a padding token.
        pad: &'a T,
    },
    /// `[V * depth, h, w, 3C]`: each spatial token of each volume attends over its `depth`
    /// slices.
    Depth {
        /// Slices per volume.
        depth: usize,
    },
}

impl<'a, T> RelPos<'a, T> {
    /// The bias of self-attention within one `grid` (queries and keys on the same grid).
    pub fn within(rh: &'a T, rw: &'a T, grid: (usize, usize)) -> Self {
        RelPos {
            rh,
            rw,
            q_grid: grid,
            k_grid: grid,
            shift_invariant: false,
        }
    }

    /// [`RelPos::within`] for tables whose entries depend on the offset only
    /// (`rh[qy, ky] = t[qy - ky + gh - 1]` for some table `t` of `2 gh - 1` rows, likewise `rw`):
    /// what `sam::rel_pos::gather` returns for equal query and key sides.
    pub fn shift_invariant(rh: &'a T, rw: &'a T, grid: (usize, usize)) -> Self {
        RelPos {
            shift_invariant: true,
            ..Self::within(rh, rw, grid)
        }
    }
}

/// Gradients of [`Backend::attention`] with respect to its inputs.
pub struct AttentionGrads<T> {
    /// `[B, Lq, heads * d]`.
    pub dq: T,
    /// `[B, Lk, heads * d]`.
    pub dk: T,
    /// `[B, Lk, heads * d]`.
    pub dv: T,
    /// With a relative-position bias: the gradients of the gathered tables `(drh, drw)`, shaped
    /// like `RelPos::rh` / `RelPos::rw` (`[qh, kh, d]`, `[qw, kw, d]`), summed over batch and
    /// heads.
    pub drel: Option<(T, T)>,
}

/// Gradients of a convolution: `(dx if asked for, dw, db if the layer has a bias)`.
pub type ConvGrads<T> = (Option<T>, T, Option<T>);

/// A compute backend: owns device memory and implements the forward ops and
/// their backward counterparts.
///
/// The CPU backend ([`cpu::Cpu`]) is the executable specification; other backends are tested
/// against it.
pub trait Backend: Send + Sync {
    /// A tensor living on this backend's device.
    type Tensor: Clone + Send + Sync + std::fmt::Debug;

    /// Human-readable device name (`cpu (2 threads)`, `cuda:0 NVIDIA H100 ...`).
    fn name(&self) -> String;

    // ----- memory and views ------------------------------------------------------------------

    /// Copies a host tensor to the device.
    fn upload(&self, t: &Tensor) -> Result<Self::Tensor>;
    /// Copies a device tensor to the host.
    fn download(&self, t: &Self::Tensor) -> Result<Tensor>;
    /// The dimensions of a device tensor.
    fn dims<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];
    /// Waits until every queued op has finished (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Same data, new shape (no copy). Element counts must match.
    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    // Each op is followed by its backward: the gradients of the op's inputs given the gradient
    // of its output (`dy`). Ops that only some callers need (a frozen weight's gradient) take
    // flags so nothing is computed for them. Backward defaults are compositions of the forward
    // ops, correct on any backend; backends override them where a dedicated kernel is faster.

    // ----- layout ----------------------------------------------------------------------------

    /// `y = x.permute(perm)`, materialised contiguously. `y.shape[i] = x.shape[perm[i]]`.
    fn permute(&self, x: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;
    /// Concatenation along `dim`; all other dimensions must agree.
    fn concat(&self, xs: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor>;
    /// `x[.., start..start+len, ..]` along `dim`, materialised.
    fn narrow(
        &self,
        x: &Self::Tensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor>;
    /// Rows of `x` along dimension 0: `y[i] = x[index[i]]`.
    fn index_select0(&self, x: &Self::Tensor, index: &[usize]) -> Result<Self::Tensor>;
    /// SAM's `window_partition`: `[B, H, W, C]` -> `[B * nh * nw, ws, ws, C]` with
    /// `nh = ceil(H / ws)`, `nw = ceil(W / ws)`; the bottom/right padding is zeros. Window index
    /// is `b * nh * nw + wy * nw + wx`.
    fn window_partition(&self, x: &Self::Tensor, ws: usize) -> Result<Self::Tensor>;
    /// Inverse of [`Backend::window_partition`]: `[B * nh * nw, ws, ws, C]` -> `[B, H, W, C]`,
    /// dropping the padding.
    fn window_unpartition(
        &self,
        x: &Self::Tensor,
        ws: usize,
        hw: (usize, usize),
    ) -> Result<Self::Tensor>;

    // ----- elementwise -----------------------------------------------------------------------

    /// `y = alpha * a + beta * b`. `b` may be smaller than `a` when its element count divides
    /// `a`'s: it is then tiled (broadcast over `a`'s leading dimensions), so `b`'s shape must equal
    /// a suffix of `a`'s shape up to leading ones.
    fn add_scaled(
        &self,
        a: &Self::Tensor,
        alpha: f32,
        b: &Self::Tensor,
        beta: f32,
    ) -> Result<Self::Tensor>;
    /// `y = act(x)`.
    fn activate(&self, x: &Self::Tensor, act: Act) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::activate`]: `dx = dy * act'(x)`, where `x` is the activation's
    /// *input*. GELU is the exact (erf) form: `act'(x) = Phi(x) + x * phi(x)`. ReLU's derivative
    /// at 0 is 0 (PyTorch's convention).
    fn activate_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        act: Act,
    ) -> Result<Self::Tensor>;
    /// Column sums: `x` viewed as `[rows, cols]` (`cols` must divide the element count) ->
    /// `[cols]`. The gradient of a broadcast (bias, suffix-broadcast `add_scaled`).
    fn sum_rows(&self, x: &Self::Tensor, cols: usize) -> Result<Self::Tensor> {
        let n: usize = self.dims(x).iter().product();
        if cols == 0 || !n.is_multiple_of(cols) {
            return Err(crate::Error::shape(
                "sum_rows",
                format!("{n} elements are not rows of {cols}"),
            ));
        }
        let rows = n / cols;
        let ones = self.upload(&crate::Tensor::full(&[1, 1, rows], 1.0))?;
        let x = self.reshape(x, &[1, rows, cols])?;
        let y = self.matmul(&ones, &x, false)?;
        self.reshape(&y, &[cols])
    }

    // ----- linear algebra --------------------------------------------------------------------

    /// `y = act(x @ w^T + b)`: `x` is `[.., K]`, `w` is `[N, K]` (PyTorch's Linear layout), `b` is
    /// `[N]`; `y` is `[.., N]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Act,
    ) -> Result<Self::Tensor>;
    /// Input gradient of [`Backend::linear`] (before its activation): `dy` `[.., N]`, `w`
    /// `[N, K]` -> `dx = dy @ w`, `[.., K]`.
    fn linear_backward_input(&self, dy: &Self::Tensor, w: &Self::Tensor) -> Result<Self::Tensor> {
        let s = self.dims(dy).to_vec();
        let ws = self.dims(w).to_vec();
        let n = *s.last().unwrap_or(&0);
        if ws.len() != 2 || ws[0] != n {
            return Err(crate::Error::shape(
                "linear_backward_input",
                format!("dy {s:?} and weight {ws:?}"),
            ));
        }
        let rows: usize = s[..s.len() - 1].iter().product();
        let dy2 = self.reshape(dy, &[1, rows, n])?;
        let w3 = self.reshape(w, &[1, ws[0], ws[1]])?;
        let dx = self.matmul(&dy2, &w3, false)?;
        let mut out = s[..s.len() - 1].to_vec();
        out.push(ws[1]);
        self.reshape(&dx, &out)
    }
    /// Weight gradients of [`Backend::linear`]: `x` `[.., K]`, `dy` `[.., N]` -> `dw = dy^T x`
    /// `[N, K]` and, if `bias`, `db = sum_rows(dy)` `[N]`.
    fn linear_backward_weight(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        bias: bool,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)> {
        let xs = self.dims(x).to_vec();
        let ys = self.dims(dy).to_vec();
        let (k, n) = (*xs.last().unwrap_or(&0), *ys.last().unwrap_or(&0));
        let rows: usize = xs.iter().product::<usize>() / k.max(1);
        if rows * n != ys.iter().product::<usize>() {
            return Err(crate::Error::shape(
                "linear_backward_weight",
                format!("x {xs:?} and dy {ys:?}"),
            ));
        }
        let dy2 = self.reshape(dy, &[1, rows, n])?;
        let dyt = self.permute(&dy2, &[0, 2, 1])?;
        let x2 = self.reshape(x, &[1, rows, k])?;
        let dw = self.matmul(&dyt, &x2, false)?;
        let dw = self.reshape(&dw, &[n, k])?;
        let db = if bias {
            Some(self.sum_rows(dy, n)?)
        } else {
            None
        };
        Ok((dw, db))
    }
    /// Batched matrix product: `a` is `[Bt, M, K]`; `b` is `[Bt, K, N]`, or `[Bt, N, K]` when
    /// `trans_b`; `y[t] = a[t] @ b[t]` (or `a[t] @ b[t]^T`) is `[Bt, M, N]`.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, trans_b: bool) -> Result<Self::Tensor>;

    // ----- normalisation ---------------------------------------------------------------------

    /// LayerNorm over the last dimension: `y = (x - mean) / sqrt(var + eps) * g + b`, biased
    /// variance. Channels-last LayerNorm2d is the same op.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        g: &Self::Tensor,
        b: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::layer_norm`]: returns `(dx, dg, db)` with `dg`, `db` summed over
    /// all rows.
    fn layer_norm_backward(
        &self,
        x: &Self::Tensor,
        g: &Self::Tensor,
        dy: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;

    // ----- attention -------------------------------------------------------------------------

    /// Multi-head attention: `q` is `[B, Lq, heads * d]`, `k` and `v` are `[B, Lk, heads * d]`;
    /// for each batch and head `o = softmax(scale * q k^T + bias) v`, where `bias` is the
    /// decomposed relative-position bias when `rel` is given (else zero). Output
    /// `[B, Lq, heads * d]`. The `Lq x Lk` score matrix need not be materialised.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Self::Tensor>>,
    ) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::attention`] given its inputs, its output `o` and the output
    /// gradient `d_o`. The bias depends on `q`, so its gradient flows into `dq` too; the gathered
    /// tables' gradients are returned when `rel` is given. Implementations recompute the scores
    /// tile by tile; no `Lq x Lk` tensor is kept.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        o: &Self::Tensor,
        d_o: &Self::Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Self::Tensor>>,
    ) -> Result<AttentionGrads<Self::Tensor>>;
    /// Self-attention on a packed projection: `qkv` holds q, k and v in that order along its last
    /// dimension (`3 * heads * d`, a qkv linear layer's output), and `tokens` says which of its
    /// tokens attend to which (one op, three token maps; backends read the slices in place):
    ///
    /// - [`Tokens::Sequences`]: `qkv` `[B, L, 3 * heads * d]`; each sequence attends within itself,
    ///   the same result as splitting `qkv` and calling [`Backend::attention`]. Output
    ///   `[B, L, heads * d]`.
    /// - [`Tokens::Windows`]: windowed self-attention read straight from an unpartitioned
    ///   projection. `qkv` `[B, H, W, 3 * heads * d]` is the projection of every token of a
    ///   `H x W` map, cut into `ws x ws` windows as [`Backend::window_partition`] cuts it; the
    ///   padding tokens (bottom/right, when `ws` does not divide `H` or `W`) have the projection
    ///   `pad` `[3 * heads * d]` (the projection of what the block pads with). Each window attends
    ///   within itself (`rel` on the `ws x ws` grid). Output `[B, H, W, heads * d]`, padding
    ///   positions dropped: `window_unpartition(attention_qkv(partition(qkv | pad)))`.
    /// - [`Tokens::Depth`]: depth-axis self-attention (SD-Trans) read straight from the
    ///   slice-major layout. `qkv` `[V * depth, h, w, 3 * heads * d]` holds `V` volumes of `depth`
    ///   slices (slice index fastest, as the encoder's batch); every spatial token `(v, y, x)`
    ///   attends over its own `depth` slices (`rel` on the depth grid, `Lq = Lk = depth`). Output
    ///   `[V * depth, h, w, heads * d]` in the same layout: the depth-major transposes before and
    ///   after the attention are folded into the indexing.
    ///
    /// The defaults are the plain op sequences of [`fused`].
    fn attention_qkv(
        &self,
        qkv: &Self::Tensor,
        tokens: Tokens<'_, Self::Tensor>,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Self::Tensor>>,
    ) -> Result<Self::Tensor> {
        match tokens {
            Tokens::Sequences => fused::attention_qkv_sequences(self, qkv, heads, scale, rel),
            Tokens::Windows { ws, pad } => {
                fused::attention_qkv_windowed(self, qkv, pad, ws, heads, scale, rel)
            }
            Tokens::Depth { depth } => {
                fused::attention_qkv_depth(self, qkv, depth, heads, scale, rel)
            }
        }
    }

    /// Windowed self-attention with a per-head bias table (TinyViT, SPEC section 8): `qkv`
    /// `[N, L, heads * 3d]` holds `N` windows of `L = side * side` tokens (row-major in the
    /// window); head `h`'s q, k and v are columns `h*3d + (0, d, 2d) ..+d` (TinyViT's qkv
    /// layout, unlike SAM's q | k | v blocks); `table` `[heads, side * side]`.
    /// Per window and head `o = softmax(scale * q k^T + bias) v` with
    /// `bias[i, j] = table[h, |yi - yj| * side + |xi - xj|]` (TinyViT's offset numbering for a
    /// square window). Output `[N, L, heads * d]`. The default runs [`Backend::attention`] on
    /// augmented heads that carry the bias ([`composed`]).
    fn attention_table(
        &self,
        qkv: &Self::Tensor,
        side: usize,
        heads: usize,
        scale: f32,
        table: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        composed::attention_table(self, qkv, side, heads, scale, table)
    }
    /// Gradient of [`Backend::attention_table`] given the output gradient `d_o`: `dqkv` (shaped as
    /// `qkv`) and, if `need_dtable`, the table's gradient summed over windows.
    #[allow(clippy::too_many_arguments)]
    fn attention_table_backward(
        &self,
        qkv: &Self::Tensor,
        table: &Self::Tensor,
        d_o: &Self::Tensor,
        side: usize,
        heads: usize,
        scale: f32,
        need_dtable: bool,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)> {
        composed::attention_table_backward(self, qkv, table, d_o, side, heads, scale, need_dtable)
    }

    // ----- fused inference ops ------------------------------------------------------------------
    //
    // One op where the plain sequence takes several passes over memory (DESIGN principle 6).
    // The defaults are those sequences (free functions in [`fused`], so a backend can still run
    // them when asked not to fuse); the CPU reference keeps them, faster backends override.
    // Their backward is the plain sequence's: training runs the op-by-op block forward.

    /// Whether the model takes its fused inference path (these ops, one call where the plain
    /// path makes several): [`RunOptions::fused`], on by default on every backend. The two paths
    /// agree up to the storage precision's rounding.
    fn fused(&self) -> bool {
        true
    }
    /// `y = r + alpha * (x @ w^T + b)`: a linear layer whose output is added to a residual
    /// stream `r` (`[.., N]`, the shape of the output) in the same pass.
    fn linear_residual(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        r: &Self::Tensor,
        alpha: f32,
    ) -> Result<Self::Tensor> {
        fused::linear_residual(self, x, w, b, r, alpha)
    }
    /// Residual add then LayerNorm: `s = a + beta * b` (same shapes), `y = layer_norm(s)`.
    /// Returns `(s, y)`: the new residual stream and its normalised copy.
    fn add_layer_norm(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        beta: f32,
        g: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        fused::add_layer_norm(self, a, b, beta, g, bias, eps)
    }

    // ----- convolutions ----------------------------------------------------------------------

    /// 2D convolution, channels-last: `x` `[B, H, W, Cin]`, `w` `[Cout, Cin, kh, kw]` (PyTorch
    /// layout), optional `b` `[Cout]`, symmetric zero padding `pad`, stride `stride`. Output
    /// `[B, Ho, Wo, Cout]` with `Ho = (H + 2 pad - kh) / stride + 1`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::conv2d`]: returns `(dx if need_dx, dw, db if bias)`.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        bias: bool,
    ) -> Result<ConvGrads<Self::Tensor>>;
    /// Depthwise 2D convolution (`groups = C`), channels-last: `x` `[B, H, W, C]`, `w`
    /// `[C, 1, k, k]` (PyTorch layout), optional `b` `[C]`, symmetric zero padding `pad`, stride
    /// `stride`: `y[b, oy, ox, c] = b[c] + sum_{ky,kx} x[b, oy*s+ky-pad, ox*s+kx-pad, c] *
    /// w[c, 0, ky, kx]`, shape `[B, Ho, Wo, C]` as [`Backend::conv2d`]. The default is the dense
    /// convolution with the block-diagonal weight ([`composed`]).
    fn depthwise_conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Self::Tensor> {
        composed::depthwise_conv2d(self, x, w, b, stride, pad)
    }
    /// Gradient of [`Backend::depthwise_conv2d`]: `(dx if need_dx, dw if need_dw, db if bias)`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn depthwise_conv2d_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        need_dw: bool,
        bias: bool,
    ) -> Result<(
        Option<Self::Tensor>,
        Option<Self::Tensor>,
        Option<Self::Tensor>,
    )> {
        composed::depthwise_conv2d_backward(self, x, w, dy, stride, pad, need_dx, need_dw, bias)
    }
    /// Transposed convolution with kernel 2, stride 2, channels-last: `x` `[B, H, W, Cin]`, `w`
    /// `[Cin, Cout, 2, 2]` (PyTorch layout), `b` `[Cout]`; `y[b, 2i+di, 2j+dj, o] = b[o] +
    /// sum_c x[b,i,j,c] w[c,o,di,dj]`, shape `[B, 2H, 2W, Cout]`.
    fn conv_transpose2x2(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::conv_transpose2x2`]: `(dx, dw, db)`. `dy` `[B, 2H, 2W, Cout]` is
    /// regrouped into `[B*H*W, (di, dj, o)]` rows, after which both gradients are GEMMs.
    fn conv_transpose2x2_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let xs = self.dims(x).to_vec();
        let wsh = self.dims(w).to_vec();
        let ys = self.dims(dy).to_vec();
        if xs.len() != 4
            || wsh.len() != 4
            || ys.len() != 4
            || wsh[0] != xs[3]
            || ys != [xs[0], 2 * xs[1], 2 * xs[2], wsh[1]]
        {
            return Err(crate::Error::shape(
                "conv_transpose2x2_backward",
                format!("x {xs:?}, w {wsh:?}, dy {ys:?}"),
            ));
        }
        let (b, h, wd, ci, co) = (xs[0], xs[1], xs[2], xs[3], wsh[1]);
        // [B, H, 2, W, 2, O] -> [B, H, W, 2, 2, O] -> rows of (di, dj, o).
        let g = self.reshape(dy, &[b * h, 2, wd, 2 * co])?;
        let g = self.permute(&g, &[0, 2, 1, 3])?;
        let g = self.reshape(&g, &[b * h * wd, 4 * co])?;
        // w [C, O, 2, 2] -> [C, (di, dj, o)].
        let wr = self.permute(w, &[0, 2, 3, 1])?;
        let wr = self.reshape(&wr, &[ci, 4 * co])?;
        // dx = g @ wr^T: a linear layer with weight wr.
        let dx = self.linear(&g, &wr, None, Act::None)?;
        let dx = self.reshape(&dx, &[b, h, wd, ci])?;
        let x2 = self.reshape(x, &[b * h * wd, ci])?;
        // dwr [(di,dj,o), C] = g^T x.
        let (dwr, _) = self.linear_backward_weight(&x2, &g, false)?;
        let dw = self.reshape(&dwr, &[2, 2, co, ci])?;
        let dw = self.permute(&dw, &[3, 2, 0, 1])?;
        let db = self.sum_rows(dy, co)?;
        Ok((dx, dw, db))
    }

    // ----- resampling (channels-first, as PyTorch's F.interpolate) --------------------------

    /// `F.interpolate(x, size, mode="bilinear", align_corners=False)` on `[B, C, H, W]`.
    fn resize_bilinear(&self, x: &Self::Tensor, size: (usize, usize)) -> Result<Self::Tensor>;
    /// `F.interpolate(x, size, mode="bicubic", align_corners=False)` (A = -0.75, border
    /// clamped) on `[B, C, H, W]`.
    fn resize_bicubic(&self, x: &Self::Tensor, size: (usize, usize)) -> Result<Self::Tensor>;
}
