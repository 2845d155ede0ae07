//! The whole model: image encoder -> prompt encoder -> mask decoder -> postprocess.

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::sam::config::{DecoderFlavour, SamConfig};
use crate::sam::image_encoder::{DepthSpec, ImageEncoder};
use crate::sam::mask_decoder::MaskDecoder;
use crate::sam::prompt_encoder::{PromptEncoder, Prompts};
use crate::sam::Trace;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// Which of the decoder's mask tokens are returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskOutput {
    /// Mask token 0 only (SAM's `multimask_output=False`).
    Single,
    /// Mask tokens 1.. (SAM's `multimask_output=True`: three masks).
    Multimask,
    /// Mask tokens 0..n as n classes (Med-SA multi-class heads).
    Classes(usize),
}

impl MaskOutput {
    /// SAM's boolean switch.
    pub fn from_multimask(multimask: bool) -> Self {
        if multimask {
            MaskOutput::Multimask
        } else {
            MaskOutput::Single
        }
    }

    fn range(self, tokens: usize) -> Result<(usize, usize)> {
        match self {
            MaskOutput::Single => Ok((0, 1)),
            MaskOutput::Multimask if tokens > 1 => Ok((1, tokens - 1)),
            MaskOutput::Multimask => Err(Error::Input(
                "multimask output needs more than one mask token".into(),
            )),
            MaskOutput::Classes(n) if n >= 1 && n <= tokens => Ok((0, n)),
            MaskOutput::Classes(n) => Err(Error::Input(format!(
                "{n} classes requested but the decoder has {tokens} mask tokens"
            ))),
        }
    }
}

/// What [`Sam::forward`] returns (host tensors).
pub struct SamOutput {
    /// `[B, C, h, w]`.
    pub image_embeddings: Tensor,
    /// `[B, M, 4h, 4w]` logits.
    pub low_res_masks: Tensor,
    /// `[B, M]`.
    pub iou_predictions: Tensor,
}

/// How a checkpoint becomes a model beyond what its tensors say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Run this decoder flavour whatever the key names imply (`None`: inferred, SPEC 7).
    pub decoder_flavour: Option<DecoderFlavour>,
}

/// SAM + Med-SA on a backend.
pub struct Sam<B: Backend> {
    /// The inferred configuration.
    pub config: SamConfig,
    /// Image encoder.
    pub image_encoder: ImageEncoder<B>,
    /// Prompt encoder.
    pub prompt_encoder: PromptEncoder<B>,
    /// Mask decoder.
    pub mask_decoder: MaskDecoder<B>,
}

impl<B: Backend> Sam<B> {
    /// Loads a checkpoint (official SAM or Med-SA key names), inferring the configuration, and
    /// uploads every weight once. Fails on missing, unexpected or mis-shaped tensors.
    pub fn load(be: &B, path: impl AsRef<Path>) -> Result<Self> {
        let mut ws = WeightStore::open(path)?;
        Self::from_store(be, &mut ws)
    }

    /// Builds the model from any weight store (file or in-memory), checking every key is used.
    pub fn from_store(be: &B, ws: &mut WeightStore) -> Result<Self> {
        Self::from_store_with(be, ws, &LoadOptions::default())
    }

    /// [`Sam::load`] with options.
    pub fn load_with(be: &B, path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let mut ws = WeightStore::open(path)?;
        Self::from_store_with(be, &mut ws, opts)
    }

    /// [`Sam::from_store`] with options that override what the tensors imply.
    pub fn from_store_with(be: &B, ws: &mut WeightStore, opts: &LoadOptions) -> Result<Self> {
        let ws = &mut *ws;
        let mut config = SamConfig::infer(ws)?;
        if let Some(f) = opts.decoder_flavour {
            config.decoder_flavour = f;
        }
        let image_encoder = ImageEncoder::load(be, ws, &config)?;
        let prompt_encoder = PromptEncoder::load(be, ws, &config)?;
        let mask_decoder = MaskDecoder::load(be, ws, &config)?;
        ws.finish()?;
        Ok(Sam {
            config,
            image_encoder,
            prompt_encoder,
            mask_decoder,
        })
    }

    /// Encodes `images` `[B, 3, H, W]` (already preprocessed); returns `[B, C, H/p, W/p]`.
    pub fn encode(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        trace: &mut Trace<B>,
    ) -> Result<B::Tensor> {
        if depth.is_some() && !self.config.has_depth_branch() {
            return Err(Error::Input(
                "volume input (depth) needs a checkpoint with Depth_Adapter weights".into(),
            ));
        }
        self.image_encoder.forward(be, images, depth, trace)
    }

