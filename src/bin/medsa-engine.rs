//! `medsa-engine`: run SAM / Med-SA checkpoints from the command line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::batch;
use medsa::medsa::depth_branch::DepthMode;
use medsa::pipeline::{self, Preset};
use medsa::sam::model::postprocess_masks;
use medsa::sam::random::{random_checkpoint, Rng};
use medsa::sam::{DepthSpec, MaskOutput, Prompts, Sam, SamConfig, Trace};
use medsa::selftest;
use medsa::weights::{
    save_safetensors, save_safetensors_as, ParamCounts, SafetensorsFile, WeightStore,
};
use medsa::Tensor;

#[derive(Parser)]
#[command(
    name = "medsa-engine",
    version,
    about = "Medical SAM Adapter engine (SAM + Med-SA)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DepthModeArg {
    /// Each spatial token attends over its own slices (default).
    PerToken,
    /// The public Med-SA code's regrouping, for adapters trained with it.
    Compat,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    /// Keep aspect, SAM mean/std, pad to square.
    Sam,
    /// Stretch to square, scale to [0, 1].
    Medsa,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a PyTorch checkpoint (.pth from torch.save) to safetensors, without Python.
    Convert {
        /// The .pth checkpoint: a state dict, or a training checkpoint with a `state_dict`
        /// (or `model`) entry; a DataParallel `module.` prefix is removed.
        input: PathBuf,
        /// The .safetensors file to write (atomically).
        output: PathBuf,
        /// Storage dtype of the written tensors.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
    },
    /// Print the configuration inferred from a checkpoint and its parameter counts.
    Info {
        /// A .safetensors checkpoint (official SAM or Med-SA key names).
        checkpoint: PathBuf,
    },
    /// Run the model on raw input tensors and write every output tensor.
    Forward {
        /// Checkpoint (.safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Adapter checkpoint from `train`, applied on top of --checkpoint.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Accept an adapter trained on a different base file.
        #[arg(long)]
        allow_base_mismatch: bool,
        /// Inputs (.safetensors): `images` (B,3,H,W) preprocessed; optional `point_coords`
        /// (B,N,2), `point_labels` (B,N), `boxes` (B,4), `mask_inputs` (B,1,4h,4w), `depth`.
        #[arg(long)]
        inputs: PathBuf,
        /// Output .safetensors: image_embeddings, low_res_masks, iou_predictions, masks.
        #[arg(long)]
        out: PathBuf,
        /// Three masks per prompt instead of one (default: the inputs' `multimask_output`
        /// metadata, else off).
        #[arg(long)]
        multimask: Option<bool>,
        /// Slices per volume (the batch is volumes x slices); default: a `depth` tensor or
        /// metadata in the inputs, else 2D.
        #[arg(long)]
        depth: Option<usize>,
        /// Depth-branch semantics for windowed blocks.
        #[arg(long, value_enum, default_value = "per-token")]
        depth_mode: DepthModeArg,
        /// Resized image size before padding, "h,w" (default: metadata, else the input size).
        #[arg(long)]
        input_size: Option<String>,
        /// Size of `masks`, "h,w" (default: metadata, else the input size).
        #[arg(long)]
        original_size: Option<String>,
        /// Device: cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage precision on CUDA: f32 or bf16 (the CPU computes in f32).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Segment images and volumes from prompts; masks on the input's own grid.
    ///
    /// Batch: `-i` a file, folder (PNG, JPEG, NIfTI) or JSON manifest, `-o` an output folder (same
    /// base names). Single image: `--image IMG --out MASK.png` (a 0/255 mask).
    Segment(Box<SegmentArgs>),
    /// Dice, IoU and HD95 of predicted masks against ground truth: two mask PNGs or NIfTI
    /// volumes, or two folders of them matched by file name. Non-zero voxels are foreground;
    /// HD95 is in mm for volumes (spacing from the ground truth's header). Writes a CSV (per
    /// case, then the means over cases with defined values) to --out or standard output.
    Eval {
        /// Predicted mask (PNG) or folder of masks.
        pred: PathBuf,
        /// Ground-truth mask (PNG) or folder of masks with the same file names.
        gt: PathBuf,
        /// Pixel spacing "sy,sx" (mm) for HD95 of PNG masks.
        #[arg(long, default_value = "1,1")]
        spacing: String,
        /// CSV output (written atomically); standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a backend against the CPU reference: every op on random inputs, then the whole
    /// model on the golden fixtures.
    Selftest {
        /// Device to check: cuda[:N] (cpu checks the reference against itself).
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Storage precisions to check (f32, bf16 or both).
        #[arg(long, default_value = "both")]
        precision: String,
        /// The golden fixtures folder.
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
    },
    /// Fine-tune a checkpoint on a dataset: adapters (added if the base has none), the decoder,
    /// everything, or name patterns. Writes OUT/last.safetensors (+ .state for --resume),
    /// OUT/best.safetensors (best validation Dice) and OUT/log.jsonl.
    Train(Box<TrainArgs>),
    /// Write a randomly initialised checkpoint of a custom (small) configuration, to train from
    /// scratch with `train --trainable all`.
    Init(InitArgs),
    /// Merge a base checkpoint and an adapter checkpoint into one standalone checkpoint.
    Merge {
        /// Base checkpoint (.safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Adapter checkpoint written by `train`.
        #[arg(long)]
        adapter: PathBuf,
        /// Output .safetensors (written atomically, f32).
        #[arg(long)]
        out: PathBuf,
        /// Accept an adapter trained on a different base file.
        #[arg(long)]
        allow_base_mismatch: bool,
    },
    /// Time the image encoder (or, with --train, a training step) of a random-weight model
    /// (median of repeats).
    Bench {
        /// vit_b, vit_l or vit_h.
        #[arg(long, default_value = "vit_b")]
        variant: String,
        /// Input size in pixels (square).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Images per batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed repeats.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Include Med-SA adapters.
        #[arg(long)]
        adapters: bool,
        /// Device: cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage precision on CUDA: f32 or bf16 (the CPU computes in f32).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Time full training steps instead of the encoder: forward, BCE loss (pos_weight 2) on
        /// the low-resolution masks, backward and AdamW on `adapters+decoder`, with encoder and
        /// decoder adapters (HyP-Adpt) added and one positive click per image.
        #[arg(long)]
        train: bool,
        /// With --train: recompute encoder activations in the backward pass instead of keeping
        /// them (less memory, more time).
        #[arg(long, requires = "train")]
        recompute: bool,
    },
}

/// Options of `train`.
#[derive(clap::Args)]
struct TrainArgs {
    /// Base checkpoint (.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Training data: a folder with images/ + masks/ (PNG/JPEG and PNG label maps) or
    /// images/ + labels/ (NIfTI volumes and label volumes), or a .json manifest.
    #[arg(long)]
    data: PathBuf,
    /// Validation data in the same form (default: --val-fraction of the training cases).
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Fraction of the cases held out for validation when --val-data is absent (by case).
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Output folder.
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// What is trained: adapters, adapters+decoder (the reference), all, or comma-separated
    /// name patterns with * (e.g. "image_encoder.blocks.*.Space_Adapter.*").
    #[arg(long, default_value = "adapters+decoder")]
    trainable: String,
    /// Adapters to add when the base has none: encoder, depth, decoder, combinations with +,
    /// all, or none.
    #[arg(long, default_value = "encoder")]
    add_adapters: String,
    /// Loss: bce (the 2D reference, pos_weight 2), dicece (the 3D reference) or both.
    #[arg(long)]
    loss: Option<String>,
    /// BCE positive weight.
    #[arg(long, default_value_t = 2.0)]
    pos_weight: f32,
    /// Weight of the IoU-head loss (0: IoU head untrained, as the reference).
    #[arg(long, default_value_t = 0.0)]
    iou_loss_weight: f32,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// AdamW decoupled weight decay (0 = the reference's Adam).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Warm-up steps, then cosine decay to 1% (default: constant rate).
    #[arg(long)]
    warmup: Option<u64>,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    clip: Option<f64>,
    /// Samples per micro-batch (a depth chunk counts as one sample).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// Optimiser steps.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Epochs over the training samples (converted to steps).
    #[arg(long)]
    epochs: Option<f64>,
    /// Validate every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    val_every: u64,
    /// Save OUT/last.safetensors every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Seed (data order, prompts, adapter initialisation).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model input size (default: the checkpoint's native size).
    #[arg(long)]
    size: Option<usize>,
    /// Preprocessing preset (medsa: stretch to square, [0, 1]; the reference's).
    #[arg(long, value_enum, default_value = "medsa")]
    preset: PresetArg,
    /// Train on this label id (default: any non-zero label).
    #[arg(long)]
    label_id: Option<u32>,
    /// Volume intensities (see segment --intensity).
    #[arg(long, default_value = "ct")]
    intensity: String,
    /// Volumes: train the depth branch on chunks of D consecutive slices (needs depth
    /// adapters: --add-adapters encoder+depth).
    #[arg(long)]
    depth: Option<usize>,
    /// Positive clicks per image.
    #[arg(long, default_value_t = 1)]
    pos_clicks: usize,
    /// Negative clicks per image.
    #[arg(long, default_value_t = 0)]
    neg_clicks: usize,
    /// Also prompt with the mask's bounding box, each side jittered by up to N pixels.
    #[arg(long)]
    box_jitter: Option<u32>,
    /// Random left-right flips of training samples (with their prompts and masks).
    #[arg(long)]
    flip: bool,
    /// Recompute encoder blocks in backward (less memory, ~1/3 more compute).
    #[arg(long)]
    recompute: bool,
    /// Continue from OUT/last.safetensors and its optimiser state.
    #[arg(long)]
    resume: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Device: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Storage precision on CUDA: f32 or bf16 (optimiser state and master weights stay f32).
    #[arg(long, default_value = "f32")]
    precision: String,
}

/// Options of `init`.
#[derive(clap::Args)]
struct InitArgs {
    /// Output .safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Native input size (pixels, square).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Patch size.
    #[arg(long, default_value_t = 8)]
    patch: usize,
    /// Encoder width.
    #[arg(long, default_value_t = 96)]
    embed: usize,
    /// Encoder blocks.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Encoder heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Window size of the windowed blocks (0: all global).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Global-attention blocks, comma-separated (default: every other block, the last
    /// included).
    #[arg(long)]
    global: Option<String>,
    /// Neck output / decoder width.
    #[arg(long, default_value_t = 128)]
    prompt_dim: usize,
    /// Decoder MLP width.
    #[arg(long, default_value_t = 512)]
    decoder_mlp: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Options of `segment`.
#[derive(clap::Args)]
struct SegmentArgs {
    /// Checkpoint (.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Adapter checkpoint from `train`, applied on top of --checkpoint.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Accept an adapter trained on a different base file.
    #[arg(long)]
    allow_base_mismatch: bool,
    /// Batch input: a PNG/JPEG/NIfTI file, a folder of them, or a .json manifest.
    #[arg(short = 'i', long = "input")]
    input: Option<PathBuf>,
    /// Batch output folder (masks keep the inputs' base names).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Single-image mode: a PNG or JPEG image.
    #[arg(long, conflicts_with = "input")]
    image: Option<PathBuf>,
    /// Single-image mode: the output mask PNG (0/255).
    #[arg(long, requires = "image")]
    out: Option<PathBuf>,
    /// A 2D point "x,y[,label]" (pixel column, row; label 1 foreground by default, 0
    /// background); repeat for more points. All prompts given here form one object.
    #[arg(long = "point")]
    points: Vec<String>,
    /// A 3D point "x,y,z[,label]" in voxel indices (i, j, k) of the volume's array order.
    #[arg(long = "voxel")]
    voxels: Vec<String>,
    /// A box "x0,y0,x1,y1" (2D) or "x0,y0,z0,x1,y1,z1" (3D: every slice z0..=z1).
    #[arg(long = "box")]
    bbox: Option<String>,
    /// Prompts from labels: a label file, or a folder with one label per input (same base
    /// name): the bounding box of --label-id (per slice for volumes).
    #[arg(long)]
    prompt_from_label: Option<PathBuf>,
    /// The label id used by --prompt-from-label and --labels (default for --labels: any
    /// non-zero).
    #[arg(long)]
    label_id: Option<u32>,
    /// With --prompt-from-label, also click at the structure's centre.
    #[arg(long)]
    click: bool,
    /// Ground truth (file or folder, same base names) for Dice, IoU and HD95 per case; the CSV
    /// goes to OUTPUT/metrics.csv.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Predict three masks per object and keep the best predicted IoU.
    #[arg(long)]
    multimask: bool,
    /// 2D preprocessing preset (default: the adapter's training preset, else sam).
    #[arg(long, value_enum)]
    preset: Option<PresetArg>,
    /// Preprocessing preset for volume slices (default: the adapter's, else medsa as the
    /// reference trains 3D).
    #[arg(long, value_enum)]
    volume_preset: Option<PresetArg>,
    /// Volume intensities: ct (= ct-abdomen, [-175, 250] HU as the reference), ct-soft,
    /// ct-lung, ct-bone, ct-brain, window:lo,hi, mr (0.5-99.5 percentiles), mr:plo,phi, none
    /// (default: the adapter's training intensities, else ct).
    #[arg(long)]
    intensity: Option<String>,
    /// Slices per encoder pass for volumes (the SD-Trans depth window); chunks do not overlap.
    #[arg(long, default_value_t = 8)]
    chunk: usize,
    /// Depth-branch semantics for windowed blocks.
    #[arg(long, value_enum, default_value = "per-token")]
    depth_mode: DepthModeArg,
    /// 2D images per encoder pass.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Leave cases whose output already exists (resume an interrupted run).
    #[arg(long)]
    skip_existing: bool,
    /// Split the cases into N parts (case i of the sorted list goes to part i % N) ...
    #[arg(long, default_value_t = 1)]
    num_parts: usize,
    /// ... and run part K (0-based), e.g. a Slurm array index.
    #[arg(long, default_value_t = 0)]
    part_id: usize,
    /// Also write probability maps (<name>_prob.png / _prob.nii.gz).
    #[arg(long)]
    probabilities: bool,
    /// For volumes, also write <name>_overview.png: prompted slices with the mask in red.
    #[arg(long)]
    overview: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Device: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Storage precision on CUDA: f32 or bf16 (the CPU computes in f32).
    #[arg(long, default_value = "f32")]
    precision: String,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The backend chosen on the command line.
#[allow(clippy::large_enum_variant)] // one value per process
enum Dev {
    Cpu(Cpu),
    #[cfg(feature = "cuda")]
    Cuda(medsa::backend::cuda::Cuda),
}

/// Runs a generic body on whichever backend `Dev` holds.
macro_rules! on_device {
    ($dev:expr, $be:ident => $body:expr) => {
        match $dev {
            Dev::Cpu($be) => $body,
            #[cfg(feature = "cuda")]
            Dev::Cuda($be) => $body,
        }
    };
}

impl Dev {
    fn peak_bytes(&self) -> Option<usize> {
        match self {
            Dev::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Dev::Cuda(c) => Some(c.pool().peak()),
        }
    }

    fn take_profile(&self) -> Vec<(String, u64, f64)> {
        match self {
            Dev::Cpu(_) => Vec::new(),
            #[cfg(feature = "cuda")]
            Dev::Cuda(c) => c.take_profile(),
        }
    }

    fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        if let Dev::Cuda(c) = self {
            c.pool().reset_peak();
        }
    }
}

fn open_device(device: &str, precision: &str) -> Result<Dev> {
    match device {
        "cpu" => {
            if precision != "f32" {
                bail!("--precision {precision}: the CPU backend computes in f32");
            }
            Ok(Dev::Cpu(Cpu::new()))
        }
        d if d == "cuda" || d.starts_with("cuda:") => {
            let ordinal: usize = match d.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow!("--device {d}: expected cuda or cuda:N"))?,
                None => 0,
            };
            #[cfg(feature = "cuda")]
            {
                let p: medsa::backend::cuda::Precision = precision.parse()?;
                Ok(Dev::Cuda(
                    medsa::backend::cuda::Cuda::new(ordinal, p)
                        .with_context(|| format!("--device {d}"))?,
                ))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = ordinal;
                bail!("--device {d}: this medsa-engine was built without the `cuda` feature; use --device cpu")
            }
        }
        d => bail!("--device {d}: expected cpu or cuda[:N]"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { checkpoint } => info(&checkpoint),
        Cmd::Convert {
            input,
            output,
            dtype,
        } => convert(&input, &output, dtype),
        Cmd::Forward {
            checkpoint,
            adapter,
            allow_base_mismatch,
            inputs,
            out,
            multimask,
            depth,
            depth_mode,
            input_size,
            original_size,
            device,
            precision,
        } => {
            let dev = open_device(&device, &precision)?;
            on_device!(&dev, be => forward(
                be,
                &ModelSource { checkpoint: checkpoint.clone(), adapter: adapter.clone(), allow_base_mismatch },
                &inputs,
                &out,
                multimask,
                depth,
                depth_mode,
                input_size,
                original_size,
            ))
        }
        Cmd::Segment(a) => {
            let dev = open_device(&a.device, &a.precision)?;
            on_device!(&dev, be => segment_cmd(be, &a))
        }
        Cmd::Eval {
            pred,
            gt,
            spacing,
            out,
        } => eval(&pred, &gt, &spacing, out.as_deref()),
        Cmd::Selftest {
            device,
            precision,
            fixtures,
        } => selftest(&device, &precision, &fixtures),
        Cmd::Train(a) => {
            let dev = open_device(&a.device, &a.precision)?;
            on_device!(&dev, be => train_cmd(be, &a))
        }
        Cmd::Init(a) => init_cmd(&a),
        Cmd::Merge {
            checkpoint,
            adapter,
            out,
            allow_base_mismatch,
        } => merge_cmd(&checkpoint, &adapter, &out, allow_base_mismatch),
        Cmd::Bench {
            variant,
            size,
            batch,
            repeats,
            warmup,
            adapters,
            device,
            precision,
            train,
            recompute,
        } => {
            let dev = open_device(&device, &precision)?;
            if train {
                on_device!(&dev, be => bench_train(be, &dev, &variant, size, batch, repeats, warmup, recompute))
            } else {
                on_device!(&dev, be => bench(be, &dev, &variant, size, batch, repeats, warmup, adapters))
            }
        }
    }
}

fn convert(input: &Path, output: &Path, dtype: DtypeArg) -> Result<()> {
    let t0 = Instant::now();
    let entries = medsa::pth::read_checkpoint(input)?;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    let mut by_dtype: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in entries {
        if !seen.insert(e.name.clone()) {
            bail!(
                "{}: two tensors are named `{}` after removing the `module.` prefix",
                input.display(),
                e.name
            );
        }
        match e.tensor {
            Some(t) => {
                *by_dtype.entry(e.dtype.name()).or_default() += 1;
                tensors.push((e.name, t));
            }
            None => println!(
                "note: skipping `{}` ({} {:?}): not a floating-point tensor",
                e.name, e.dtype, e.shape
            ),
        }
    }
    if tensors.is_empty() {
        bail!(
            "{}: the state dict has no floating-point tensors",
            input.display()
        );
    }
    let (st, name) = match dtype {
        DtypeArg::F32 => (safetensors::tensor::Dtype::F32, "F32"),
        DtypeArg::F16 => (safetensors::tensor::Dtype::F16, "F16"),
        DtypeArg::Bf16 => (safetensors::tensor::Dtype::BF16, "BF16"),
    };
    save_safetensors_as(output, &tensors, &HashMap::new(), st)?;
    let params: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    let read: Vec<String> = by_dtype.iter().map(|(d, n)| format!("{n} {d}")).collect();
    println!(
        "wrote {} ({} tensors, {} parameters, stored as {name}; read {}) in {:.2} s",
        output.display(),
        tensors.len(),
        params,
        read.join(", "),
        t0.elapsed().as_secs_f64()
    );
    let ws =
        WeightStore::from_tensors(&output.display().to_string(), tensors.into_iter().collect());
    match SamConfig::infer(&ws) {
        Ok(cfg) => println!(
            "SAM model: {} (embed {}, depth {}, image size {:?}{})",
            cfg.variant(),
            cfg.embed_dim,
            cfg.blocks.len(),
            cfg.img_size(),
            if cfg.adapter_dim.is_some() || cfg.has_decoder_adapters() {
                ", Med-SA adapters"
            } else {
                ""
            }
        ),
        Err(e) => println!("not loadable as a SAM model: {e}"),
    }
    Ok(())
}

fn info(path: &Path) -> Result<()> {
    let ws = WeightStore::open(path)?;
    let cfg = SamConfig::infer(&ws)?;
    let pc = ParamCounts::of(&ws)?;
    let (ih, iw) = cfg.img_size();
    println!("checkpoint      {}", path.display());
    println!(
        "encoder         {} (embed {}, depth {}, heads {}, head dim {}, mlp {})",
        cfg.variant(),
        cfg.embed_dim,
        cfg.depth(),
        cfg.heads,
        cfg.embed_dim / cfg.heads,
        cfg.mlp_dim
    );
    println!(
        "input           {ih}x{iw} px, patch {}, token grid {}x{}",
        cfg.patch, cfg.pos_grid.0, cfg.pos_grid.1
    );
    println!(
        "attention       window {}, global blocks {:?}",
        cfg.window(),
        cfg.global_blocks()
    );
    let count = |f: fn(&medsa::sam::config::BlockConfig) -> bool| {
        cfg.blocks.iter().filter(|b| f(b)).count()
    };
    println!(
        "adapters        space {} / mlp {} / depth {} of {} blocks (bottleneck {})",
        count(|b| b.space_adapter),
        count(|b| b.mlp_adapter),
        count(|b| b.depth_adapter),
        cfg.depth(),
        cfg.adapter_dim
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!("neck / prompt   {} channels", cfg.out_chans);
    let dl = &cfg.decoder_layers;
    println!(
        "decoder         {} layers, {} heads, mlp {}, {} mask tokens; adapters hyper {} / mlp {} / cross {}",
        dl.len(),
        cfg.decoder_heads,
        cfg.decoder_mlp_dim,
        cfg.num_mask_tokens,
        dl.iter().filter(|l| l.hyper).count(),
        dl.iter().filter(|l| l.mlp).count(),
        dl.iter().filter(|l| l.cross).count()
    );
    let m = |n: usize| format!("{:>12} ({:.2} M)", n, n as f64 / 1e6);
    println!("parameters");
    println!("  total           {}", m(pc.total));
    println!("  image encoder   {}", m(pc.image_encoder));
    println!("  prompt encoder  {}", m(pc.prompt_encoder));
    println!("  mask decoder    {}", m(pc.mask_decoder));
    println!("  adapters        {}", m(pc.encoder_adapters));
    println!("  decoder adapters{}", m(pc.decoder_adapters));
    let frac = |n: usize| 100.0 * n as f64 / pc.total.max(1) as f64;
    println!(
        "  trainable       {:.2}% (adapters) / {:.2}% (adapters + decoder)",
        frac(pc.encoder_adapters + pc.decoder_adapters),
        frac(pc.encoder_adapters + pc.mask_decoder)
    );
    Ok(())
}

fn parse_pair(s: &str, what: &str) -> Result<(usize, usize)> {
    let v: Vec<&str> = s.split(',').collect();
    if v.len() != 2 {
        bail!("{what} \"{s}\": expected \"h,w\"");
    }
    let p = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("{what} \"{s}\": expected \"h,w\" with whole numbers"))
    };
    Ok((p(v[0])?, p(v[1])?))
}

