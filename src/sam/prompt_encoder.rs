//! SAM's prompt encoder.
//!
//! Sparse prompts (points, box corners) become tokens `[B, Nt, C]`: a random-Fourier position
//! encoding of the pixel centre (`coord + 0.5`, normalised by the model input size) plus a learnt
//! embedding per kind (label 1: positive, 0: negative, -1: not a point, which zeroes the
//! encoding; box corners 2 and 3). Points without a box get one padding point (label -1), as in
//! SAM. Dense prompts: a mask `[B, 1, 4h, 4w]` downscaled by two stride-2 convs (LayerNorm2d +
//! GELU) and a 1x1 conv to `[B, h, w, C]`, or the learnt no-mask embedding everywhere.
//!
//! Sparse tokens and the dense positional encoding are computed on the host: they are a few
//! hundred numbers (or one `h x w x C` map that depends only on the grid), computed in f32 as
//! PyTorch does.

use crate::backend::{Act, Backend};
use crate::error::{Error, Result};
use crate::nn::{Conv2d, LayerNorm};
use crate::sam::config::SamConfig;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// Prompts for a batch (all optional; shapes as in SAM's batched input).
#[derive(Clone, Debug, Default)]
pub struct Prompts {
    /// `[B, N, 2]` (x, y) in model-input pixels.
    pub point_coords: Option<Tensor>,
    /// `[B, N]`: 1 foreground, 0 background, -1 ignored.
    pub point_labels: Option<Tensor>,
    /// `[B, 4]` (x0, y0, x1, y1) in model-input pixels.
    pub boxes: Option<Tensor>,
    /// `[B, 1, 4h, 4w]` mask logits from a previous pass.
    pub mask_inputs: Option<Tensor>,
}

impl Prompts {
    /// Reads the optional prompt tensors of an inputs file (`point_coords`, `point_labels`,
    /// `boxes`, `mask_inputs`), as `medsa-engine forward` and the golden files store them.
    /// Any float or integer dtype is accepted (SAM's predictor passes `torch.int` labels); a
    /// point label must be a whole number, and the error names the tensor, index and value.
    pub fn read(f: &crate::weights::SafetensorsFile) -> Result<Self> {
        let get = |k: &str| -> Result<Option<Tensor>> {
            if f.contains(k) {
                f.tensor_numeric(k).map(Some)
            } else {
                Ok(None)
            }
        };
        let point_labels = get("point_labels")?;
        if let Some(l) = &point_labels {
            if let Some((i, v)) = l.data().iter().enumerate().find(|(_, v)| v.fract() != 0.0) {
                return Err(Error::Input(format!(
                    "{}: tensor `point_labels` element {i} is {v}: expected a whole number (1 foreground, 0 background, -1 ignore)",
                    f.path().display()
                )));
            }
        }
        Ok(Prompts {
            point_coords: get("point_coords")?,
            point_labels,
            boxes: get("boxes")?,
            mask_inputs: get("mask_inputs")?,
        })
    }
}

/// The prompt encoder.
pub struct PromptEncoder<B: Backend> {
    /// `[2, C/2]` random Fourier features.
    pub gaussian: Tensor,
    /// Learnt embeddings: 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
    pub point_embeddings: [Vec<f32>; 4],
    /// Embedding of ignored / padding points.
    pub not_a_point: Vec<f32>,
    /// Mask downscaling: conv k2 s2 -> LN2d -> GELU -> conv k2 s2 -> LN2d -> GELU -> conv 1x1.
    pub mask_conv1: Conv2d<B>,
    /// See `mask_conv1`.
    pub mask_norm1: LayerNorm<B>,
    /// See `mask_conv1`.
    pub mask_conv2: Conv2d<B>,
    /// See `mask_conv1`.
    pub mask_norm2: LayerNorm<B>,
    /// See `mask_conv1`.
    pub mask_conv3: Conv2d<B>,
    /// Width C.
    pub dim: usize,
    /// The no-mask embedding on the device, `[1, 1, 1, C]` (broadcast over the image tokens).
    pub no_mask: B::Tensor,
    /// Dense positional encodings `[1, h*w, C]` per grid, computed and uploaded once.
    pub pe_cache: std::sync::Mutex<std::collections::HashMap<(usize, usize), B::Tensor>>,
}

