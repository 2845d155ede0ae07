//! The training loop behind `medsa-engine train`: data, model set-up (adding adapters to a base
//! checkpoint that has none), optimisation with gradient accumulation, validation, checkpoints
//! (atomic; resumable, optimiser state included), a JSON-lines log and a progress line.
//!
//! Output folder layout: `last.safetensors` (+ `last.state.safetensors`), `best.safetensors`
//! (best validation Dice), `log.jsonl` (one object per step and per validation).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{Grads, Param, Trainable};
use crate::sam::image_encoder::DepthSpec;
use crate::sam::mask_decoder::OUTPUT_TOKENS;
use crate::sam::model::to_checkpoint;
use crate::sam::{MaskOutput, Sam};
use crate::tensor::Tensor;
use crate::train::checkpoint::{
    self, init_adapters, load_adapter, load_state, overlay_map, read_tensors, save_adapter,
    save_state, state_path, AdapterChoice, AdapterMeta, TrainState,
};
use crate::train::data::{self, DataKind, DataOptions, Dataset, Loader, LoaderOptions};
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::sha256::sha256_file;
use crate::train::step::{forward_backward, Batch, LossConfig, Optimizer};
use crate::weights::WeightStore;

/// Everything `train` needs.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Base checkpoint.
    pub base: PathBuf,
    /// Training data: a dataset folder or manifest.
    pub data: PathBuf,
    /// Separate validation data; otherwise `val_fraction` of the training cases.
    pub val_data: Option<PathBuf>,
    /// Fraction of cases held out for validation when `val_data` is absent.
    pub val_fraction: f64,
    /// Output folder.
    pub out: PathBuf,
    /// Trainable set (see [`Trainable::parse`]).
    pub trainable: String,
    /// Adapters to add when the base checkpoint has none of them.
    pub add_adapters: AdapterChoice,
    /// Loss.
    pub loss: LossConfig,
    /// Optimiser.
    pub adamw: AdamWConfig,
    /// Warm-up steps of the warm-up + cosine schedule; `None` keeps the rate constant.
    pub warmup_cosine: Option<u64>,
    /// Global gradient-norm clipping.
    pub clip: Option<f64>,
    /// Samples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub accumulate: usize,
    /// Optimiser steps in total.
    pub steps: u64,
    /// Validate every this many steps (and at the end); 0 = only at the end.
    pub val_every: u64,
    /// Save `last` every this many steps (and at the end); 0 = only at the end.
    pub save_every: u64,
    /// Seed of the data order, prompts and adapter initialisation.
    pub seed: u64,
    /// Data options (model size, preset, label, intensity, depth chunk).
    pub data_opts: DataOptions,
    /// Positive clicks, negative clicks and box jitter (`None`: no box) per image.
    pub prompts: (usize, usize, Option<u32>),
    /// Depth-branch mode for depth chunks (`None`: the base checkpoint's metadata, else
    /// `compat` for the reference decoder flavour and `per-token` otherwise).
    pub depth_mode: Option<crate::medsa::depth_branch::DepthMode>,
    /// Decoder flavour to train (`None`: the base checkpoint's metadata, else inferred from
    /// its keys, SPEC section 7).
    pub decoder_flavour: Option<crate::sam::DecoderFlavour>,
    /// Random left-right flips of training samples (p = 0.5, prompts and targets flipped
    /// with them); for anatomy that is roughly mirror-symmetric.
    pub flip: bool,
    /// Recompute encoder blocks in backward instead of keeping their activations.
    pub recompute: bool,
    /// Continue from `out/last.safetensors` and its state.
    pub resume: bool,
    /// No progress line.
    pub quiet: bool,
}