#[allow(clippy::too_many_arguments)]
fn forward<B: Backend>(
    be: &B,
    src: &ModelSource,
    inputs: &Path,
    out: &Path,
    multimask: Option<bool>,
    depth: Option<usize>,
    depth_mode: DepthModeArg,
    input_size: Option<String>,
    original_size: Option<String>,
) -> Result<()> {
    let model = src.load(be)?;
    let f = SafetensorsFile::open(inputs)?;
    let meta = f.metadata().clone();
    let get = |k: &str| -> Result<Option<Tensor>> {
        if f.contains(k) {
            Ok(Some(f.tensor(k)?))
        } else {
            Ok(None)
        }
    };
    let images = get("images")?.ok_or_else(|| {
        anyhow!(
            "{}: missing tensor `images` (expected [B, 3, H, W])",
            inputs.display()
        )
    })?;
    let s = images.shape().to_vec();
    if s.len() != 4 || s[1] != 3 {
        bail!(
            "{}: tensor `images` has shape {s:?}, expected [B, 3, H, W]",
            inputs.display()
        );
    }
    let known = [
        "images",
        "point_coords",
        "point_labels",
        "boxes",
        "mask_inputs",
        "depth",
    ];
    let prompts = Prompts::read(&f)?;
    let unknown: Vec<&str> = f
        .keys()
        .filter(|k| !known.contains(k) && !k.contains('.') && !is_output(k))
        .collect();
    if !unknown.is_empty() {
        eprintln!("note: {}: ignoring tensors {unknown:?}", inputs.display());
    }
    let multimask = multimask.unwrap_or(
        meta.get("multimask_output")
            .map(|v| v == "true")
            .unwrap_or(false),
    );
    let d = match depth {
        Some(d) => d,
        None => match get("depth")? {
            Some(t) => t.data().first().copied().unwrap_or(0.0) as usize,
            None => meta.get("depth").and_then(|v| v.parse().ok()).unwrap_or(0),
        },
    };
    let depth = (d > 0).then_some(DepthSpec {
        d,
        mode: match depth_mode {
            DepthModeArg::PerToken => DepthMode::PerToken,
            DepthModeArg::Compat => DepthMode::Compat,
        },
    });
    let hw = (s[2], s[3]);
    let pick = |arg: Option<String>, key: &str| -> Result<(usize, usize)> {
        match arg.or_else(|| meta.get(key).cloned()) {
            Some(v) => parse_pair(&v, key),
            None => Ok(hw),
        }
    };
    let input_size = pick(input_size, "input_size")?;
    let original_size = pick(original_size, "original_size")?;
    let t0 = Instant::now();
    let o = model.forward(
        be,
        &images,
        &prompts,
        MaskOutput::from_multimask(multimask),
        depth,
        &mut Trace::off(),
    )?;
    let low = be.upload(&o.low_res_masks)?;
    let masks = be.download(&postprocess_masks(be, &low, hw, input_size, original_size)?)?;
    let mut md = HashMap::new();
    md.insert("multimask_output".to_string(), multimask.to_string());
    md.insert("depth".to_string(), d.to_string());
    md.insert(
        "input_size".to_string(),
        format!("{},{}", input_size.0, input_size.1),
    );
    md.insert(
        "original_size".to_string(),
        format!("{},{}", original_size.0, original_size.1),
    );
    save_safetensors(
        out,
        &[
            ("image_embeddings".into(), o.image_embeddings),
            ("low_res_masks".into(), o.low_res_masks),
            ("iou_predictions".into(), o.iou_predictions),
            ("masks".into(), masks),
        ],
        &md,
    )?;
    eprintln!(
        "wrote {} ({} images, {:.2} s on {})",
        out.display(),
        s[0],
        t0.elapsed().as_secs_f64(),
        be.name()
    );
    Ok(())
}