impl<B: Backend> PromptEncoder<B> {
    /// Loads `prompt_encoder.*`.
    pub fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig) -> Result<Self> {
        let c = cfg.prompt_dim;
        let m = cfg.mask_in_chans;
        let vec = |ws: &mut WeightStore, k: &str| -> Result<Vec<f32>> {
            Ok(ws.take(k, &[1, c])?.into_vec())
        };
        let pe = |i: usize, ws: &mut WeightStore| {
            vec(ws, &format!("prompt_encoder.point_embeddings.{i}.weight"))
        };
        let p = "prompt_encoder.mask_downscaling";
        Ok(PromptEncoder {
            gaussian: ws.take(
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                &[2, c / 2],
            )?,
            point_embeddings: [pe(0, ws)?, pe(1, ws)?, pe(2, ws)?, pe(3, ws)?],
            not_a_point: vec(ws, "prompt_encoder.not_a_point_embed.weight")?,
            no_mask: be.upload(
                &ws.take("prompt_encoder.no_mask_embed.weight", &[1, c])?
                    .reshape(&[1, 1, 1, c])?,
            )?,
            mask_conv1: Conv2d::load(be, ws, &format!("{p}.0"), 1, m / 4, 2, 2, 0, true)?,
            mask_norm1: LayerNorm::load(be, ws, &format!("{p}.1"), m / 4, 1e-6)?,
            mask_conv2: Conv2d::load(be, ws, &format!("{p}.3"), m / 4, m, 2, 2, 0, true)?,
            mask_norm2: LayerNorm::load(be, ws, &format!("{p}.4"), m, 1e-6)?,
            mask_conv3: Conv2d::load(be, ws, &format!("{p}.6"), m, c, 1, 1, 0, true)?,
            dim: c,
            pe_cache: Default::default(),
        })
    }

    /// Fourier encoding of normalised coordinates `(x, y)` in [0, 1]: `[sin(2 pi p), cos(2 pi p)]`
    /// with `p = (2 (x, y) - 1) @ G`.
    fn encode(&self, x: f32, y: f32, out: &mut [f32]) {
        let half = self.dim / 2;
        let g = self.gaussian.data();
        let (x, y) = (2.0 * x - 1.0, 2.0 * y - 1.0);
        for j in 0..half {
            let p = (x * g[j] + y * g[half + j]) * (2.0 * std::f32::consts::PI);
            out[j] = p.sin();
            out[half + j] = p.cos();
        }
    }

    /// Sparse prompt tokens `[batch, Nt, C]` for a model input of `(H, W)` pixels.
    pub fn sparse(
        &self,
        prompts: &Prompts,
        batch: usize,
        input_hw: (usize, usize),
    ) -> Result<Tensor> {
        let c = self.dim;
        let (ih, iw) = (input_hw.0 as f32, input_hw.1 as f32);
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); batch];
        let mut ntok = 0;
        if let Some(pc) = &prompts.point_coords {
            let pl = prompts
                .point_labels
                .as_ref()
                .ok_or_else(|| Error::Input("point_coords given without point_labels".into()))?;
            let s = pc.shape();
            if s.len() != 3 || s[0] != batch || s[2] != 2 || pl.shape() != [s[0], s[1]] {
                return Err(Error::Input(format!(
                    "point_coords {:?} / point_labels {:?}: expected [{batch}, N, 2] and [{batch}, N]",
                    s,
                    pl.shape()
                )));
            }
            let n = s[1];
            let pad = prompts.boxes.is_none();
            for (b, row) in rows.iter_mut().enumerate() {
                let mut emit = |x: f32, y: f32, label: f32| -> Result<()> {
                    let mut e = vec![0f32; c];
                    if label == -1.0 {
                        for (o, v) in e.iter_mut().zip(&self.not_a_point) {
                            *o = *v;
                        }
                    } else {
                        self.encode((x + 0.5) / iw, (y + 0.5) / ih, &mut e);
                        let k = if label == 0.0 {
                            0
                        } else if label == 1.0 {
                            1
                        } else {
                            return Err(Error::Input(format!(
                                "point label {label}: expected 1 (foreground), 0 (background) or -1 (ignore)"
                            )));
                        };
                        for (o, v) in e.iter_mut().zip(&self.point_embeddings[k]) {
                            *o += *v;
                        }
                    }
                    row.extend_from_slice(&e);
                    Ok(())
                };
                for i in 0..n {
                    let p = &pc.data()[(b * n + i) * 2..(b * n + i) * 2 + 2];
                    emit(p[0], p[1], pl.data()[b * n + i])?;
                }
                if pad {
                    emit(0.0, 0.0, -1.0)?;
                }
            }
            ntok += n + usize::from(pad);
        }
        if let Some(bx) = &prompts.boxes {
            if bx.shape() != [batch, 4] {
                return Err(Error::Input(format!(
                    "boxes have shape {:?}; expected [{batch}, 4] (x0, y0, x1, y1)",
                    bx.shape()
                )));
            }
            for (b, row) in rows.iter_mut().enumerate() {
                let v = &bx.data()[b * 4..b * 4 + 4];
                for corner in 0..2 {
                    let mut e = vec![0f32; c];
                    self.encode(
                        (v[2 * corner] + 0.5) / iw,
                        (v[2 * corner + 1] + 0.5) / ih,
                        &mut e,
                    );
                    for (o, w) in e.iter_mut().zip(&self.point_embeddings[2 + corner]) {
                        *o += *w;
                    }
                    row.extend_from_slice(&e);
                }
            }
            ntok += 2;
        }
        Tensor::from_vec(rows.concat(), &[batch, ntok, c])
    }

    /// The dense positional encoding of a `(h, w)` grid, `[h, w, C]` (channels-last).
    pub fn dense_pe(&self, grid: (usize, usize)) -> Tensor {
        let (h, w) = grid;
        let c = self.dim;
        let mut out = vec![0f32; h * w * c];
        for y in 0..h {
            for x in 0..w {
                let o = &mut out[(y * w + x) * c..(y * w + x + 1) * c];
                self.encode((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32, o);
            }
        }
        Tensor::from_vec(out, &[h, w, c]).expect("sizes agree by construction")
    }

    /// The dense positional encoding of a `(h, w)` grid on the device, `[1, h*w, C]`, cached:
    /// every decode of the same grid reuses it.
    pub fn dense_pe_dev(&self, be: &B, grid: (usize, usize)) -> Result<B::Tensor> {
        let mut cache = self.pe_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&grid) {
            return Ok(t.clone());
        }
        let t = be.upload(
            &self
                .dense_pe(grid)
                .reshape(&[1, grid.0 * grid.1, self.dim])?,
        )?;
        cache.insert(grid, t.clone());
        Ok(t)
    }

    /// Dense prompt embeddings: `[batch, h, w, C]` from mask inputs, or the no-mask embedding
    /// as `[1, 1, 1, C]`, which the decoder broadcasts over every image token (no per-call
    /// `batch x h x w x C` copy).
    pub fn dense(
        &self,
        be: &B,
        prompts: &Prompts,
        batch: usize,
        grid: (usize, usize),
    ) -> Result<B::Tensor> {
        match &prompts.mask_inputs {
            Some(m) => {
                let want = [batch, 1, 4 * grid.0, 4 * grid.1];
                if m.shape() != want {
                    return Err(Error::Input(format!(
                        "mask_inputs have shape {:?}; expected {want:?}",
                        m.shape()
                    )));
                }
                let x = be.upload(&m.reshape(&[batch, 4 * grid.0, 4 * grid.1, 1])?)?;
                let x = self.mask_conv1.forward(be, &x)?;
                let x = be.activate(&self.mask_norm1.forward(be, &x)?, Act::Gelu)?;
                let x = self.mask_conv2.forward(be, &x)?;
                let x = be.activate(&self.mask_norm2.forward(be, &x)?, Act::Gelu)?;
                self.mask_conv3.forward(be, &x)
            }
            None => Ok(self.no_mask.clone()),
        }
    }
}