/// Validation figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ValMetrics {
    /// Mean loss per batch.
    pub loss: f64,
    /// Mean Dice at probability 0.5 over images.
    pub dice: f64,
    /// Mean IoU at probability 0.5.
    pub iou: f64,
    /// Mean Dice over thresholds 0.1, 0.3, 0.5, 0.7, 0.9 (the reference's extra figure).
    pub dice_multi: f64,
    /// Images evaluated.
    pub images: usize,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    /// Step the run started from (non-zero when resumed).
    pub start_step: u64,
    /// Steps done in total.
    pub steps: u64,
    /// Validation before the first step of this run, if there is validation data.
    pub initial_val: Option<ValMetrics>,
    /// Validation after the last step.
    pub final_val: Option<ValMetrics>,
    /// Best validation Dice and its step.
    pub best: Option<(f64, u64)>,
    /// Mean training loss of the first and last 10% of steps of this run.
    pub train_loss: (f64, f64),
    /// Training throughput (images per second).
    pub images_per_s: f64,
    /// Trained tensors (in-model) and their element count.
    pub trained: (usize, usize),
}

/// Converts checkpoint tensors of trained parameters to in-model names and shapes (the inverse
/// of [`to_checkpoint`]).
fn from_checkpoint(
    map: &BTreeMap<String, Tensor>,
    model_shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    if let (Some(i), Some(m)) = (
        map.get("mask_decoder.iou_token.weight"),
        map.get("mask_decoder.mask_tokens.weight"),
    ) {
        let mut v = i.data().to_vec();
        v.extend_from_slice(m.data());
        let c = i.dim(1);
        out.insert(
            OUTPUT_TOKENS.to_string(),
            Tensor::from_vec(v, &[1, 1 + m.dim(0), c])?,
        );
    }
    for (k, t) in map {
        if k == "mask_decoder.iou_token.weight" || k == "mask_decoder.mask_tokens.weight" {
            continue;
        }
        match model_shapes.get(k) {
            Some(s) if s.as_slice() != t.shape() => {
                out.insert(k.clone(), t.reshape(s)?);
            }
            _ => {
                out.insert(k.clone(), t.clone());
            }
        }
    }
    Ok(out)
}

fn dev_or_host<B: Backend>(be: &B, p: &Param<'_, B>) -> Result<Tensor> {
    match p {
        Param::Dev(t) => be.download(t),
        Param::Host(t) => Ok((*t).clone()),
    }
}

/// A JSON-lines log appended to (flushed per line so a crash loses nothing logged).
struct Log(std::fs::File);

impl Log {
    fn open(path: &Path, truncate: bool) -> Result<Self> {
        // Appending follows links: a planted `log.jsonl` link must not make training write into
        // whatever file it points to.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Input(format!(
                "{}: is a symbolic link; the training log is written only as a plain file in -o",
                path.display()
            )));
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Log(f))
    }

    fn line(&mut self, v: serde_json::Value) {
        // A full disk must not kill a long run; the checkpoint is what matters.
        let _ = writeln!(self.0, "{v}");
        let _ = self.0.flush();
    }
}

pub(super) fn make_loader<'a>(
    ds: &'a Dataset,
    batch: usize,
    seed: u64,
    prompts: (usize, usize, Option<u32>),
    eval: bool,
) -> Result<Loader<'a>> {
    let mut o = if eval {
        LoaderOptions::eval(batch, seed)
    } else {
        LoaderOptions::train(batch, seed)
    };
    o.pos = prompts.0;
    o.neg = prompts.1;
    o.box_jitter = prompts.2;
    Loader::new(ds, o)
}

pub(super) fn to_step_batch(
    b: &data::Batch,
    grid: usize,
    mode: crate::medsa::depth_branch::DepthMode,
) -> Result<Batch> {
    Ok(Batch {
        images: b.images()?,
        prompts: b.prompts.clone(),
        target: b.targets(grid)?,
        depth: b.depth.map(|d| DepthSpec { d, mode }),
    })
}