fn selftest(device: &str, precision: &str, fixtures: &Path) -> Result<()> {
    let precisions: Vec<&str> = match precision {
        "both" => vec!["f32", "bf16"],
        p => vec![p],
    };
    let mut failed = 0;
    for p in precisions {
        if device == "cpu" && p != "f32" {
            continue;
        }
        let dev = open_device(device, p)?;
        let (op_tol, model_tol) = if p == "bf16" {
            (selftest::Tolerance::BF16, selftest::Tolerance::BF16_MODEL)
        } else {
            (selftest::Tolerance::F32, selftest::Tolerance::F32)
        };
        on_device!(&dev, be => {
            println!("== {} ({p})", be.name());
            let mut checks = selftest::ops(be, op_tol);
            checks.extend(selftest::model(be, fixtures, model_tol));
            failed += selftest::report(&checks);
        });
    }
    if failed > 0 {
        bail!("{failed} checks failed");
    }
    Ok(())
}

fn load_mask(path: &Path) -> Result<(Vec<bool>, [usize; 2])> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}", path.display()))?
        .decode()
        .map_err(|e| anyhow!("{}: cannot decode mask: {e}", path.display()))?
        .to_luma16();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((img.into_raw().into_iter().map(|v| v > 0).collect(), [h, w]))
}