    /// Decodes prompts against embeddings `[B, C, h, w]` of a model input of `input_hw`
    /// pixels; sample b of the prompts uses embedding b. Returns `(low_res_masks, iou)`.
    pub fn decode(
        &self,
        be: &B,
        embeddings: &B::Tensor,
        input_hw: (usize, usize),
        prompts: &Prompts,
        output: MaskOutput,
        trace: &mut Trace<B>,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let s = be.dims(embeddings).to_vec();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let sparse = self.prompt_encoder.sparse(prompts, b, input_hw)?;
        let sparse = be.upload(&sparse)?;
        trace.record(be, "sparse_embeddings", &sparse);
        let dense = self.prompt_encoder.dense(be, prompts, b, (h, w))?;
        let pe = self.prompt_encoder.dense_pe_dev(be, (h, w))?;
        if trace.is_enabled() {
            // The no-mask embedding is kept as one broadcast row; the trace shows it per token.
            let zeros = be.upload(&Tensor::zeros(&[b, h, w, c]))?;
            let full = be.add_scaled(&zeros, 1.0, &dense, 1.0)?;
            let d = be.permute(&full, &[0, 3, 1, 2])?;
            trace.record(be, "dense_embeddings", &d);
            let p = be.permute(&be.reshape(&pe, &[1, h, w, c])?, &[0, 3, 1, 2])?;
            trace.record(be, "dense_pe", &p);
        }
        let emb = be.permute(embeddings, &[0, 2, 3, 1])?;
        let (masks, iou) = self.mask_decoder.predict(be, &emb, &dense, &pe, &sparse)?;
        let (start, len) = output.range(self.mask_decoder.num_mask_tokens)?;
        let masks = be.narrow(&masks, 1, start, len)?;
        let iou = be.narrow(&iou, 1, start, len)?;
        trace.record(be, "low_res_masks", &masks);
        trace.record(be, "iou_predictions", &iou);
        Ok((masks, iou))
    }

    /// The whole forward pass on host inputs.
    pub fn forward(
        &self,
        be: &B,
        images: &Tensor,
        prompts: &Prompts,
        output: MaskOutput,
        depth: Option<DepthSpec>,
        trace: &mut Trace<B>,
    ) -> Result<SamOutput> {
        let s = images.shape();
        if s.len() != 4 {
            return Err(Error::Input(format!(
                "images have shape {s:?}; expected [B, 3, H, W]"
            )));
        }
        let input_hw = (s[2], s[3]);
        let x = be.upload(images)?;
        let emb = self.encode(be, &x, depth, trace)?;
        trace.record(be, "image_embeddings", &emb);
        let (masks, iou) = self.decode(be, &emb, input_hw, prompts, output, trace)?;
        Ok(SamOutput {
            image_embeddings: be.download(&emb)?,
            low_res_masks: be.download(&masks)?,
            iou_predictions: be.download(&iou)?,
        })
    }
}

/// Upsamples low-resolution mask logits `[B, M, 4h, 4w]` to the model input `(H, W)`, crops the
/// padding to `input_size` (the resized image before padding) and resamples to `original_size`,
/// all bilinear (align_corners=False), as SAM's `postprocess_masks`. Logits stay logits:
/// threshold at 0 for a binary mask.
pub fn postprocess_masks<B: Backend>(
    be: &B,
    low_res: &B::Tensor,
    model_hw: (usize, usize),
    input_size: (usize, usize),
    original_size: (usize, usize),
) -> Result<B::Tensor> {
    if input_size.0 == 0
        || input_size.1 == 0
        || input_size.0 > model_hw.0
        || input_size.1 > model_hw.1
    {
        return Err(Error::Input(format!(
            "input size {input_size:?} must be positive and within the model input {model_hw:?}"
        )));
    }
    let m = be.resize_bilinear(low_res, model_hw)?;
    let m = be.narrow(&m, 2, 0, input_size.0)?;
    let m = be.narrow(&m, 3, 0, input_size.1)?;
    be.resize_bilinear(&m, original_size)
}

// ----- training -----------------------------------------------------------------------------------

use crate::nn::{Grads, ParamList};
use crate::sam::image_encoder::EncoderCache;
use crate::sam::mask_decoder::{DecoderCache, OUTPUT_TOKENS};

/// What [`Sam::forward_t`] keeps for [`Sam::backward`].
pub struct SamCache<T> {
    enc: Option<EncoderCache<T>>,
    dec: DecoderCache<T>,
    range: (usize, usize),
}

/// Zero-pads `x` along dimension 1 from `[.., len, ..]` at `start` to `total` rows: the adjoint
/// of `narrow(1, start, len)`.
fn pad_dim1<B: Backend>(be: &B, x: &B::Tensor, start: usize, total: usize) -> Result<B::Tensor> {
    let s = be.dims(x).to_vec();
    let len = s[1];
    if start == 0 && len == total {
        return Ok(x.clone());
    }
    let mut parts = Vec::new();
    let zeros = |n: usize| -> Result<B::Tensor> {
        let mut z = s.clone();
        z[1] = n;
        be.upload(&Tensor::zeros(&z))
    };
    if start > 0 {
        parts.push(zeros(start)?);
    }
    parts.push(x.clone());
    if start + len < total {
        parts.push(zeros(total - start - len)?);
    }
    be.concat(&parts.iter().collect::<Vec<_>>(), 1)
}