/// Mirrors every selected sample of `b` left-right: images, targets and prompt x coordinates
/// (pixel `x` becomes `S - 1 - x`, so points stay on the same pixels and boxes swap sides).
/// Depth chunks flip as a whole (`per` images per sample).
fn flip_batch(b: &mut Batch, per: usize, rng: &mut crate::sam::random::Rng) -> Result<()> {
    let n = b.images.dim(0);
    let flips: Vec<bool> = (0..n / per.max(1)).map(|_| rng.uniform() < 0.5).collect();
    let flip_of = |i: usize| flips.get(i / per.max(1)).copied().unwrap_or(false);
    fn mirror_rows(t: &Tensor, flip_of: &dyn Fn(usize) -> bool) -> Result<Tensor> {
        let s = t.shape().to_vec();
        let w = s[s.len() - 1];
        let per_image: usize = s[1..].iter().product();
        let mut d = t.data().to_vec();
        for (i, img) in d.chunks_mut(per_image).enumerate() {
            if flip_of(i) {
                img.chunks_mut(w).for_each(|r| r.reverse());
            }
        }
        Tensor::from_vec(d, &s)
    }
    b.images = mirror_rows(&b.images, &flip_of)?;
    b.target = mirror_rows(&b.target, &flip_of)?;
    let size = b.images.dim(3) as f32;
    if let Some(pc) = &b.prompts.point_coords {
        let s = pc.shape().to_vec();
        let mut d = pc.data().to_vec();
        for (i, pts) in d.chunks_mut(s[1] * 2).enumerate() {
            if flip_of(i) {
                pts.chunks_mut(2).for_each(|p| p[0] = size - 1.0 - p[0]);
            }
        }
        b.prompts.point_coords = Some(Tensor::from_vec(d, &s)?);
    }
    if let Some(bx) = &b.prompts.boxes {
        let s = bx.shape().to_vec();
        let mut d = bx.data().to_vec();
        for (i, r) in d.chunks_mut(4).enumerate() {
            if flip_of(i) {
                let (x0, x1) = (r[0], r[2]);
                r[0] = size - 1.0 - x1;
                r[2] = size - 1.0 - x0;
            }
        }
        b.prompts.boxes = Some(Tensor::from_vec(d, &s)?);
    }
    Ok(())
}

pub use super::evaluate::evaluate;