fn eval(pred: &Path, gt: &Path, spacing: &str, out: Option<&Path>) -> Result<()> {
    let sp: Vec<f64> = spacing
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow!("--spacing \"{spacing}\": expected \"sy,sx\""))?;
    if sp.len() != 2 {
        bail!("--spacing \"{spacing}\": expected two numbers \"sy,sx\"");
    }
    let pairs: Vec<(String, PathBuf, PathBuf)> = if pred.is_dir() {
        if !gt.is_dir() {
            bail!("{} is a folder but {} is not", pred.display(), gt.display());
        }
        let mut names: Vec<String> = std::fs::read_dir(pred)
            .with_context(|| format!("{}", pred.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                let l = n.to_ascii_lowercase();
                l.ends_with(".png") || l.ends_with(".nii") || l.ends_with(".nii.gz")
            })
            .filter(|n| !n.contains("_prob.") && !n.contains("_overview."))
            .collect();
        names.sort();
        if names.is_empty() {
            bail!("{}: no .png or NIfTI masks", pred.display());
        }
        names
            .into_iter()
            .map(|n| (n.clone(), pred.join(&n), gt.join(&n)))
            .collect()
    } else {
        let name = pred
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![(name, pred.to_path_buf(), gt.to_path_buf())]
    };
    let mut rows: Vec<(String, medsa::metrics::Scores)> = Vec::new();
    let mut failed = Vec::new();
    for (name, p, g) in &pairs {
        let r = (|| -> Result<medsa::metrics::Scores> {
            if batch::is_nifti(p) {
                // Volumes: spacing (mm) from the ground truth's header, shape (k, j, i).
                let pv = medsa::data::nifti::read_nifti(p)?;
                let gv = medsa::data::nifti::read_nifti(g)?;
                if pv.dims != gv.dims {
                    bail!(
                        "{}: dims {:?}, but the ground truth {} has {:?}",
                        p.display(),
                        pv.dims,
                        g.display(),
                        gv.dims
                    );
                }
                let [nx, ny, nz] = gv.dims;
                let s = gv.header.spacing();
                let pm: Vec<bool> = pv.data.iter().map(|&v| v > 0.5).collect();
                let gm: Vec<bool> = gv.data.iter().map(|&v| v > 0.5).collect();
                return Ok(medsa::metrics::scores(
                    &pm,
                    &gm,
                    &[nz, ny, nx],
                    &[s[2], s[1], s[0]],
                )?);
            }
            let (pm, ps) = load_mask(p)?;
            let (gm, gs) = load_mask(g)?;
            if ps != gs {
                bail!(
                    "{}: {}x{} pixels, but the ground truth {} has {}x{}",
                    p.display(),
                    ps[1],
                    ps[0],
                    g.display(),
                    gs[1],
                    gs[0]
                );
            }
            Ok(medsa::metrics::scores(&pm, &gm, &ps, &sp)?)
        })();
        match r {
            Ok(s) => rows.push((name.clone(), s)),
            Err(e) => failed.push(format!("{name}: {e:#}")),
        }
    }
    let csv = medsa::metrics::csv(&rows);
    match out {
        Some(o) => medsa::weights::write_atomic(o, csv.as_bytes())?,
        None => print!("{csv}"),
    }
    for f in &failed {
        eprintln!("failed: {f}");
    }
    if !failed.is_empty() {
        bail!("{} of {} cases failed", failed.len(), pairs.len());
    }
    Ok(())
}