impl<B: Backend> Sam<B> {
    /// Every trainable-capable parameter (image encoder and mask decoder; the prompt encoder is
    /// frozen), by in-model name.
    pub fn params(&mut self) -> ParamList<'_, B> {
        let mut out = Vec::new();
        self.image_encoder.params(&mut out);
        self.mask_decoder.params(&mut out);
        out
    }

    /// Re-derives cached device data after host parameters (position embedding, rel-pos
    /// tables) changed.
    pub fn refresh_caches(&mut self, be: &B) -> Result<()> {
        self.image_encoder.refresh_caches(be)
    }

    /// The forward pass of training: like [`Sam::encode`] + [`Sam::decode`] on preprocessed
    /// `images` `[B, 3, H, W]`, keeping what [`Sam::backward`] needs for the parameters
    /// `grads` trains (the encoder keeps nothing when none of its parameters is trained).
    /// Returns `(low_res_masks [B, M, 4h, 4w], iou [B, M], cache)`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn forward_t(
        &self,
        be: &B,
        images: &B::Tensor,
        prompts: &Prompts,
        output: MaskOutput,
        depth: Option<DepthSpec>,
        grads: &Grads<B>,
        recompute: bool,
    ) -> Result<(B::Tensor, B::Tensor, SamCache<B::Tensor>)> {
        if depth.is_some() && !self.config.has_depth_branch() {
            return Err(Error::Input(
                "volume input (depth) needs a checkpoint with Depth_Adapter weights".into(),
            ));
        }
        let s = be.dims(images).to_vec();
        let input_hw = (s[2], s[3]);
        let (emb, enc) = if self.image_encoder.any_trained(grads) {
            let (e, c) = self
                .image_encoder
                .forward_t(be, images, depth, grads, recompute)?;
            (e, Some(c))
        } else {
            (
                self.image_encoder
                    .forward(be, images, depth, &mut Trace::off())?,
                None,
            )
        };
        let es = be.dims(&emb).to_vec();
        let (b, h, w) = (es[0], es[2], es[3]);
        let sparse = be.upload(&self.prompt_encoder.sparse(prompts, b, input_hw)?)?;
        let dense = self.prompt_encoder.dense(be, prompts, b, (h, w))?;
        let pe = self.prompt_encoder.dense_pe_dev(be, (h, w))?;
        let emb = be.permute(&emb, &[0, 2, 3, 1])?;
        let (masks, iou, dec) = self
            .mask_decoder
            .predict_t(be, &emb, &dense, &pe, &sparse)?;
        let range = output.range(self.mask_decoder.num_mask_tokens)?;
        let masks = be.narrow(&masks, 1, range.0, range.1)?;
        let iou = be.narrow(&iou, 1, range.0, range.1)?;
        Ok((masks, iou, SamCache { enc, dec, range }))
    }

    /// Accumulates into `grads` the gradients of the trained parameters given the gradients
    /// of [`Sam::forward_t`]'s outputs (`diou` may be omitted when the loss ignores the IoU
    /// head).
    pub fn backward(
        &self,
        be: &B,
        cache: &SamCache<B::Tensor>,
        dmasks: &B::Tensor,
        diou: Option<&B::Tensor>,
        grads: &mut Grads<B>,
    ) -> Result<()> {
        let t = self.mask_decoder.num_mask_tokens;
        let (start, _) = cache.range;
        let dm = pad_dim1(be, dmasks, start, t)?;
        let di = match diou {
            Some(d) => {
                let s = be.dims(d).to_vec();
                let d3 = be.reshape(d, &[s[0], s[1], 1])?;
                let p = pad_dim1(be, &d3, start, t)?;
                Some(be.reshape(&p, &[s[0], t])?)
            }
            None => None,
        };
        let demb = self.mask_decoder.backward(
            be,
            &cache.dec,
            &dm,
            di.as_ref(),
            grads,
            cache.enc.is_some(),
        )?;
        if let (Some(enc), Some(demb)) = (&cache.enc, demb) {
            let demb = be.permute(&demb, &[0, 3, 1, 2])?;
            self.image_encoder.backward(be, enc, &demb, grads)?;
        }
        Ok(())
    }
}

/// Converts an in-model parameter to its checkpoint tensors (the neck's 1x1 convolution gets its
/// kernel dimensions back; the output tokens split into the IoU and mask tokens).
pub fn to_checkpoint(name: &str, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    if name == OUTPUT_TOKENS {
        let s = t.shape();
        let c = s[2];
        let iou = Tensor::from_vec(t.data()[..c].to_vec(), &[1, c])?;
        let masks = Tensor::from_vec(t.data()[c..].to_vec(), &[s[1] - 1, c])?;
        return Ok(vec![
            ("mask_decoder.iou_token.weight".into(), iou),
            ("mask_decoder.mask_tokens.weight".into(), masks),
        ]);
    }
    if name == "image_encoder.neck.0.weight" && t.rank() == 2 {
        let s = t.shape();
        return Ok(vec![(name.into(), t.reshape(&[s[0], s[1], 1, 1])?)]);
    }
    Ok(vec![(name.into(), t.clone())])
}