/// The trained parameters in checkpoint form (f32 master copies when the optimiser has them).
fn trained_tensors<B: Backend>(
    be: &B,
    model: &mut Sam<B>,
    trainable: &Trainable,
    opt: &Optimizer,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, p) in model.params() {
        if !trainable.contains(&name) {
            continue;
        }
        let t = match opt.master.get(&name) {
            Some(m) => m.clone(),
            None => dev_or_host(be, &p)?,
        };
        for (k, v) in to_checkpoint(&name, &t)? {
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// Runs training as configured; see the module documentation for what it writes.
pub fn train<B: Backend>(be: &B, cfg: &TrainConfig) -> Result<TrainReport> {
    if cfg.batch == 0 || cfg.accumulate == 0 || cfg.steps == 0 {
        return Err(Error::Input(
            "batch size, accumulation and steps must be positive".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.out).map_err(|source| Error::Io {
        path: cfg.out.clone(),
        source,
    })?;
    let last = cfg.out.join("last.safetensors");
    let best_path = cfg.out.join("best.safetensors");
    let trainable = Arc::new(Trainable::parse(&cfg.trainable)?);

    // Model: base + (resumed tensors | newly added adapters).
    let base_sha = sha256_file(&cfg.base)?;
    let mut tensors = read_tensors(&cfg.base)?;
    let mut resumed: Option<(BTreeMap<String, Tensor>, TrainState)> = None;
    // What the base records, overridden by what the run being resumed recorded: a resumed run
    // keeps its decoder flavour and depth mode.
    let mut run_meta = crate::meta::ModelMeta::of_checkpoint(&cfg.base)?;
    if cfg.resume {
        if !last.exists() {
            return Err(Error::Input(format!(
                "--resume: {} does not exist (nothing to resume)",
                last.display()
            )));
        }
        let (t, meta) = load_adapter(&last)?;
        checkpoint::verify_base(&cfg.base, &last, &meta, false)?;
        if meta.trainable != cfg.trainable {
            return Err(Error::Input(format!(
                "--resume: {} was trained with --trainable {}, not {}",
                last.display(),
                meta.trainable,
                cfg.trainable
            )));
        }
        let recorded = crate::meta::ModelMeta::of_adapter(&last, &meta)?;
        if let (Some(want), Some(had)) = (cfg.decoder_flavour, recorded.decoder_flavour) {
            if want != had {
                return Err(Error::Input(format!(
                    "--resume: {} was trained with --decoder-flavour {had}, not {want}",
                    last.display()
                )));
            }
        }
        run_meta.decoder_flavour = recorded.decoder_flavour.or(run_meta.decoder_flavour);
        run_meta.depth_mode = recorded.depth_mode.or(run_meta.depth_mode);
        overlay_map(&mut tensors, &last, &t)?;
        let st = load_state(&state_path(&last))?;
        resumed = Some((t, st));
    } else {
        let cfg0 = {
            let ws = WeightStore::from_tensors("base", tensors.clone());
            crate::sam::SamConfig::infer(&ws)?
        };
        let mut want = cfg.add_adapters;
        if cfg0.adapter_dim.is_some() {
            want.encoder = false;
        }
        if cfg0.has_depth_branch() {
            want.depth = false;
        }
        if cfg0.decoder_layers.iter().any(|l| l.hyper) {
            want.decoder = false;
        }
        if want.encoder || want.depth || want.decoder {
            init_adapters(&mut tensors, &cfg0, want, cfg.seed)?;
        }
    }
    let mut ws = WeightStore::from_tensors(&cfg.base.display().to_string(), tensors);
    let load = crate::sam::LoadOptions {
        decoder_flavour: cfg.decoder_flavour.or(run_meta.decoder_flavour),
    };
    let mut model = Sam::from_store_with(be, &mut ws, &load)?;
    let depth_mode = cfg
        .depth_mode
        .unwrap_or_else(|| run_meta.depth_mode_or(model.config.decoder_flavour));
    if cfg.data_opts.depth.is_some() && !model.config.has_depth_branch() {
        return Err(Error::Input(
            "depth chunks need Depth_Adapter weights: add them (--add-adapters depth) or train on \
             single slices"
                .into(),
        ));
    }
    let native = model.config.img_size().0;
    let mut dopts = cfg.data_opts.clone();
    if dopts.size == 0 {
        dopts.size = native;
    }
    let grid = 4 * (dopts.size / model.config.patch);

    // Data.
    let (kind, cases) = data::discover(&cfg.data)?;
    let (train_cases, val_cases, val_kind) = match &cfg.val_data {
        Some(v) => {
            let (vk, vc) = data::discover(v)?;
            (cases, vc, vk)
        }
        None => {
            let (t, v) = data::split(&cases, cfg.val_fraction, cfg.seed)?;
            (t, v, kind)
        }
    };
    if val_kind != kind {
        return Err(Error::Input(
            "training and validation data must both be 2D images or both volumes".into(),
        ));
    }
    let train_ds = Dataset::load(kind, &train_cases, &dopts)?;
    let val_ds = if val_cases.is_empty() {
        None
    } else {
        Some(Dataset::load(kind, &val_cases, &dopts)?)
    };
    let mut loader = make_loader(&train_ds, cfg.batch, cfg.seed, cfg.prompts, false)?;

    // Optimiser (restored on resume, with the saved f32 masters).
    let schedule = match cfg.warmup_cosine {
        Some(w) => Schedule::WarmupCosine {
            warmup: w,
            total: cfg.steps,
            min_factor: 0.01,
        },
        None => Schedule::Constant,
    };
    let mut opt = Optimizer::new(cfg.adamw, schedule, cfg.clip);
    let mut trained = (0usize, 0usize);
    let shapes: BTreeMap<String, Vec<usize>> = model
        .params()
        .into_iter()
        .map(|(k, p)| {
            let s = match &p {
                Param::Dev(t) => be.dims(t).to_vec(),
                Param::Host(t) => t.shape().to_vec(),
            };
            (k, s)
        })
        .collect();
    for (k, s) in &shapes {
        if trainable.contains(k) {
            trained.0 += 1;
            trained.1 += s.iter().product::<usize>();
        }
    }
    if trained.0 == 0 {
        return Err(Error::Input(format!(
            "trainable set \"{}\" matches no parameter of this model",
            cfg.trainable
        )));
    }
    let mut start = 0;
    let mut best: Option<(f64, u64)> = None;
    if let Some((t, st)) = resumed {
        opt.master = from_checkpoint(&t, &shapes)?;
        opt.states = st.optim;
        opt.step = st.step;
        start = st.step;
        loader.restore(data::LoaderState::from_words(&st.rng)?)?;
        if let Some(b) = st.extra.get("best_dice").and_then(|v| v.as_f64()) {
            let s = st
                .extra
                .get("best_step")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            best = Some((b, s));
        }
    }
    let mut log = Log::open(&cfg.out.join("log.jsonl"), !cfg.resume)?;
    let mut grads = Grads::<B>::new(trainable.clone());
    let mut report = TrainReport {
        start_step: start,
        trained,
        ..Default::default()
    };
    let model_config = model.config.clone();
    let meta = |step: u64, loss: Option<f64>| AdapterMeta {
        base_sha256: base_sha.clone(),
        base_file: cfg
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config: model_config.clone(),
        trainable: cfg.trainable.clone(),
        preset: dopts.preset,
        model_size: dopts.size,
        intensity: (kind == DataKind::Volumes).then_some(dopts.intensity),
        num_classes: 1,
        step,
        loss,
        extra: [
            (
                "label_id".to_string(),
                dopts.label_id.map(|v| v.to_string()).unwrap_or_default(),
            ),
            (
                "depth".to_string(),
                dopts.depth.map(|v| v.to_string()).unwrap_or_default(),
            ),
            (
                "depth_mode".to_string(),
                crate::meta::depth_mode_name(depth_mode).to_string(),
            ),
            (
                "decoder_flavour".to_string(),
                model_config.decoder_flavour.name().to_string(),
            ),
            ("lr".to_string(), cfg.adamw.lr.to_string()),
            ("loss_kind".to_string(), format!("{:?}", cfg.loss.kind)),
        ]
        .into_iter()
        .collect(),
    };
    let validate = |model: &Sam<B>| -> Result<Option<ValMetrics>> {
        match &val_ds {
            Some(v) => evaluate(
                be,
                model,
                v,
                cfg.batch,
                cfg.seed ^ 0x5eed,
                cfg.prompts,
                &cfg.loss,
                depth_mode,
            )
            .map(Some),
            None => Ok(None),
        }
    };
    // A resumed run's starting point was validated (and logged) when it was saved.
    report.initial_val = if start == 0 { validate(&model)? } else { None };
    if let Some(v) = report.initial_val {
        log.line(
            json!({"step": start, "val_loss": v.loss, "val_dice": v.dice, "val_iou": v.iou,
                        "val_dice_multi": v.dice_multi, "val_images": v.images}),
        );
    }

    let t0 = Instant::now();
    let mut images = 0usize;
    let mut losses = Vec::new();
    let mut last_loss = None;
    // The step of the checkpoint on disk at `last` (a resumed run starts from one).
    let mut saved = cfg.resume.then_some(start).filter(|&s| s > 0);
    let scale = 1.0 / cfg.accumulate as f32;
    for step in start..cfg.steps {
        let ts = Instant::now();
        // Per-step stream, so a resumed run flips exactly as an uninterrupted one.
        let mut flip_rng =
            crate::sam::random::Rng::new(cfg.seed ^ 0xf11d_u64.wrapping_mul(step.wrapping_add(1)));
        let mut parts_sum = crate::train::step::LossParts::default();
        let mut n_img = 0;
        for _ in 0..cfg.accumulate {
            let b = loader.next_batch()?.ok_or_else(|| {
                Error::Input("the training data has no image with foreground".into())
            })?;
            let mut sb = to_step_batch(&b, grid, depth_mode)?;
            if cfg.flip {
                flip_batch(&mut sb, b.depth.unwrap_or(1), &mut flip_rng)?;
            }
            let (p, _) = forward_backward(
                be,
                &model,
                &sb,
                MaskOutput::Single,
                &cfg.loss,
                &mut grads,
                scale,
                cfg.recompute,
            )?;
            parts_sum.total += p.total * scale as f64;
            parts_sum.bce += p.bce * scale as f64;
            parts_sum.dice += p.dice * scale as f64;
            parts_sum.iou += p.iou * scale as f64;
            n_img += b.len();
        }
        let stopped = |why: String| {
            Error::Input(format!(
                "training stopped at step {}: {why}; {}",
                step + 1,
                match saved {
                    Some(s) => format!("the last good checkpoint is {} (step {s})", last.display()),
                    None => "no checkpoint of this run was written yet".to_string(),
                }
            ))
        };
        if !parts_sum.total.is_finite() {
            return Err(stopped(format!(
                "the loss is {} (bce {}, dice {}, iou {})",
                parts_sum.total, parts_sum.bce, parts_sum.dice, parts_sum.iou
            )));
        }
        let lr = opt.lr();
        let norm = opt
            .step(be, &mut model, &mut grads)
            .map_err(|e| stopped(e.to_string()))?;
        be.synchronize()?;
        let dt = ts.elapsed().as_secs_f64();
        images += n_img;
        losses.push(parts_sum.total);
        last_loss = Some(parts_sum.total);
        let ips = images as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        log.line(
            json!({"step": step + 1, "loss": parts_sum.total, "bce": parts_sum.bce,
                        "dice_ce": parts_sum.dice, "iou_loss": parts_sum.iou, "lr": lr,
                        "grad_norm": norm, "images": n_img, "step_s": dt,
                        "images_per_s": ips}),
        );
        if !cfg.quiet {
            let done = step + 1 - start;
            let left = cfg.steps - step - 1;
            let eta = t0.elapsed().as_secs_f64() / done as f64 * left as f64;
            eprint!(
                "\rstep {}/{}  loss {:.4}  {:.1} img/s  eta {:.0}s   ",
                step + 1,
                cfg.steps,
                parts_sum.total,
                ips,
                eta
            );
        }
        let at_end = step + 1 == cfg.steps;
        if at_end || (cfg.val_every > 0 && (step + 1) % cfg.val_every == 0) {
            if let Some(v) = validate(&model)? {
                log.line(
                    json!({"step": step + 1, "val_loss": v.loss, "val_dice": v.dice,
                                "val_iou": v.iou, "val_dice_multi": v.dice_multi,
                                "val_images": v.images}),
                );
                if !cfg.quiet {
                    eprintln!(
                        "\rstep {}/{}  val loss {:.4}  Dice {:.4}  IoU {:.4}          ",
                        step + 1,
                        cfg.steps,
                        v.loss,
                        v.dice,
                        v.iou
                    );
                }
                if best.is_none_or(|(d, _)| v.dice > d) {
                    best = Some((v.dice, step + 1));
                    let t = trained_tensors(be, &mut model, &trainable, &opt)?;
                    save_adapter(&best_path, &t, &meta(step + 1, Some(parts_sum.total)))?;
                }
                if at_end {
                    report.final_val = Some(v);
                }
            }
        }
        if at_end || (cfg.save_every > 0 && (step + 1) % cfg.save_every == 0) {
            let t = trained_tensors(be, &mut model, &trainable, &opt)?;
            save_adapter(&last, &t, &meta(step + 1, Some(parts_sum.total)))?;
            let st = TrainState {
                step: step + 1,
                rng: loader.state().to_words(),
                optim: opt.states.clone(),
                extra: json!({"best_dice": best.map(|b| b.0), "best_step": best.map(|b| b.1)}),
            };
            save_state(&state_path(&last), &st)?;
            saved = Some(step + 1);
        }
    }
    if !cfg.quiet {
        eprintln!();
    }
    let _ = last_loss;
    let k = (losses.len() / 10).max(1);
    if !losses.is_empty() {
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        report.train_loss = (mean(&losses[..k]), mean(&losses[losses.len() - k..]));
    }
    report.steps = cfg.steps;
    report.best = best;
    report.images_per_s = images as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    Ok(report)
}