fn is_output(k: &str) -> bool {
    matches!(
        k,
        "image_embeddings"
            | "low_res_masks"
            | "iou_predictions"
            | "masks"
            | "sparse_embeddings"
            | "dense_embeddings"
            | "dense_pe"
    )
}

fn parse_floats(s: &str, what: &str, n: &[usize]) -> Result<Vec<f32>> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow!("{what} \"{s}\": not a list of numbers"))?;
    if !n.contains(&v.len()) || v.iter().any(|x| !x.is_finite()) {
        bail!(
            "{what} \"{s}\": expected {} finite numbers",
            n.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        );
    }
    Ok(v)
}

fn preset_of(p: PresetArg) -> Preset {
    match p {
        PresetArg::Sam => Preset::Sam,
        PresetArg::Medsa => Preset::Medsa,
    }
}

fn segment_cmd<B: Backend>(be: &B, a: &SegmentArgs) -> Result<()> {
    // An adapter records how its training data was preprocessed; that is the default here.
    let meta = match &a.adapter {
        Some(p) => Some(medsa::train::checkpoint::load_adapter(p)?.1),
        None => None,
    };
    if let Some(image) = &a.image {
        let out = a
            .out
            .as_ref()
            .ok_or_else(|| anyhow!("--image needs --out MASK.png"))?;
        if !a.voxels.is_empty() || a.prompt_from_label.is_some() || a.labels.is_some() {
            bail!("--voxel, --prompt-from-label and --labels are for batch mode (-i/-o)");
        }
        return segment(
            be,
            &ModelSource::of(a),
            image,
            &a.points,
            a.bbox.as_deref(),
            out,
            a.multimask,
            a.preset.unwrap_or(
                meta.as_ref()
                    .map_or(PresetArg::Sam, |m| preset_arg(m.preset)),
            ),
        );
    }
    let input = a.input.as_ref().ok_or_else(|| {
        anyhow!("give -i INPUT -o OUTPUT_DIR (batch) or --image IMG --out MASK.png")
    })?;
    let out_dir = a
        .output
        .as_ref()
        .ok_or_else(|| anyhow!("-i needs -o OUTPUT_DIR"))?;
    let mut object = batch::Object::default();
    for p in &a.points {
        let v = parse_floats(p, "--point", &[2, 3])?;
        object
            .points
            .push([v[0], v[1], 0.0, v.get(2).copied().unwrap_or(1.0)]);
    }
    for p in &a.voxels {
        let v = parse_floats(p, "--voxel", &[3, 4])?;
        object
            .points
            .push([v[0], v[1], v[2], v.get(3).copied().unwrap_or(1.0)]);
    }
    if let Some(b) = &a.bbox {
        let v = parse_floats(b, "--box", &[4, 6])?;
        object.bbox = Some(if v.len() == 4 {
            [v[0], v[1], 0.0, v[2], v[3], 0.0]
        } else {
            [v[0], v[1], v[2], v[3], v[4], v[5]]
        });
    }
    if a.prompt_from_label.is_some() && a.label_id.is_none() {
        bail!("--prompt-from-label needs --label-id N");
    }
    let opts = batch::JobOptions {
        preset: preset_of(
            a.preset.unwrap_or(
                meta.as_ref()
                    .map_or(PresetArg::Sam, |m| preset_arg(m.preset)),
            ),
        ),
        volume_preset: preset_of(
            a.volume_preset.unwrap_or(
                meta.as_ref()
                    .map_or(PresetArg::Medsa, |m| preset_arg(m.preset)),
            ),
        ),
        intensity: match (&a.intensity, meta.as_ref().and_then(|m| m.intensity)) {
            (Some(i), _) => batch::Intensity::parse(i)?,
            (None, Some(i)) => i,
            (None, None) => batch::Intensity::parse("ct")?,
        },
        chunk: a.chunk,
        depth_mode: match a.depth_mode {
            DepthModeArg::PerToken => DepthMode::PerToken,
            DepthModeArg::Compat => DepthMode::Compat,
        },
        batch_size: a.batch_size,
        skip_existing: a.skip_existing,
        multimask: a.multimask,
        probabilities: a.probabilities,
        overview: a.overview,
        global_objects: if object == batch::Object::default() {
            vec![]
        } else {
            vec![object]
        },
        global_from_label: a
            .prompt_from_label
            .clone()
            .map(|p| (p, a.label_id.unwrap_or(1), a.click)),
        labels: a.labels.clone(),
        label_id: a.label_id,
        quiet: a.quiet,
    };
    let cases = batch::shard(batch::discover(input, out_dir)?, a.num_parts, a.part_id)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}", out_dir.display()))?;
    let model = ModelSource::of(a).load(be)?;
    let job = batch::Job::new(be, &model, opts)?;
    let n = cases.len();
    let summary = job.run(cases);
    let skipped = summary
        .cases
        .iter()
        .filter(|(_, o)| matches!(o, batch::Outcome::Skipped))
        .count();
    let failed = summary.failed();
    eprintln!(
        "segment: {} of {n} cases done, {skipped} skipped, {failed} failed in {:.1} s ({:.2} images/s on {})",
        n - skipped - failed,
        summary.seconds,
        summary.images_per_s(),
        be.name()
    );
    for (name, o) in &summary.cases {
        if let batch::Outcome::Failed(why) = o {
            eprintln!("  failed: {name}: {why}");
        }
    }
    if let Some(csv) = summary.metrics_csv() {
        let path = out_dir.join("metrics.csv");
        medsa::weights::write_atomic(&path, csv.as_bytes())?;
        let mean = csv.lines().last().unwrap_or_default();
        eprintln!("metrics: {} ({mean})", path.display());
    }
    if failed > 0 {
        bail!("{failed} of {n} cases failed");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn segment<B: Backend>(
    be: &B,
    src: &ModelSource,
    image: &Path,
    points: &[String],
    bbox: Option<&str>,
    out: &Path,
    multimask: bool,
    preset: PresetArg,
) -> Result<()> {
    if points.is_empty() && bbox.is_none() {
        bail!("give at least one --point x,y[,label] or a --box x0,y0,x1,y1");
    }
    let model = src.load(be)?;
    let (sh, sw) = model.config.img_size();
    if sh != sw {
        bail!(
            "{}: non-square native input {sh}x{sw} is not supported by segment",
            src.checkpoint.display()
        );
    }
    let img = pipeline::load_image(image)?;
    let preset = match preset {
        PresetArg::Sam => Preset::Sam,
        PresetArg::Medsa => Preset::Medsa,
    };
    let prep = pipeline::prepare(&img, sh, preset)?;
    let (oh, ow) = prep.original_size;
    let inside = |x: f32, y: f32, what: &str| -> Result<()> {
        if x < 0.0 || y < 0.0 || x > ow as f32 || y > oh as f32 {
            bail!(
                "{what} ({x}, {y}) lies outside the {ow}x{oh} image {}",
                image.display()
            );
        }
        Ok(())
    };
    let mut prompts = Prompts::default();
    if !points.is_empty() {
        let mut coords = Vec::new();
        let mut labels = Vec::new();
        for p in points {
            let v = parse_floats(p, "--point", &[2, 3])?;
            inside(v[0], v[1], "--point")?;
            let label = v.get(2).copied().unwrap_or(1.0);
            if label != 0.0 && label != 1.0 {
                bail!("--point \"{p}\": label must be 1 (foreground) or 0 (background)");
            }
            let (x, y) = prep.map_xy(v[0], v[1]);
            coords.extend([x, y]);
            labels.push(label);
        }
        let n = labels.len();
        prompts.point_coords = Some(Tensor::from_vec(coords, &[1, n, 2])?);
        prompts.point_labels = Some(Tensor::from_vec(labels, &[1, n])?);
    }
    if let Some(b) = bbox {
        let v = parse_floats(b, "--box", &[4])?;
        inside(v[0], v[1], "--box corner")?;
        inside(v[2], v[3], "--box corner")?;
        if v[2] < v[0] || v[3] < v[1] {
            bail!("--box \"{b}\": expected x0 <= x1 and y0 <= y1");
        }
        let (x0, y0) = prep.map_xy(v[0], v[1]);
        let (x1, y1) = prep.map_xy(v[2], v[3]);
        prompts.boxes = Some(Tensor::from_vec(vec![x0, y0, x1, y1], &[1, 4])?);
    }
    let t0 = Instant::now();
    let o = model.forward(
        be,
        &prep.tensor,
        &prompts,
        MaskOutput::from_multimask(multimask),
        None,
        &mut Trace::off(),
    )?;
    let low = be.upload(&o.low_res_masks)?;
    let masks = be.download(&postprocess_masks(
        be,
        &low,
        (sh, sw),
        prep.input_size,
        prep.original_size,
    )?)?;
    let iou = o.iou_predictions.data();
    let best = (0..iou.len())
        .max_by(|&a, &b| iou[a].total_cmp(&iou[b]))
        .unwrap_or(0);
    let plane = &masks.data()[best * oh * ow..(best + 1) * oh * ow];
    pipeline::write_mask_png(out, plane, oh, ow)?;
    let fg = plane.iter().filter(|v| **v > 0.0).count();
    println!(
        "wrote {} ({ow}x{oh}, mask {best} of {}, predicted IoU {:.3}, {:.1}% foreground, {:.2} s on {})",
        out.display(),
        iou.len(),
        iou[best],
        100.0 * fg as f64 / plane.len() as f64,
        t0.elapsed().as_secs_f64(),
        be.name()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench<B: Backend>(
    be: &B,
    dev: &Dev,
    variant: &str,
    size: usize,
    batch: usize,
    repeats: usize,
    warmup: usize,
    adapters: bool,
) -> Result<()> {
    let cfg = SamConfig::published(variant, adapters, false)
        .ok_or_else(|| anyhow!("--variant {variant}: expected vit_b, vit_l or vit_h"))?;
    if size == 0 || !size.is_multiple_of(cfg.patch) {
        bail!(
            "--size {size}: expected a positive multiple of {}",
            cfg.patch
        );
    }
    let mut ws = WeightStore::from_tensors("random", random_checkpoint(&cfg, 0));
    let model = Sam::from_store(be, &mut ws).context("building the random model")?;
    let mut rng = Rng::new(1);
    let x = be.upload(&rng.tensor(&[batch, 3, size, size], 2.0))?;
    for _ in 0..warmup {
        let _y = model.encode(be, &x, None, &mut Trace::off())?;
        be.synchronize()?;
    }
    dev.reset_peak();
    dev.take_profile();
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        // Embeddings stay on the device, as in the PyTorch baseline: time the work, not the copy.
        let _y = model.encode(be, &x, None, &mut Trace::off())?;
        be.synchronize()?;
        runs.push(t.elapsed().as_secs_f64());
    }
    print_profile(&dev.take_profile(), repeats, "run");
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let peak = dev
        .peak_bytes()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "null".into());
    println!(
        "{{\"impl\":\"medsa\",\"device\":\"{}\",\"variant\":\"{variant}\",\"adapters\":{adapters},\"fused\":{},\"size\":{size},\"batch\":{batch},\"peak_bytes\":{peak},\"median_s\":{median:.4},\"min_s\":{:.4},\"images_per_s\":{:.4},\"runs\":{:?}}}",
        be.name(),
        be.fused(),
        sorted[0],
        batch as f64 / median,
        runs.iter().map(|r| (r * 1e4).round() / 1e4).collect::<Vec<_>>()
    );
    Ok(())
}

/// Prints a `MEDSA_PROFILE=1` table (kernel, calls, seconds over `repeats` runs) per `unit`,
/// largest first; nothing when profiling is off.
fn print_profile(prof: &[(String, u64, f64)], repeats: usize, unit: &str) {
    if prof.is_empty() {
        return;
    }
    let total: f64 = prof
        .iter()
        .filter(|p| !p.0.starts_with("detail:"))
        .map(|p| p.2)
        .sum();
    let n = repeats.max(1) as f64;
    eprintln!("profile (MEDSA_PROFILE=1, synchronised per op), per {unit}:");
    for (name, calls, t) in prof.iter().take(40) {
        eprintln!(
            "  {:>8.3} ms {:>5.1}% {:>6} calls  {name}",
            t * 1e3 / n,
            100.0 * t / total,
            *calls as f64 / n
        );
    }
}

/// Peak resident set size of this process (VmHWM of /proc/self/status), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// `bench --train`: full training steps (forward, loss, backward, optimiser) of a random-weight
/// model with encoder and decoder adapters, `adapters+decoder` trained, as `train` runs them.
#[allow(clippy::too_many_arguments)]
fn bench_train<B: Backend>(
    be: &B,
    dev: &Dev,
    variant: &str,
    size: usize,
    batch: usize,
    repeats: usize,
    warmup: usize,
    recompute: bool,
) -> Result<()> {
    use medsa::nn::{Grads, Param, Trainable};
    use medsa::train::checkpoint::{init_adapters, AdapterChoice};
    use medsa::train::optim::{AdamWConfig, Schedule};
    use medsa::train::step::{forward_backward, Batch, LossConfig, Optimizer};
    use std::sync::Arc;

    let mut cfg = SamConfig::published(variant, true, false)
        .ok_or_else(|| anyhow!("--variant {variant}: expected vit_b, vit_l or vit_h"))?;
    if size == 0 || !size.is_multiple_of(cfg.patch) || batch == 0 {
        bail!(
            "--size {size} --batch {batch}: expected a positive multiple of {} and a positive batch",
            cfg.patch
        );
    }
    // A model native to the benchmark size (position tables of that grid, as the PyTorch
    // reference builds it with img_size = size); at 1024 this is the published model.
    let window = cfg.blocks.iter().map(|b| b.window).max().unwrap_or(0);
    if size / cfg.patch < window {
        bail!(
            "--size {size}: --train needs a token grid of at least the window ({window}), i.e. \
             --size >= {}",
            window * cfg.patch
        );
    }
    cfg.pos_grid = (size / cfg.patch, size / cfg.patch);
    let mut tensors = random_checkpoint(&cfg, 0);
    init_adapters(
        &mut tensors,
        &cfg,
        AdapterChoice {
            encoder: false,
            depth: false,
            decoder: true,
        },
        0,
    )?;
    let mut ws = WeightStore::from_tensors("random", tensors);
    let mut model = Sam::from_store(be, &mut ws).context("building the random model")?;
    let trainable = Arc::new(Trainable::parse("adapters+decoder")?);
    let (mut n_tensors, mut n_params) = (0usize, 0usize);
    for (name, p) in model.params() {
        if trainable.contains(&name) {
            n_tensors += 1;
            n_params += match &p {
                Param::Dev(t) => be.dims(t).iter().product::<usize>(),
                Param::Host(t) => t.numel(),
            };
        }
    }

    // One random batch, reused every step: images, one positive click per image, 0/1 targets on
    // the low-resolution mask grid.
    let mut rng = Rng::new(1);
    let grid = 4 * (size / cfg.patch);
    let clicks: Vec<f32> = (0..2 * batch)
        .map(|_| (rng.uniform() * size as f32).floor() + 0.5)
        .collect();
    let target: Vec<f32> = (0..batch * grid * grid)
        .map(|_| if rng.uniform() < 0.5 { 1.0 } else { 0.0 })
        .collect();
    let data = Batch {
        images: rng.tensor(&[batch, 3, size, size], 2.0),
        prompts: Prompts {
            point_coords: Some(Tensor::from_vec(clicks, &[batch, 1, 2])?),
            point_labels: Some(Tensor::from_vec(vec![1.0; batch], &[batch, 1])?),
            ..Default::default()
        },
        target: Tensor::from_vec(target, &[batch, 1, grid, grid])?,
        depth: None,
    };
    let loss = LossConfig::default();
    let mut grads = Grads::new(trainable);
    let mut opt = Optimizer::new(AdamWConfig::default(), Schedule::Constant, None);
    eprintln!(
        "bench --train: {variant} {size}x{size}, batch {batch}, {n_tensors} trained tensors \
         ({n_params} parameters, adapters+decoder), recompute {recompute}, on {}",
        be.name()
    );

    // step = forward + loss + backward (timed as `fb`), then the optimiser (`opt`)
    let mut step = |model: &mut Sam<B>| -> Result<(f64, f64, f64)> {
        let t = Instant::now();
        let (parts, _) = forward_backward(
            be,
            model,
            &data,
            MaskOutput::Single,
            &loss,
            &mut grads,
            1.0,
            recompute,
        )?;
        be.synchronize()?;
        let fb = t.elapsed().as_secs_f64();
        opt.step(be, model, &mut grads)?;
        be.synchronize()?;
        Ok((fb, t.elapsed().as_secs_f64() - fb, parts.total))
    };
    for _ in 0..warmup {
        step(&mut model)?;
    }
    dev.reset_peak();
    dev.take_profile();
    let (mut runs, mut fbs, mut opts, mut losses) = (vec![], vec![], vec![], vec![]);
    for _ in 0..repeats.max(1) {
        let (fb, o, l) = step(&mut model)?;
        runs.push(fb + o);
        fbs.push(fb);
        opts.push(o);
        losses.push(l);
    }
    print_profile(&dev.take_profile(), repeats, "step");
    if let Some(l) = losses.iter().find(|l| !l.is_finite()) {
        bail!("bench --train: non-finite loss {l}");
    }
    let med = median(&runs);
    let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let rss = peak_rss_bytes();
    // the device's peak: the CUDA pool's, else (CPU) the process's peak RSS
    let (peak, peak_kind) = match dev.peak_bytes() {
        Some(p) => (Some(p as u64), "cuda_pool"),
        None => (rss, "rss"),
    };
    let opt_json = |v: Option<u64>| v.map_or_else(|| "null".to_string(), |x| x.to_string());
    eprintln!(
        "step median {:.1} ms (forward+loss+backward {:.1} ms, optimiser {:.1} ms), {:.3} images/s, \
         peak {} MiB ({peak_kind}), loss {:.4} -> {:.4}",
        med * 1e3,
        median(&fbs) * 1e3,
        median(&opts) * 1e3,
        batch as f64 / med,
        peak.map_or_else(|| "?".into(), |p| format!("{:.0}", p as f64 / 1048576.0)),
        losses[0],
        losses[losses.len() - 1]
    );
    let r4 = |v: &[f64]| {
        v.iter()
            .map(|r| (r * 1e4).round() / 1e4)
            .collect::<Vec<_>>()
    };
    println!(
        "{{\"impl\":\"medsa\",\"mode\":\"train\",\"device\":\"{}\",\"variant\":\"{variant}\",\"size\":{size},\"batch\":{batch},\"trainable\":\"adapters+decoder\",\"trained_params\":{n_params},\"recompute\":{recompute},\"warmup\":{warmup},\"median_s\":{med:.4},\"min_s\":{min:.4},\"median_ms\":{:.2},\"images_per_s\":{:.4},\"fb_median_s\":{:.4},\"opt_median_s\":{:.4},\"peak_bytes\":{},\"peak_kind\":\"{peak_kind}\",\"peak_rss_bytes\":{},\"loss_first\":{:.6},\"loss_last\":{:.6},\"runs\":{:?}}}",
        be.name(),
        med * 1e3,
        batch as f64 / med,
        median(&fbs),
        median(&opts),
        opt_json(peak),
        opt_json(rss),
        losses[0],
        losses[losses.len() - 1],
        r4(&runs)
    );
    Ok(())
}

fn preset_arg(p: Preset) -> PresetArg {
    match p {
        Preset::Sam => PresetArg::Sam,
        Preset::Medsa => PresetArg::Medsa,
    }
}

/// A checkpoint, optionally with an adapter checkpoint on top.
struct ModelSource {
    checkpoint: PathBuf,
    adapter: Option<PathBuf>,
    allow_base_mismatch: bool,
}

impl ModelSource {
    fn of(a: &SegmentArgs) -> Self {
        ModelSource {
            checkpoint: a.checkpoint.clone(),
            adapter: a.adapter.clone(),
            allow_base_mismatch: a.allow_base_mismatch,
        }
    }

    fn load<B: Backend>(&self, be: &B) -> Result<Sam<B>> {
        match &self.adapter {
            None => Ok(Sam::load(be, &self.checkpoint)?),
            Some(a) => {
                let (mut ws, meta) = medsa::train::checkpoint::apply_adapter(
                    &self.checkpoint,
                    a,
                    self.allow_base_mismatch,
                )?;
                eprintln!(
                    "adapter {}: trained as {} for {} steps (preset {}, size {})",
                    a.display(),
                    meta.trainable,
                    meta.step,
                    medsa::train::checkpoint::preset_name(meta.preset),
                    meta.model_size
                );
                Ok(Sam::from_store(be, &mut ws)?)
            }
        }
    }
}

fn train_cmd<B: Backend>(be: &B, a: &TrainArgs) -> Result<()> {
    use medsa::train::checkpoint::AdapterChoice;
    use medsa::train::step::{LossConfig, LossKind};
    use medsa::train::trainer::{train, TrainConfig};
    let add_adapters = if a.add_adapters == "none" {
        AdapterChoice::default()
    } else {
        AdapterChoice::parse(&a.add_adapters)?
    };
    let (kind, cases) = medsa::train::data::discover(&a.data)?;
    let loss_kind: LossKind = match &a.loss {
        Some(l) => l.parse()?,
        None if kind == medsa::train::data::DataKind::Volumes => LossKind::DiceCe,
        None => LossKind::Bce,
    };
    let steps = match (a.steps, a.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            // Samples per epoch: 2D cases, or every slice with foreground is one sample.
            let n = cases.len() as f64
                * (1.0
                    - if a.val_data.is_some() {
                        0.0
                    } else {
                        a.val_fraction
                    });
            ((e * n) / (a.batch_size * a.accumulate) as f64)
                .ceil()
                .max(1.0) as u64
        }
        (None, None) => bail!("give --steps N or --epochs E"),
    };
    let cfg = TrainConfig {
        base: a.checkpoint.clone(),
        data: a.data.clone(),
        val_data: a.val_data.clone(),
        val_fraction: if a.val_data.is_some() {
            0.0
        } else {
            a.val_fraction
        },
        out: a.out.clone(),
        trainable: a.trainable.clone(),
        add_adapters,
        loss: LossConfig {
            kind: loss_kind,
            pos_weight: a.pos_weight,
            iou_weight: a.iou_loss_weight,
        },
        adamw: medsa::train::optim::AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        warmup_cosine: a.warmup,
        clip: a.clip,
        batch: a.batch_size,
        accumulate: a.accumulate,
        steps,
        val_every: a.val_every,
        save_every: a.save_every,
        seed: a.seed,
        data_opts: medsa::train::data::DataOptions {
            size: a.size.unwrap_or(0),
            preset: preset_of(a.preset),
            label_id: a.label_id,
            intensity: batch::Intensity::parse(&a.intensity)?,
            depth: a.depth,
        },
        prompts: (a.pos_clicks, a.neg_clicks, a.box_jitter),
        depth_mode: DepthMode::PerToken,
        flip: a.flip,
        recompute: a.recompute,
        resume: a.resume,
        quiet: a.quiet,
    };
    let r = train(be, &cfg)?;
    eprintln!(
        "train: steps {}..{} on {}: {} tensors ({} values) trained as {}; {:.2} images/s",
        r.start_step,
        r.steps,
        be.name(),
        r.trained.0,
        r.trained.1,
        cfg.trainable,
        r.images_per_s
    );
    eprintln!(
        "train: loss {:.4} (first 10% of steps) -> {:.4} (last 10%)",
        r.train_loss.0, r.train_loss.1
    );
    if let (Some(i), Some(f)) = (r.initial_val, r.final_val) {
        eprintln!(
            "train: validation loss {:.4} -> {:.4}, Dice {:.4} -> {:.4}, IoU {:.4} -> {:.4} ({} images)",
            i.loss, f.loss, i.dice, f.dice, i.iou, f.iou, f.images
        );
    }
    if let Some((d, s)) = r.best {
        eprintln!(
            "train: best validation Dice {d:.4} at step {s}: {}",
            cfg.out.join("best.safetensors").display()
        );
    }
    Ok(())
}

