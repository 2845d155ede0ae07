//! The batch segmentation job behind `medsa-engine segment -i IN -o OUT`: a file, a folder or a
//! JSON manifest of cases in, one mask per case out on the input's own grid.
//!
//! Conventions (as nnU-Net and TotalSegmentator users expect): outputs keep the input's base name
//! in the output folder; 2D masks are PNGs of label ids (0 background, k for the k-th prompted
//! object) at the image's size; volume masks are NIfTI label volumes with the input's dims,
//! pixdim, qform/sform and codes, so they overlay in any viewer.
//!
//! Coordinates: 2D prompts are `(x, y)` = (column, row) pixel indices of the image as stored;
//! 3D prompts are `(x, y, z)` = voxel indices `(i, j, k)` in the file's array order. Volumes are
//! cut into slices along the third axis; slice `k` is the image with `ny` rows (j) and `nx`
//! columns (i). Without propagation, a 3D box `(x0, y0, z0, x1, y1, z1)` prompts every slice
//! `z0..=z1` with the 2D box `(x0, y0, x1, y1)`, a 3D point prompts its own slice, and slices
//! without any prompt are not decoded and stay background. With [`Propagation`]
//! (`--propagate`), one prompt on one slice segments the structure through the volume and clicks
//! refine it (the rule is in the `propagate` module's documentation).
//!
//! Volumes go through the encoder in chunks of `chunk` consecutive slices (one encoder pass per
//! chunk, the SD-Trans depth branch attending across the chunk's slices when the checkpoint has
//! depth adapters). Chunks do not overlap, so every slice is encoded at most once; a chunk no
//! prompt (or walk) reaches is not encoded at all.
//!
//! Robustness: each case is loaded, checked and run on its own; a bad case is reported and
//! skipped, the others complete, and the run's exit status says whether any failed. Outputs are
//! written atomically (temporary file + rename), so an interrupted run never leaves a truncated
//! mask and `skip_existing` can resume it.

mod cases;
mod files;
mod intensity;
mod job;
mod prompts;
mod propagate;
mod report;
mod volume;

use std::path::PathBuf;

use crate::medsa::depth_branch::DepthMode;
use crate::pipeline::Preset;

pub use cases::{
    discover, is_nifti, output_for, parse_objects, read_manifest, shard, stem, Case, FromLabel,
    Interaction, Object,
};
pub use files::prepare_output;
pub use intensity::Intensity;
pub use job::Job;
pub use prompts::{load_label_png, parse_numbers};
pub use propagate::{Propagation, VolumeMasks};
pub use report::{Outcome, Summary};

/// Options of a batch run.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// 2D preprocessing (volumes default to the Med-SA preset).
    pub preset: Preset,
    /// Preset for volume slices.
    pub volume_preset: Preset,
    /// Volume intensity mapping.
    pub intensity: Intensity,
    /// Slices per encoder pass for volumes.
    pub chunk: usize,
    /// Depth-branch semantics.
    pub depth_mode: DepthMode,
    /// 2D images per encoder pass.
    pub batch_size: usize,
    /// Leave cases whose output exists.
    pub skip_existing: bool,
    /// Three masks per prompt, keep the best predicted IoU.
    pub multimask: bool,
    /// Also write probability maps (`<name>_prob.png` / `_prob.nii.gz`).
    pub probabilities: bool,
    /// Write `<name>_overview.png` for volumes (a few slices with the mask overlaid).
    pub overview: bool,
    /// Prompts applied to every case (from the command line).
    pub global_objects: Vec<Object>,
    /// Prompt-from-label rule applied to every case: (folder or file, id, click).
    pub global_from_label: Option<(PathBuf, u32, bool)>,
    /// Ground-truth folder (or file) for evaluation, and the label id (None: any non-zero).
    pub labels: Option<PathBuf>,
    /// Label id of the evaluated structure.
    pub label_id: Option<u32>,
    /// No progress bar.
    pub quiet: bool,
    /// The output folder: every case's output must resolve inside it.
    pub out_dir: PathBuf,
    /// Volumes: propagate each object from one prompted slice through the volume (`None`:
    /// only prompted slices are segmented).
    pub propagate: Option<Propagation>,
}
