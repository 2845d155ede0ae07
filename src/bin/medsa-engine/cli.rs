//! The command line: the clap definitions of every subcommand and its options (`Cli`, `Cmd`,
//! `SegmentArgs`, `TrainArgs`, `InitArgs`, the value enums) and the `PresetArg` <-> `Preset`
//! conversions.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use medsa::backend::RunOptions;
use medsa::medsa::depth_branch::DepthMode;
use medsa::pipeline::Preset;
use medsa::sam::DecoderFlavour;

#[derive(Parser)]
#[command(
    name = "medsa-engine",
    version,
    about = "Medical SAM Adapter engine (SAM + Med-SA)"
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) cmd: Cmd,
    /// Refuse a NIfTI volume (scan or label) with more voxels than this, before reading its data
    /// [default: 1073741824, or MEDSA_MAX_VOXELS].
    #[arg(long, global = true, value_name = "N")]
    pub(super) max_voxels: Option<u64>,
    /// Refuse a PNG/JPEG image with more pixels than this, before decoding it [default:
    /// 268435456].
    #[arg(long, global = true, value_name = "N")]
    pub(super) max_pixels: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum DepthModeArg {
    /// Each spatial token attends over its own slices (default).
    PerToken,
    /// The public Med-SA code's regrouping, for adapters trained with it.
    Compat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum OnOff {
    On,
    Off,
}

/// How the model is computed besides device and precision (`medsa::backend::RunOptions`): the
/// same defaults on every backend.
#[derive(clap::Args, Clone)]
pub(super) struct RunArgs {
    /// The encoder's fused inference path (on) or the op-by-op one (off): the same math, fewer
    /// passes over memory.
    #[arg(long, value_enum, default_value = "on")]
    pub(super) fused: OnOff,
    /// bf16 CUDA inference: GELU linears in cuBLASLt's tanh-GELU epilogue (up to 4.8e-4 from
    /// SAM's exact GELU; training always computes the exact one).
    #[arg(long)]
    pub(super) gelu_tanh_epilogue: bool,
    /// CUDA: the warp-per-row LayerNorm kernel (opt-in until measured on a card).
    #[arg(long)]
    pub(super) layernorm_rows: bool,
    /// CUDA bf16 attention kernel options, comma-separated: q128, rel-mma, trim, exp2,
    /// prefetch, all or none (opt-in until measured on a card).
    #[arg(long, default_value = "none")]
    pub(super) attention_options: String,
    /// CPU: MiB of freed large buffers kept for reuse (0: none).
    #[arg(long, default_value_t = medsa::host_pool::DEFAULT_CAP_MB)]
    pub(super) host_pool_mb: usize,
}

impl RunArgs {
    /// The library's options.
    pub(super) fn options(&self) -> medsa::Result<RunOptions> {
        Ok(RunOptions {
            fused: self.fused == OnOff::On,
            gelu_tanh_epilogue: self.gelu_tanh_epilogue,
            layernorm_rows: self.layernorm_rows,
            attention: medsa::backend::AttentionOptions::parse(&self.attention_options)?,
            host_pool_mb: self.host_pool_mb,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum FlavourArg {
    /// SAM's two-way block.
    Sam,
    /// The public Med-SA code's two-way block (its checkpoints name the block MLP
    /// `mlp.layers.0.0` / `mlp.fc`).
    Medsa,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum PresetArg {
    /// Keep aspect, SAM mean/std, pad to square.
    Sam,
    /// Stretch to square, scale to [0, 1].
    Medsa,
    /// LiteMedSAM: longest side to the model size (INTER_AREA), min-max to [0, 1], pad.
    Litemedsam,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Subcommand)]
pub(super) enum Cmd {
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
        /// Decoder flavour (SPEC section 7); default: the checkpoint's metadata, else inferred
        /// from its key names.
        #[arg(long, value_enum)]
        decoder_flavour: Option<FlavourArg>,
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
        /// Return mask tokens 0..N-1 as N classes (Med-SA multi-class heads); default: the
        /// inputs' `classes` metadata, else the model's recorded class count if above 1.
        #[arg(long)]
        classes: Option<usize>,
        /// Slices per volume (the batch is volumes x slices); default: a `depth` tensor or
        /// metadata in the inputs, else 2D.
        #[arg(long)]
        depth: Option<usize>,
        /// Depth-branch semantics for windowed blocks (default: the checkpoint's metadata, else
        /// compat for the medsa decoder flavour, else per-token).
        #[arg(long, value_enum)]
        depth_mode: Option<DepthModeArg>,
        /// Decoder flavour (SPEC section 7); default: the checkpoint's metadata, else inferred
        /// from its key names.
        #[arg(long, value_enum)]
        decoder_flavour: Option<FlavourArg>,
        /// Resized image size before padding, "h,w" (default: metadata, else the input size).
        #[arg(long)]
        input_size: Option<String>,
        /// Size of `masks`, "h,w" (default: metadata, else the input size).
        #[arg(long)]
        original_size: Option<String>,
        /// Device: cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Precision: f32, or bf16 (CUDA: bf16 storage; CPU: bf16 products with f32 accumulation).
        #[arg(long, default_value = "f32")]
        precision: String,
        #[command(flatten)]
        run: RunArgs,
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
        /// Record this decoder flavour in the merged model (default: the adapter's).
        #[arg(long, value_enum)]
        decoder_flavour: Option<FlavourArg>,
    },
    /// Time the image encoder (or, with --train, a training step) of a random-weight model
    /// (median of repeats).
    Bench {
        /// vit_b, vit_l or vit_h.
        #[arg(long, default_value = "vit_b")]
        variant: String,
        /// Time this checkpoint's image encoder (any architecture, e.g. the converted
        /// LiteMedSAM) instead of a random --variant.
        #[arg(long, conflicts_with_all = ["adapters", "train"])]
        checkpoint: Option<PathBuf>,
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
        /// Precision: f32, or bf16 (CUDA: bf16 storage; CPU: bf16 products with f32 accumulation).
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
        #[command(flatten)]
        run: RunArgs,
    },
}

/// Options of `train`.
#[derive(clap::Args)]
pub(super) struct TrainArgs {
    /// Base checkpoint (.safetensors).
    #[arg(long)]
    pub(super) checkpoint: PathBuf,
    /// Training data: a folder with images/ + masks/ (PNG/JPEG and PNG label maps) or
    /// images/ + labels/ (NIfTI volumes and label volumes), or a .json manifest.
    #[arg(long)]
    pub(super) data: PathBuf,
    /// Validation data in the same form (default: --val-fraction of the training cases).
    #[arg(long)]
    pub(super) val_data: Option<PathBuf>,
    /// Fraction of the cases held out for validation when --val-data is absent (by case).
    #[arg(long, default_value_t = 0.2)]
    pub(super) val_fraction: f64,
    /// Output folder.
    #[arg(short = 'o', long)]
    pub(super) out: PathBuf,
    /// What is trained: adapters, adapters+decoder (the reference), all, or comma-separated
    /// name patterns with * (e.g. "image_encoder.blocks.*.Space_Adapter.*").
    #[arg(long, default_value = "adapters+decoder")]
    pub(super) trainable: String,
    /// Adapters to add when the base has none: encoder, depth, decoder, combinations with +,
    /// all, or none.
    #[arg(long, default_value = "encoder")]
    pub(super) add_adapters: String,
    /// Loss: bce (the 2D reference, pos_weight 2), dicece (the 3D reference) or both.
    #[arg(long)]
    pub(super) loss: Option<String>,
    /// BCE positive weight.
    #[arg(long, default_value_t = 2.0)]
    pub(super) pos_weight: f32,
    /// Weight of the IoU-head loss (0: IoU head untrained, as the reference).
    #[arg(long, default_value_t = 0.0)]
    pub(super) iou_loss_weight: f32,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub(super) lr: f64,
    /// AdamW decoupled weight decay (0 = the reference's Adam).
    #[arg(long, default_value_t = 0.0)]
    pub(super) weight_decay: f64,
    /// Warm-up steps, then cosine decay to 1% (default: constant rate).
    #[arg(long)]
    pub(super) warmup: Option<u64>,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub(super) clip: Option<f64>,
    /// Samples per micro-batch (a depth chunk counts as one sample).
    #[arg(long, default_value_t = 2)]
    pub(super) batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub(super) accumulate: usize,
    /// Optimiser steps.
    #[arg(long, conflicts_with = "epochs")]
    pub(super) steps: Option<u64>,
    /// Epochs over the training samples (converted to steps).
    #[arg(long)]
    pub(super) epochs: Option<f64>,
    /// Validate every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub(super) val_every: u64,
    /// Save OUT/last.safetensors every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub(super) save_every: u64,
    /// Seed (data order, prompts, adapter initialisation).
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Model input size (default: the checkpoint's native size).
    #[arg(long)]
    pub(super) size: Option<usize>,
    /// Preprocessing preset (default: medsa, stretch to square, [0, 1], the reference's;
    /// litemedsam for a LiteMedSAM base, its authors' pipeline).
    #[arg(long, value_enum)]
    pub(super) preset: Option<PresetArg>,
    /// Train on this label id (default: any non-zero label).
    #[arg(long)]
    pub(super) label_id: Option<u32>,
    /// Volume intensities (see segment --intensity).
    #[arg(long, default_value = "ct")]
    pub(super) intensity: String,
    /// Volumes: train the depth branch on chunks of D consecutive slices (needs depth
    /// adapters: --add-adapters encoder+depth).
    #[arg(long)]
    pub(super) depth: Option<usize>,
    /// Positive clicks per image.
    #[arg(long, default_value_t = 1)]
    pub(super) pos_clicks: usize,
    /// Negative clicks per image.
    #[arg(long, default_value_t = 0)]
    pub(super) neg_clicks: usize,
    /// Also prompt with the mask's bounding box, each side jittered by up to N pixels.
    #[arg(long)]
    pub(super) box_jitter: Option<u32>,
    /// Random left-right flips of training samples (with their prompts and masks).
    #[arg(long)]
    pub(super) flip: bool,
    /// Recompute encoder blocks in backward (less memory, ~1/3 more compute).
    #[arg(long)]
    pub(super) recompute: bool,
    /// Depth-branch semantics for --depth chunks (default: the base checkpoint's metadata,
    /// else compat for the medsa decoder flavour, else per-token).
    #[arg(long, value_enum)]
    pub(super) depth_mode: Option<DepthModeArg>,
    /// Decoder flavour (SPEC section 7); default: the checkpoint's metadata, else inferred
    /// from its key names.
    #[arg(long, value_enum)]
    pub(super) decoder_flavour: Option<FlavourArg>,

    /// Continue from OUT/last.safetensors and its optimiser state.
    #[arg(long)]
    pub(super) resume: bool,
    /// No progress line.
    #[arg(long)]
    pub(super) quiet: bool,
    /// Device: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
    /// Storage precision on CUDA: f32 or bf16 (optimiser state and master weights stay f32).
    #[arg(long, default_value = "f32")]
    pub(super) precision: String,
    #[command(flatten)]
    pub(super) run: RunArgs,
}

/// Options of `init`.
#[derive(clap::Args)]
pub(super) struct InitArgs {
    /// Output .safetensors.
    #[arg(long)]
    pub(super) out: PathBuf,
    /// Native input size (pixels, square).
    #[arg(long, default_value_t = 128)]
    pub(super) size: usize,
    /// Patch size.
    #[arg(long, default_value_t = 8)]
    pub(super) patch: usize,
    /// Encoder width.
    #[arg(long, default_value_t = 96)]
    pub(super) embed: usize,
    /// Encoder blocks.
    #[arg(long, default_value_t = 4)]
    pub(super) depth: usize,
    /// Encoder heads.
    #[arg(long, default_value_t = 4)]
    pub(super) heads: usize,
    /// Window size of the windowed blocks (0: all global).
    #[arg(long, default_value_t = 8)]
    pub(super) window: usize,
    /// Global-attention blocks, comma-separated (default: every other block, the last
    /// included).
    #[arg(long)]
    pub(super) global: Option<String>,
    /// Neck output / decoder width.
    #[arg(long, default_value_t = 128)]
    pub(super) prompt_dim: usize,
    /// Decoder MLP width.
    #[arg(long, default_value_t = 512)]
    pub(super) decoder_mlp: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
}

/// Options of `segment`.
#[derive(clap::Args)]
pub(super) struct SegmentArgs {
    /// Checkpoint (.safetensors).
    #[arg(long)]
    pub(super) checkpoint: PathBuf,
    /// Adapter checkpoint from `train`, applied on top of --checkpoint.
    #[arg(long)]
    pub(super) adapter: Option<PathBuf>,
    /// Accept an adapter trained on a different base file.
    #[arg(long)]
    pub(super) allow_base_mismatch: bool,
    /// Batch input: a PNG/JPEG/NIfTI file, a folder of them, or a .json manifest.
    #[arg(short = 'i', long = "input")]
    pub(super) input: Option<PathBuf>,
    /// Batch output folder (masks keep the inputs' base names).
    #[arg(short = 'o', long = "output")]
    pub(super) output: Option<PathBuf>,
    /// Single-image mode: a PNG or JPEG image.
    #[arg(long, conflicts_with = "input")]
    pub(super) image: Option<PathBuf>,
    /// Single-image mode: the output mask PNG (0/255).
    #[arg(long, requires = "image")]
    pub(super) out: Option<PathBuf>,
    /// A 2D point "x,y[,label]" (pixel column, row; label 1 foreground by default, 0
    /// background); repeat for more points. All prompts given here form one object.
    #[arg(long = "point")]
    pub(super) points: Vec<String>,
    /// A 3D point "x,y,z[,label]" in voxel indices (i, j, k) of the volume's array order.
    #[arg(long = "voxel")]
    pub(super) voxels: Vec<String>,
    /// A box "x0,y0,x1,y1" (2D) or "x0,y0,z0,x1,y1,z1" (3D: every slice z0..=z1).
    #[arg(long = "box")]
    pub(super) bbox: Option<String>,
    /// Prompts from labels: a label file, or a folder with one label per input (same base
    /// name): the bounding box of --label-id (per slice for volumes).
    #[arg(long)]
    pub(super) prompt_from_label: Option<PathBuf>,
    /// The label id used by --prompt-from-label and --labels (default for --labels: any
    /// non-zero).
    #[arg(long)]
    pub(super) label_id: Option<u32>,
    /// With --prompt-from-label, also click at the structure's centre.
    #[arg(long)]
    pub(super) click: bool,
    /// Ground truth (file or folder, same base names) for Dice, IoU and HD95 per case; the CSV
    /// goes to OUTPUT/metrics.csv.
    #[arg(long)]
    pub(super) labels: Option<PathBuf>,
    /// Predict three masks per object and keep the best predicted IoU.
    #[arg(long)]
    pub(super) multimask: bool,
    /// 2D preprocessing preset (default: the adapter's training preset, else sam).
    #[arg(long, value_enum)]
    pub(super) preset: Option<PresetArg>,
    /// Preprocessing preset for volume slices (default: the adapter's, else medsa as the
    /// reference trains 3D).
    #[arg(long, value_enum)]
    pub(super) volume_preset: Option<PresetArg>,
    /// Volume intensities: ct (= ct-abdomen, [-175, 250] HU as the reference), ct-soft,
    /// ct-lung, ct-bone, ct-brain, window:lo,hi, mr (0.5-99.5 percentiles), mr:plo,phi, none
    /// (default: the adapter's training intensities, else ct).
    #[arg(long)]
    pub(super) intensity: Option<String>,
    /// Slices per encoder pass for volumes (the SD-Trans depth window); chunks do not overlap.
    #[arg(long, default_value_t = 8)]
    pub(super) chunk: usize,
    /// Depth-branch semantics for windowed blocks (default: the model's metadata, else compat
    /// for the medsa decoder flavour, else per-token).
    #[arg(long, value_enum)]
    pub(super) depth_mode: Option<DepthModeArg>,
    /// Decoder flavour (SPEC section 7); default: the checkpoint's metadata, else inferred
    /// from its key names.
    #[arg(long, value_enum)]
    pub(super) decoder_flavour: Option<FlavourArg>,

    /// 2D images per encoder pass.
    #[arg(long, default_value_t = 1)]
    pub(super) batch_size: usize,
    /// Leave cases whose output already exists (resume an interrupted run).
    #[arg(long)]
    pub(super) skip_existing: bool,
    /// Split the cases into N parts (case i of the sorted list goes to part i % N) ...
    #[arg(long, default_value_t = 1)]
    pub(super) num_parts: usize,
    /// ... and run part K (0-based), e.g. a Slurm array index.
    #[arg(long, default_value_t = 0)]
    pub(super) part_id: usize,
    /// Also write probability maps (<name>_prob.png / _prob.nii.gz).
    #[arg(long)]
    pub(super) probabilities: bool,
    /// For volumes, also write <name>_overview.png: prompted slices with the mask in red.
    #[arg(long)]
    pub(super) overview: bool,
    /// Volumes: segment each object through the volume from one prompt: a 2D box on slice z
    /// ("x0,y0,z,x1,y1,z"), the middle slice of a 3D box (which then bounds it), or clicks on one
    /// slice; each next slice is prompted with the previous mask's box. No label is read.
    #[arg(long)]
    pub(super) propagate: bool,
    /// With --propagate: pixels added on every side of the previous slice's mask box.
    #[arg(long, default_value_t = 2.0, requires = "propagate")]
    pub(super) propagate_margin: f32,
    /// With --propagate: a slice whose mask has fewer pixels ends the walk.
    #[arg(long, default_value_t = 10, requires = "propagate")]
    pub(super) propagate_min_area: usize,
    /// With --propagate: a slice whose mask has a lower predicted IoU ends the walk.
    #[arg(long, default_value_t = 0.75, requires = "propagate")]
    pub(super) propagate_min_iou: f32,
    /// With --propagate: a slice whose mask has a lower stability score (IoU of the masks at
    /// logits +1 and -1) ends the walk.
    #[arg(long, default_value_t = 0.75, requires = "propagate")]
    pub(super) propagate_min_stability: f32,
    /// With --propagate: at most this many slices on each side of the seed slice.
    #[arg(long, requires = "propagate")]
    pub(super) propagate_max_slices: Option<usize>,
    /// With --propagate: also prompt each slice with the previous slice's low-res logits (for
    /// models trained with mask inputs).
    #[arg(long, requires = "propagate")]
    pub(super) propagate_mask_input: bool,
    /// No progress bar.
    #[arg(long)]
    pub(super) quiet: bool,
    /// Device: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
    /// Precision: f32, or bf16 (CUDA: bf16 storage; CPU: bf16 products with f32 accumulation).
    #[arg(long, default_value = "f32")]
    pub(super) precision: String,
    #[command(flatten)]
    pub(super) run: RunArgs,
}

/// The library's depth-attention mode for a `--depth-mode` value.
pub(super) fn depth_mode_of(m: DepthModeArg) -> DepthMode {
    match m {
        DepthModeArg::PerToken => DepthMode::PerToken,
        DepthModeArg::Compat => DepthMode::Compat,
    }
}

/// The library's decoder flavour for a `--decoder-flavour` value.
pub(super) fn flavour_of(f: FlavourArg) -> DecoderFlavour {
    match f {
        FlavourArg::Sam => DecoderFlavour::Sam,
        FlavourArg::Medsa => DecoderFlavour::Medsa,
    }
}

pub(super) fn preset_of(p: PresetArg) -> Preset {
    match p {
        PresetArg::Sam => Preset::Sam,
        PresetArg::Medsa => Preset::Medsa,
        PresetArg::Litemedsam => Preset::LiteMedsam,
    }
}

pub(super) fn preset_arg(p: Preset) -> PresetArg {
    match p {
        Preset::Sam => PresetArg::Sam,
        Preset::Medsa => PresetArg::Medsa,
        Preset::LiteMedsam => PresetArg::Litemedsam,
    }
}