fn init_cmd(a: &InitArgs) -> Result<()> {
    use medsa::sam::config::{BlockConfig, DecoderLayerConfig};
    if a.patch == 0
        || !a.size.is_multiple_of(a.patch)
        || a.heads == 0
        || !a.embed.is_multiple_of(a.heads)
    {
        bail!("--size must be a multiple of --patch and --embed a multiple of --heads");
    }
    if !a.prompt_dim.is_multiple_of(16) {
        bail!("--prompt-dim must be a multiple of 16 (8 decoder heads, downsample 2)");
    }
    let global: Vec<usize> = match &a.global {
        Some(g) => g
            .split(',')
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| anyhow!("--global {g}: expected block indices"))
            })
            .collect::<Result<_>>()?,
        None => (0..a.depth)
            .filter(|i| i % 2 == 1 || *i + 1 == a.depth)
            .collect(),
    };
    let grid = a.size / a.patch;
    let cfg = SamConfig {
        patch: a.patch,
        embed_dim: a.embed,
        heads: a.heads,
        mlp_dim: 4 * a.embed,
        pos_grid: (grid, grid),
        blocks: (0..a.depth)
            .map(|i| BlockConfig {
                window: if global.contains(&i) { 0 } else { a.window },
                space_adapter: false,
                mlp_adapter: false,
                depth_adapter: false,
                medsa_rel_names: false,
            })
            .collect(),
        out_chans: a.prompt_dim,
        adapter_dim: None,
        prompt_dim: a.prompt_dim,
        mask_in_chans: 16,
        decoder_mlp_dim: a.decoder_mlp,
        decoder_heads: 8,
        attention_downsample: 2,
        decoder_layers: vec![DecoderLayerConfig::default(); 2],
        num_mask_tokens: 4,
        iou_head: (a.prompt_dim, 3),
    };
    let tensors: Vec<(String, Tensor)> = random_checkpoint(&cfg, a.seed).into_iter().collect();
    let n: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    let mut meta = HashMap::new();
    meta.insert("medsa_init".to_string(), format!("seed {}", a.seed));
    save_safetensors(&a.out, &tensors, &meta)?;
    eprintln!(
        "init: {} ({} tensors, {:.2} M parameters, native input {}x{})",
        a.out.display(),
        tensors.len(),
        n as f64 / 1e6,
        a.size,
        a.size
    );
    Ok(())
}

fn merge_cmd(checkpoint: &Path, adapter: &Path, out: &Path, allow: bool) -> Result<()> {
    let (mut ws, meta) = medsa::train::checkpoint::apply_adapter(checkpoint, adapter, allow)?;
    let mut tensors = Vec::new();
    for k in ws.keys() {
        let shape = ws.shape(&k)?;
        let t = ws.take(&k, &shape)?;
        tensors.push((k, t));
    }
    let mut m = HashMap::new();
    m.insert(
        "medsa_merged".to_string(),
        format!(
            "{} + {} ({} steps, {})",
            checkpoint.display(),
            adapter.display(),
            meta.step,
            meta.trainable
        ),
    );
    save_safetensors(out, &tensors, &m)?;
    eprintln!("merge: {} ({} tensors)", out.display(), tensors.len());
    Ok(())
}
