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
//! columns (i). A 3D box `(x0, y0, z0, x1, y1, z1)` prompts every slice `z0..=z1` with the 2D box
//! `(x0, y0, x1, y1)`; a 3D point prompts its own slice. Slices without any prompt are not decoded
//! and stay background (nothing is propagated between slices).
//!
//! Volumes go through the encoder in chunks of `chunk` consecutive slices (one encoder pass per
//! chunk, the SD-Trans depth branch attending across the chunk's slices when the checkpoint has
//! depth adapters). Chunks do not overlap, so every slice is encoded exactly once; a chunk without
//! prompted slices is not encoded at all.
//!
//! Robustness: each case is loaded, checked and run on its own; a bad case is reported and
//! skipped, the others complete, and the run's exit status says whether any failed. Outputs are
//! written atomically (temporary file + rename), so an interrupted run never leaves a truncated
//! mask and `skip_existing` can resume it.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use crate::data::nifti;
use crate::error::{Error, Result};
use crate::medsa::depth_branch::DepthMode;
use crate::metrics::{self, Scores};
use crate::pipeline::{self, Prepared, Preset, RgbImage};
use crate::sam::model::postprocess_masks;
use crate::sam::{DepthSpec, MaskOutput, Prompts, Sam, Trace};
use crate::tensor::Tensor;

/// How volume intensities become [0, 1] before the 2D preset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Intensity {
    /// Clip to `[lo, hi]` and scale to [0, 1] (CT windows in HU).
    Window(f32, f32),
    /// Clip to the volume's `[p_lo, p_hi]` percentiles and scale (MR).
    Percentile(f32, f32),
    /// Values are used as they are (already in [0, 1]).
    None,
}

impl Intensity {
    /// Parses `ct` (the reference's [-175, 250] HU), `ct-abdomen`, `ct-soft`, `ct-lung`,
    /// `ct-bone`, `ct-brain`, `window:lo,hi`, `mr` (0.5-99.5 percentiles), `mr:plo,phi`, `none`.
    pub fn parse(s: &str) -> Result<Self> {
        let pair = |v: &str| -> Result<(f32, f32)> {
            let p: Vec<f32> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            if p.len() == 2 && p[0] < p[1] && p.iter().all(|x| x.is_finite()) {
                Ok((p[0], p[1]))
            } else {
                Err(Error::Input(format!(
                    "intensity \"{s}\": expected two increasing numbers"
                )))
            }
        };
        Ok(match s {
            "ct" | "ct-abdomen" => Intensity::Window(-175.0, 250.0),
            "ct-soft" => Intensity::Window(-150.0, 250.0),
            "ct-lung" => Intensity::Window(-1350.0, 150.0),
            "ct-bone" => Intensity::Window(-500.0, 1300.0),
            "ct-brain" => Intensity::Window(0.0, 80.0),
            "mr" => Intensity::Percentile(0.5, 99.5),
            "none" => Intensity::None,
            _ => {
                if let Some(v) = s.strip_prefix("window:") {
                    let (a, b) = pair(v)?;
                    Intensity::Window(a, b)
                } else if let Some(v) = s.strip_prefix("mr:") {
                    let (a, b) = pair(v)?;
                    if a < 0.0 || b > 100.0 {
                        return Err(Error::Input(format!(
                            "intensity \"{s}\": percentiles are 0..100"
                        )));
                    }
                    Intensity::Percentile(a, b)
                } else {
                    return Err(Error::Input(format!(
                        "intensity \"{s}\": expected ct, ct-abdomen, ct-soft, ct-lung, ct-bone, ct-brain, window:lo,hi, mr, mr:plo,phi or none"
                    )));
                }
            }
        })
    }

    /// Maps `data` to [0, 1] in place.
    pub fn apply(self, data: &mut [f32]) {
        let (lo, hi) = match self {
            Intensity::None => return,
            Intensity::Window(a, b) => (a, b),
            Intensity::Percentile(a, b) => {
                let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
                if v.is_empty() {
                    return;
                }
                v.sort_by(f32::total_cmp);
                let at = |p: f32| v[((p / 100.0) * (v.len() - 1) as f32).round() as usize];
                (at(a), at(b))
            }
        };
        let span = (hi - lo).max(f32::EPSILON);
        for x in data.iter_mut() {
            *x = ((*x - lo) / span).clamp(0.0, 1.0);
        }
    }
}

/// One prompted object: points `(x, y, z, label)` (z ignored in 2D) and an optional box
/// `(x0, y0, z0, x1, y1, z1)` (z ignored in 2D).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object {
    /// Points with labels (1 foreground, 0 background).
    pub points: Vec<[f32; 4]>,
    /// A box.
    pub bbox: Option<[f32; 6]>,
}

/// Prompts derived from a label image or volume (evaluation protocols).
#[derive(Clone, Debug, PartialEq)]
pub struct FromLabel {
    /// The label file.
    pub path: PathBuf,
    /// The label id whose bounding box (per slice for volumes) becomes the box prompt.
    pub id: u32,
    /// Also click at the structure's centre (the label pixel closest to its centroid).
    pub click: bool,
}

/// One input and what to do with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Name used in reports (the input's base name).
    pub name: String,
    /// The input image or volume.
    pub image: PathBuf,
    /// Where its mask goes.
    pub output: PathBuf,
    /// Prompted objects (output label k+1 for object k).
    pub objects: Vec<Object>,
    /// Prompts from a label file instead of (or in addition to) `objects`.
    pub from_label: Option<FromLabel>,
    /// Ground truth for evaluation.
    pub ground_truth: Option<PathBuf>,
}

/// Whether a path is a NIfTI volume.
pub fn is_nifti(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

fn is_image(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".png") || n.ends_with(".jpg") || n.ends_with(".jpeg")
}

/// The base name without the image/volume extension.
pub fn stem(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in [
        ".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".NII.GZ", ".NII", ".PNG", ".JPG", ".JPEG",
    ] {
        if let Some(s) = n.strip_suffix(ext) {
            return s.to_string();
        }
    }
    n
}

/// The output path of an input: same base name, `.png` for images, the input's NIfTI
/// extension for volumes.
pub fn output_for(input: &Path, out_dir: &Path) -> PathBuf {
    let s = stem(input);
    let lower = input.to_string_lossy().to_ascii_lowercase();
    let ext = if lower.ends_with(".nii.gz") {
        ".nii.gz"
    } else if lower.ends_with(".nii") {
        ".nii"
    } else {
        ".png"
    };
    out_dir.join(format!("{s}{ext}"))
}

fn json_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {what}", path.display()))
}

fn nums(v: &serde_json::Value, path: &Path, field: &str) -> Result<Vec<f32>> {
    v.as_array()
        .ok_or_else(|| json_err(path, format!("`{field}` must be a list of numbers")))?
        .iter()
        .map(|x| {
            x.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| json_err(path, format!("`{field}` must contain only numbers")))
        })
        .collect()
}

/// Parses an object `{ "points": [[x, y, (z,) label], ...], "box": [x0, y0, (z0,) x1, y1, (z1)] }`.
fn parse_object(v: &serde_json::Value, path: &Path, ctx: &str) -> Result<Object> {
    let mut o = Object::default();
    if let Some(ps) = v.get("points") {
        for p in ps
            .as_array()
            .ok_or_else(|| json_err(path, format!("{ctx}: `points` must be a list")))?
        {
            let n = nums(p, path, &format!("{ctx}.points"))?;
            o.points.push(match n.len() {
                2 => [n[0], n[1], 0.0, 1.0],
                3 => [n[0], n[1], 0.0, n[2]],
                4 => [n[0], n[1], n[2], n[3]],
                _ => {
                    return Err(json_err(
                        path,
                        format!("{ctx}: a point is [x, y], [x, y, label] or [x, y, z, label]"),
                    ))
                }
            });
        }
    }
    if let Some(b) = v.get("box") {
        let n = nums(b, path, &format!("{ctx}.box"))?;
        o.bbox = Some(match n.len() {
            4 => [n[0], n[1], 0.0, n[2], n[3], 0.0],
            6 => [n[0], n[1], n[2], n[3], n[4], n[5]],
            _ => {
                return Err(json_err(
                    path,
                    format!("{ctx}: a box is [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1]"),
                ))
            }
        });
    }
    Ok(o)
}

/// Reads a manifest: a JSON list of cases (or `{"cases": [...]}`), each
/// `{"image": path, "output"?: path, "label"?: path, "objects"?: [object...], "points"?, "box"?,
///   "from_label"?: {"path", "id", "click"?}}`; relative paths are relative to the manifest.
pub fn read_manifest(path: &Path, out_dir: &Path) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| json_err(path, format!("not valid JSON: {e}")))?;
    let list = match &v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Object(o) => o
            .get("cases")
            .and_then(|c| c.as_array())
            .cloned()
            .ok_or_else(|| json_err(path, "expected a list of cases or {\"cases\": [...]}"))?,
        _ => {
            return Err(json_err(
                path,
                "expected a list of cases or {\"cases\": [...]}",
            ))
        }
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };
    let mut cases = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let ctx = format!("case {i}");
        let image = c
            .get("image")
            .and_then(|x| x.as_str())
            .ok_or_else(|| json_err(path, format!("{ctx}: missing \"image\" (a path)")))?;
        let image = rel(image);
        let output = match c.get("output").and_then(|x| x.as_str()) {
            Some(o) => out_dir.join(o),
            None => output_for(&image, out_dir),
        };
        let mut objects = Vec::new();
        if let Some(os) = c.get("objects") {
            for (k, o) in os
                .as_array()
                .ok_or_else(|| json_err(path, format!("{ctx}: `objects` must be a list")))?
                .iter()
                .enumerate()
            {
                objects.push(parse_object(o, path, &format!("{ctx}.objects[{k}]"))?);
            }
        }
        if c.get("points").is_some() || c.get("box").is_some() {
            objects.push(parse_object(c, path, &ctx)?);
        }
        let from_label = match c.get("from_label") {
            Some(f) => Some(FromLabel {
                path: rel(f
                    .get("path")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| json_err(path, format!("{ctx}: from_label needs \"path\"")))?),
                id: f.get("id").and_then(|x| x.as_u64()).ok_or_else(|| {
                    json_err(path, format!("{ctx}: from_label needs an integer \"id\""))
                })? as u32,
                click: f.get("click").and_then(|x| x.as_bool()).unwrap_or(false),
            }),
            None => None,
        };
        cases.push(Case {
            name: stem(&image),
            ground_truth: c.get("label").and_then(|x| x.as_str()).map(rel),
            image,
            output,
            objects,
            from_label,
        });
    }
    Ok(cases)
}

/// Lists the cases of a file, a folder (PNG, JPEG, NIfTI; sorted by name) or a `.json` manifest.
pub fn discover(input: &Path, out_dir: &Path) -> Result<Vec<Case>> {
    let meta = std::fs::metadata(input).map_err(|source| Error::Io {
        path: input.into(),
        source,
    })?;
    let case = |p: PathBuf| Case {
        name: stem(&p),
        output: output_for(&p, out_dir),
        image: p,
        objects: Vec::new(),
        from_label: None,
        ground_truth: None,
    };
    if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|source| Error::Io {
                path: input.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && (is_image(p) || is_nifti(p)))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Input(format!(
                "{}: no PNG, JPEG or NIfTI files",
                input.display()
            )));
        }
        Ok(files.into_iter().map(case).collect())
    } else if input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        read_manifest(input, out_dir)
    } else {
        Ok(vec![case(input.to_path_buf())])
    }
}

/// Keeps the cases of part `part` of `parts` (case i of the sorted list goes to part i % parts),
/// so that independent machines split a folder without coordination.
pub fn shard(mut cases: Vec<Case>, parts: usize, part: usize) -> Result<Vec<Case>> {
    if parts == 0 || part >= parts {
        return Err(Error::Input(format!(
            "--part-id {part} must be below --num-parts {parts}"
        )));
    }
    cases.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(cases
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % parts == part)
        .map(|(_, c)| c)
        .collect())
}

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
}

/// What happened to one case.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Written; images (slices) encoded and metrics when ground truth was given.
    Done {
        /// 2D images or volume slices encoded.
        images: usize,
        /// Dice/IoU/HD95 against the ground truth.
        scores: Option<Scores>,
    },
    /// Output existed and `skip_existing` was set.
    Skipped,
    /// The reason it failed.
    Failed(String),
}

/// The end-of-run report.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// `(case name, outcome)` in processing order.
    pub cases: Vec<(String, Outcome)>,
    /// Wall time.
    pub seconds: f64,
}

impl Summary {
    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.cases
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
            .count()
    }

    /// Images (slices) encoded so far.
    pub fn images(&self) -> usize {
        self.cases
            .iter()
            .map(|(_, o)| match o {
                Outcome::Done { images, .. } => *images,
                _ => 0,
            })
            .sum()
    }

    /// Images (slices) encoded per second.
    pub fn images_per_s(&self) -> f64 {
        self.images() as f64 / self.seconds.max(1e-9)
    }

    /// The per-case metrics CSV (`case,dice,iou,hd95`, then the means over cases with finite
    /// values), when any case was evaluated.
    pub fn metrics_csv(&self) -> Option<String> {
        let rows: Vec<(String, Scores)> = self
            .cases
            .iter()
            .filter_map(|(n, o)| match o {
                Outcome::Done {
                    scores: Some(s), ..
                } => Some((n.clone(), *s)),
                _ => None,
            })
            .collect();
        (!rows.is_empty()).then(|| metrics::csv(&rows))
    }
}

struct Progress {
    on: bool,
    total: usize,
    start: Instant,
}

impl Progress {
    fn new(total: usize, quiet: bool) -> Self {
        Progress {
            on: !quiet && std::io::stderr().is_terminal(),
            total,
            start: Instant::now(),
        }
    }

    fn show(&self, done: usize, images: usize, name: &str) {
        if !self.on {
            return;
        }
        let w = 30;
        let filled = (done * w).checked_div(self.total).unwrap_or(w);
        let rate = images as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r[{}{}] {done}/{} cases, {rate:.2} img/s  {name:<30.30}",
            "#".repeat(filled),
            " ".repeat(w - filled),
            self.total
        );
        let _ = e.flush();
    }

    fn finish(&self) {
        if self.on {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// A 2D label/ground-truth image as integer ids `[h, w]`: the stored 8- or 16-bit grey values
/// (colour images through their luma), with the height and width.
pub fn load_label_png(path: &Path) -> Result<(Vec<u32>, usize, usize)> {
    let img = image::ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?
        .decode()
        .map_err(|e| {
            Error::Input(format!(
                "{}: cannot decode label image: {e}",
                path.display()
            ))
        })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Label ids are the stored integers: no rescaling between bit depths.
    let ids: Vec<u32> = match img {
        image::DynamicImage::ImageLuma16(g) => g.into_raw().into_iter().map(u32::from).collect(),
        image::DynamicImage::ImageLuma8(g) => g.into_raw().into_iter().map(u32::from).collect(),
        other => other
            .to_luma8()
            .into_raw()
            .into_iter()
            .map(u32::from)
            .collect(),
    };
    Ok((ids, h, w))
}

/// Bounding box `(x0, y0, x1, y1)` and centre click of `id` in a `[h, w]` label plane, if present.
fn label_prompt(plane: &[u32], h: usize, w: usize, id: u32) -> Option<([f32; 4], [f32; 2])> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0usize);
    for y in 0..h {
        for x in 0..w {
            if plane[y * w + x] == id {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
                sx += x as f64;
                sy += y as f64;
                n += 1;
            }
        }
    }
    if n == 0 {
        return None;
    }
    let (cx, cy) = (sx / n as f64, sy / n as f64);
    // The label pixel nearest the centroid: a click that is surely inside the structure.
    let mut best = (f64::INFINITY, 0usize, 0usize);
    for y in y0..=y1 {
        for x in x0..=x1 {
            if plane[y * w + x] == id {
                let d = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
                if d < best.0 {
                    best = (d, x, y);
                }
            }
        }
    }
    Some((
        [x0 as f32, y0 as f32, x1 as f32, y1 as f32],
        [best.1 as f32, best.2 as f32],
    ))
}

/// One object's prompts on one 2D image or slice: points `(x, y, label)` and a box.
type Obj2d = (Vec<[f32; 3]>, Option<[f32; 4]>);

/// The prompts of one 2D image (or one volume slice) as a list of per-object `Prompts` in
/// model-input coordinates.
fn object_prompts(objects: &[Obj2d], prep: &Prepared) -> Result<Vec<Prompts>> {
    objects
        .iter()
        .map(|(points, bbox)| {
            let mut p = Prompts::default();
            if !points.is_empty() {
                let mut c = Vec::new();
                let mut l = Vec::new();
                for pt in points {
                    let (x, y) = prep.map_xy(pt[0], pt[1]);
                    c.extend([x, y]);
                    l.push(pt[2]);
                }
                p.point_coords = Some(Tensor::from_vec(c, &[1, points.len(), 2])?);
                p.point_labels = Some(Tensor::from_vec(l, &[1, points.len()])?);
            }
            if let Some(b) = bbox {
                let (x0, y0) = prep.map_xy(b[0], b[1]);
                let (x1, y1) = prep.map_xy(b[2], b[3]);
                p.boxes = Some(Tensor::from_vec(vec![x0, y0, x1, y1], &[1, 4])?);
            }
            Ok(p)
        })
        .collect()
}

fn check_inside(case: &str, what: &str, x: f32, y: f32, w: usize, h: usize) -> Result<()> {
    if !(x >= 0.0 && y >= 0.0 && x <= (w - 1) as f32 && y <= (h - 1) as f32) {
        return Err(Error::Input(format!(
            "{case}: {what} ({x}, {y}) lies outside the {w}x{h} image (pixel indices 0..{} x 0..{})",
            w - 1,
            h - 1
        )));
    }
    Ok(())
}

/// A loaded, checked 2D case ready for the encoder.
struct Loaded2d {
    prep: Prepared,
    prompts: Vec<Prompts>,
    gt: Option<Vec<bool>>,
}

/// The model runner for one job.
pub struct Job<'a, B: Backend> {
    be: &'a B,
    model: &'a Sam<B>,
    opts: JobOptions,
    size: usize,
}

impl<'a, B: Backend> Job<'a, B> {
    /// A job on `model`; fails when the model's native input is not square.
    pub fn new(be: &'a B, model: &'a Sam<B>, opts: JobOptions) -> Result<Self> {
        let (h, w) = model.config.img_size();
        if h != w {
            return Err(Error::Input(format!(
                "segment needs a square native input, the model has {h}x{w}"
            )));
        }
        if opts.chunk == 0 || opts.batch_size == 0 {
            return Err(Error::Input(
                "--chunk and --batch-size must be at least 1".into(),
            ));
        }
        Ok(Job {
            be,
            model,
            opts,
            size: h,
        })
    }

    fn objects_of(&self, case: &Case) -> Vec<Object> {
        if case.objects.is_empty() {
            self.opts.global_objects.clone()
        } else {
            case.objects.clone()
        }
    }

    fn label_rule_of(&self, case: &Case) -> Option<FromLabel> {
        case.from_label.clone().or_else(|| {
            self.opts
                .global_from_label
                .as_ref()
                .map(|(p, id, click)| FromLabel {
                    path: if p.is_dir() {
                        find_label(p, &case.image)
                    } else {
                        p.clone()
                    },
                    id: *id,
                    click: *click,
                })
        })
    }

    fn gt_of(&self, case: &Case) -> Option<PathBuf> {
        case.ground_truth.clone().or_else(|| {
            self.opts.labels.as_ref().map(|p| {
                if p.is_dir() {
                    find_label(p, &case.image)
                } else {
                    p.clone()
                }
            })
        })
    }

    fn load_2d(&self, case: &Case) -> Result<Loaded2d> {
        let img = pipeline::load_image(&case.image)?;
        let (h, w) = (img.height, img.width);
        let mut objs: Vec<Obj2d> = Vec::new();
        for (k, o) in self.objects_of(case).iter().enumerate() {
            let mut pts = Vec::new();
            for p in &o.points {
                check_inside(&case.name, &format!("object {k} point"), p[0], p[1], w, h)?;
                if p[3] != 0.0 && p[3] != 1.0 {
                    return Err(Error::Input(format!(
                        "{}: object {k}: point label {} is not 0 or 1",
                        case.name, p[3]
                    )));
                }
                pts.push([p[0], p[1], p[3]]);
            }
            let bbox = match o.bbox {
                Some(b) => {
                    check_inside(
                        &case.name,
                        &format!("object {k} box corner"),
                        b[0],
                        b[1],
                        w,
                        h,
                    )?;
                    check_inside(
                        &case.name,
                        &format!("object {k} box corner"),
                        b[3],
                        b[4],
                        w,
                        h,
                    )?;
                    if b[3] < b[0] || b[4] < b[1] {
                        return Err(Error::Input(format!(
                            "{}: object {k}: box needs x0 <= x1 and y0 <= y1",
                            case.name
                        )));
                    }
                    Some([b[0], b[1], b[3], b[4]])
                }
                None => None,
            };
            objs.push((pts, bbox));
        }
        if let Some(fl) = self.label_rule_of(case) {
            let (plane, lh, lw) = load_label_png(&fl.path)?;
            if (lh, lw) != (h, w) {
                return Err(Error::Input(format!(
                    "{}: label {} is {lw}x{lh}, the image is {w}x{h}",
                    case.name,
                    fl.path.display()
                )));
            }
            let (b, c) = label_prompt(&plane, h, w, fl.id).ok_or_else(|| {
                Error::Input(format!(
                    "{}: label id {} does not occur in {}",
                    case.name,
                    fl.id,
                    fl.path.display()
                ))
            })?;
            objs.push((
                if fl.click {
                    vec![[c[0], c[1], 1.0]]
                } else {
                    vec![]
                },
                Some(b),
            ));
        }
        if objs.is_empty() {
            return Err(Error::Input(format!(
                "{}: no prompt (give --point/--box, --prompt-from-label, or prompts in the manifest)",
                case.name
            )));
        }
        let prep = pipeline::prepare(&img, self.size, self.opts.preset)?;
        let prompts = object_prompts(&objs, &prep)?;
        let gt = match self.gt_of(case) {
            Some(p) => {
                let (plane, gh, gw) = load_label_png(&p)?;
                if (gh, gw) != (h, w) {
                    return Err(Error::Input(format!(
                        "{}: ground truth {} is {gw}x{gh}, the image is {w}x{h}",
                        case.name,
                        p.display()
                    )));
                }
                Some(
                    plane
                        .iter()
                        .map(|&v| self.opts.label_id.map_or(v > 0, |id| v == id))
                        .collect(),
                )
            }
            None => None,
        };
        Ok(Loaded2d { prep, prompts, gt })
    }

    /// Decodes every object against embedding `b` of `emb`; returns the label map at the
    /// original size and the per-pixel maximum probability.
    fn decode(
        &self,
        emb: &B::Tensor,
        b: usize,
        prep: &Prepared,
        prompts: &[Prompts],
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let be = self.be;
        let one = be.index_select0(emb, &[b])?;
        let (oh, ow) = prep.original_size;
        let mut labels = vec![0u8; oh * ow];
        let mut prob = vec![0f32; oh * ow];
        let out = MaskOutput::from_multimask(self.opts.multimask);
        for (k, p) in prompts.iter().enumerate() {
            let (low, iou) =
                self.model
                    .decode(be, &one, (self.size, self.size), p, out, &mut Trace::off())?;
            let iou = be.download(&iou)?;
            let best = (0..iou.numel())
                .max_by(|&a, &b| iou.data()[a].total_cmp(&iou.data()[b]))
                .unwrap_or(0);
            let low = be.narrow(&low, 1, best, 1)?;
            let m = be.download(&postprocess_masks(
                be,
                &low,
                (self.size, self.size),
                prep.input_size,
                prep.original_size,
            )?)?;
            let id = (k + 1).min(255) as u8;
            for (i, &v) in m.data().iter().enumerate() {
                if v > 0.0 {
                    labels[i] = id;
                }
                let s = 1.0 / (1.0 + (-v).exp());
                if s > prob[i] {
                    prob[i] = s;
                }
            }
        }
        Ok((labels, prob))
    }

    fn run_2d_batch(&self, batch: Vec<(Case, Loaded2d)>, summary: &mut Summary) {
        let be = self.be;
        let images: Vec<&Tensor> = batch.iter().map(|(_, l)| &l.prep.tensor).collect();
        let encoded = (|| -> Result<B::Tensor> {
            let mut data = Vec::with_capacity(images.len() * images[0].numel());
            for t in &images {
                data.extend_from_slice(t.data());
            }
            let x = be.upload(&Tensor::from_vec(
                data,
                &[images.len(), 3, self.size, self.size],
            )?)?;
            self.model.encode(be, &x, None, &mut Trace::off())
        })();
        let emb = match encoded {
            Ok(e) => e,
            Err(e) => {
                for (c, _) in batch {
                    summary
                        .cases
                        .push((c.name.clone(), Outcome::Failed(format!("encoder: {e}"))));
                }
                return;
            }
        };
        for (b, (case, l)) in batch.into_iter().enumerate() {
            let r = (|| -> Result<Outcome> {
                let (labels, prob) = self.decode(&emb, b, &l.prep, &l.prompts)?;
                let (h, w) = l.prep.original_size;
                pipeline::write_gray_png(&case.output, &labels, h, w)?;
                if self.opts.probabilities {
                    let p: Vec<u8> = prob.iter().map(|v| (v * 255.0).round() as u8).collect();
                    pipeline::write_gray_png(&sibling(&case.output, "_prob", ".png"), &p, h, w)?;
                }
                let scores = match &l.gt {
                    Some(gt) => {
                        let pred: Vec<bool> = labels.iter().map(|&v| v > 0).collect();
                        Some(metrics::scores(&pred, gt, &[h, w], &[1.0, 1.0])?)
                    }
                    None => None,
                };
                Ok(Outcome::Done { images: 1, scores })
            })();
            summary.cases.push((
                case.name.clone(),
                r.unwrap_or_else(|e| Outcome::Failed(e.to_string())),
            ));
        }
    }

    fn run_volume(&self, case: &Case) -> Result<Outcome> {
        let be = self.be;
        let vol = nifti::read_nifti(&case.image)?;
        let [nx, ny, nz] = vol.dims;
        let mut data = vol.data;
        self.opts.intensity.apply(&mut data);
        // Per-slice objects: (points (x, y, label), 2D box).
        type SliceObjs = Vec<Obj2d>;
        let mut per_slice: Vec<SliceObjs> = vec![Vec::new(); nz];
        for (k, o) in self.objects_of(case).iter().enumerate() {
            let mut slices: std::collections::BTreeMap<usize, Obj2d> = Default::default();
            for p in &o.points {
                check_inside(&case.name, &format!("object {k} point"), p[0], p[1], nx, ny)?;
                let z = p[2].round();
                if !(z >= 0.0 && z < nz as f32) {
                    return Err(Error::Input(format!(
                        "{}: object {k} point z = {} is outside 0..{}",
                        case.name,
                        p[2],
                        nz - 1
                    )));
                }
                if p[3] != 0.0 && p[3] != 1.0 {
                    return Err(Error::Input(format!(
                        "{}: object {k}: point label {} is not 0 or 1",
                        case.name, p[3]
                    )));
                }
                slices
                    .entry(z as usize)
                    .or_default()
                    .0
                    .push([p[0], p[1], p[3]]);
            }
            if let Some(b) = o.bbox {
                check_inside(
                    &case.name,
                    &format!("object {k} box corner"),
                    b[0],
                    b[1],
                    nx,
                    ny,
                )?;
                check_inside(
                    &case.name,
                    &format!("object {k} box corner"),
                    b[3],
                    b[4],
                    nx,
                    ny,
                )?;
                let (z0, z1) = (b[2].round(), b[5].round());
                if b[3] < b[0] || b[4] < b[1] || z1 < z0 || z0 < 0.0 || z1 >= nz as f32 {
                    return Err(Error::Input(format!(
                        "{}: object {k}: box {b:?} needs x0 <= x1, y0 <= y1 and 0 <= z0 <= z1 < {nz}",
                        case.name
                    )));
                }
                for z in z0 as usize..=z1 as usize {
                    slices.entry(z).or_default().1 = Some([b[0], b[1], b[3], b[4]]);
                }
            }
            for (z, obj) in slices {
                per_slice[z].push(obj);
            }
        }
        if let Some(fl) = self.label_rule_of(case) {
            let lab = nifti::read_nifti(&fl.path)?;
            if lab.dims != vol.dims {
                return Err(Error::Input(format!(
                    "{}: label {} has dims {:?}, the volume {:?}",
                    case.name,
                    fl.path.display(),
                    lab.dims,
                    vol.dims
                )));
            }
            for (z, slot) in per_slice.iter_mut().enumerate() {
                let plane: Vec<u32> = lab.data[z * nx * ny..(z + 1) * nx * ny]
                    .iter()
                    .map(|v| v.round().max(0.0) as u32)
                    .collect();
                if let Some((b, c)) = label_prompt(&plane, ny, nx, fl.id) {
                    slot.push((
                        if fl.click {
                            vec![[c[0], c[1], 1.0]]
                        } else {
                            vec![]
                        },
                        Some(b),
                    ));
                }
            }
        }
        if per_slice.iter().all(|s| s.is_empty()) {
            return Err(Error::Input(format!(
                "{}: no prompt on any slice",
                case.name
            )));
        }
        let gt = match self.gt_of(case) {
            Some(p) => {
                let g = nifti::read_nifti(&p)?;
                if g.dims != vol.dims {
                    return Err(Error::Input(format!(
                        "{}: ground truth {} has dims {:?}, the volume {:?}",
                        case.name,
                        p.display(),
                        g.dims,
                        vol.dims
                    )));
                }
                Some(
                    g.data
                        .iter()
                        .map(|&v| {
                            self.opts
                                .label_id
                                .map_or(v > 0.5, |id| v.round() == id as f32)
                        })
                        .collect::<Vec<bool>>(),
                )
            }
            None => None,
        };
        let mut labels = vec![0u8; nx * ny * nz];
        let mut prob = vec![
            0f32;
            if self.opts.probabilities {
                nx * ny * nz
            } else {
                0
            }
        ];
        let has_depth = self.model.config.has_depth_branch();
        let mut encoded = 0;
        for k0 in (0..nz).step_by(self.opts.chunk) {
            let d = self.opts.chunk.min(nz - k0);
            if per_slice[k0..k0 + d].iter().all(|s| s.is_empty()) {
                continue;
            }
            let mut preps = Vec::with_capacity(d);
            let mut batch = Vec::with_capacity(d * 3 * self.size * self.size);
            for z in k0..k0 + d {
                let plane = &data[z * nx * ny..(z + 1) * nx * ny];
                let img = RgbImage {
                    height: ny,
                    width: nx,
                    data: plane.iter().flat_map(|&v| [v * 255.0; 3]).collect(),
                };
                let prep = pipeline::prepare(&img, self.size, self.opts.volume_preset)?;
                batch.extend_from_slice(prep.tensor.data());
                preps.push(prep);
            }
            let x = be.upload(&Tensor::from_vec(batch, &[d, 3, self.size, self.size])?)?;
            let depth = (has_depth && d > 1).then_some(DepthSpec {
                d,
                mode: self.opts.depth_mode,
            });
            let emb = self.model.encode(be, &x, depth, &mut Trace::off())?;
            encoded += d;
            for (b, z) in (k0..k0 + d).enumerate() {
                if per_slice[z].is_empty() {
                    continue;
                }
                let prompts = object_prompts(&per_slice[z], &preps[b])?;
                let (lab, pr) = self.decode(&emb, b, &preps[b], &prompts)?;
                labels[z * nx * ny..(z + 1) * nx * ny].copy_from_slice(&lab);
                if self.opts.probabilities {
                    prob[z * nx * ny..(z + 1) * nx * ny].copy_from_slice(&pr);
                }
            }
        }
        nifti::write_labels(&case.output, &vol.header, &labels)?;
        if self.opts.probabilities {
            let ext = if case.output.to_string_lossy().ends_with(".gz") {
                ".nii.gz"
            } else {
                ".nii"
            };
            nifti::write_f32(&sibling(&case.output, "_prob", ext), &vol.header, &prob)?;
        }
        if self.opts.overview {
            let slices: Vec<usize> = (0..nz).filter(|&z| !per_slice[z].is_empty()).collect();
            write_overview(
                &sibling(&case.output, "_overview", ".png"),
                &data,
                &labels,
                [nx, ny, nz],
                &slices,
            )?;
        }
        let scores = match gt {
            Some(g) => {
                let sp = vol.header.spacing();
                let pred: Vec<bool> = labels.iter().map(|&v| v > 0).collect();
                Some(metrics::scores(
                    &pred,
                    &g,
                    &[nz, ny, nx],
                    &[sp[2], sp[1], sp[0]],
                )?)
            }
            None => None,
        };
        Ok(Outcome::Done {
            images: encoded,
            scores,
        })
    }

    /// Runs every case; never stops on a bad case.
    pub fn run(&self, cases: Vec<Case>) -> Summary {
        let start = Instant::now();
        let mut summary = Summary::default();
        let progress = Progress::new(cases.len(), self.opts.quiet);
        let mut pending: Vec<(Case, Loaded2d)> = Vec::new();
        let mut images = 0usize;
        let total = cases.len();
        // Cases are read and preprocessed on a second thread while the model runs.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Case, Option<Result<Loaded2d>>)>(
            self.opts.batch_size.max(2),
        );
        std::thread::scope(|s| {
            let opts = &self.opts;
            let loader = &*self;
            s.spawn(move || {
                for case in cases {
                    let skip = opts.skip_existing && case.output.exists();
                    let item = if skip || is_nifti(&case.image) {
                        None
                    } else {
                        Some(loader.load_2d(&case))
                    };
                    if tx.send((case, item)).is_err() {
                        break;
                    }
                }
            });
            let mut done = 0usize;
            let flush = |pending: &mut Vec<(Case, Loaded2d)>, summary: &mut Summary| {
                if !pending.is_empty() {
                    self.run_2d_batch(std::mem::take(pending), summary);
                }
            };
            for (case, item) in rx {
                if self.opts.skip_existing && case.output.exists() {
                    summary.cases.push((case.name.clone(), Outcome::Skipped));
                } else if let Err(e) = ensure_parent(&case.output) {
                    summary
                        .cases
                        .push((case.name.clone(), Outcome::Failed(e.to_string())));
                } else if is_nifti(&case.image) {
                    let r = self
                        .run_volume(&case)
                        .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
                    summary.cases.push((case.name.clone(), r));
                } else {
                    match item.expect("2D cases are loaded by the reader thread") {
                        Ok(l) => {
                            pending.push((case, l));
                            if pending.len() >= self.opts.batch_size {
                                flush(&mut pending, &mut summary);
                            }
                        }
                        Err(e) => summary
                            .cases
                            .push((case.name.clone(), Outcome::Failed(e.to_string()))),
                    }
                }
                done += 1;
                images = summary.images();
                progress.show(
                    done.min(total),
                    images,
                    summary.cases.last().map(|c| c.0.as_str()).unwrap_or(""),
                );
            }
            flush(&mut pending, &mut summary);
        });
        progress.finish();
        summary.seconds = start.elapsed().as_secs_f64();
        summary
    }
}

/// The label file of `image` inside folder `dir`: the same base name with any supported
/// extension (`.png`, `.nii.gz`, `.nii`), else the image's own file name.
fn find_label(dir: &Path, image: &Path) -> PathBuf {
    let s = stem(image);
    for ext in [".png", ".nii.gz", ".nii"] {
        let p = dir.join(format!("{s}{ext}"));
        if p.exists() {
            return p;
        }
    }
    dir.join(image.file_name().unwrap_or_default())
}

fn sibling(out: &Path, suffix: &str, ext: &str) -> PathBuf {
    out.with_file_name(format!("{}{suffix}{ext}", stem(out)))
}

fn ensure_parent(p: &Path) -> Result<()> {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => {
            std::fs::create_dir_all(d).map_err(|source| Error::Io {
                path: d.into(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// A montage of up to 6 slices (those given, evenly picked) with the mask overlaid in red.
fn write_overview(
    path: &Path,
    data: &[f32],
    labels: &[u8],
    dims: [usize; 3],
    slices: &[usize],
) -> Result<()> {
    let [nx, ny, nz] = dims;
    let pick: Vec<usize> = if slices.is_empty() {
        vec![nz / 2]
    } else {
        let n = slices.len().min(6);
        (0..n)
            .map(|i| slices[i * (slices.len() - 1) / (n - 1).max(1)])
            .collect()
    };
    let (w, h) = (nx * pick.len(), ny);
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for (t, &z) in pick.iter().enumerate() {
        for j in 0..ny {
            for i in 0..nx {
                let idx = z * nx * ny + j * nx + i;
                let g = data[idx].clamp(0.0, 1.0) * 255.0;
                let px = if labels[idx] > 0 {
                    [
                        (0.6 * g + 0.4 * 255.0) as u8,
                        (0.6 * g) as u8,
                        (0.6 * g) as u8,
                    ]
                } else {
                    [g as u8; 3]
                };
                // Row j = 0 at the bottom: radiological slices are displayed with j increasing upwards.
                img.put_pixel((t * nx + i) as u32, (ny - 1 - j) as u32, image::Rgb(px));
            }
        }
    }
    pipeline::write_png_atomic(path, &image::DynamicImage::ImageRgb8(img))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intensity_presets_parse_and_map() {
        let mut v = vec![-1000.0, -175.0, 37.5, 250.0, 3000.0];
        Intensity::parse("ct").unwrap().apply(&mut v);
        assert_eq!(v, vec![0.0, 0.0, 0.5, 1.0, 1.0]);
        assert_eq!(
            Intensity::parse("window:0,10").unwrap(),
            Intensity::Window(0.0, 10.0)
        );
        assert!(Intensity::parse("window:10,0").is_err());
        assert!(Intensity::parse("mr:-1,50").is_err());
        assert!(Intensity::parse("bogus").is_err());
    }

    #[test]
    fn sharding_covers_every_case_once() {
        let cases: Vec<Case> = (0..11)
            .map(|i| {
                let p = PathBuf::from(format!("/x/c{i:02}.png"));
                Case {
                    name: stem(&p),
                    output: output_for(&p, Path::new("/o")),
                    image: p,
                    objects: vec![],
                    from_label: None,
                    ground_truth: None,
                }
            })
            .collect();
        let mut seen: Vec<String> = Vec::new();
        for part in 0..3 {
            seen.extend(
                shard(cases.clone(), 3, part)
                    .unwrap()
                    .into_iter()
                    .map(|c| c.name),
            );
        }
        seen.sort();
        let mut all: Vec<String> = cases.iter().map(|c| c.name.clone()).collect();
        all.sort();
        assert_eq!(seen, all);
        assert!(shard(cases, 3, 3).is_err());
    }

    #[test]
    fn names_and_outputs_keep_the_base_name() {
        assert_eq!(stem(Path::new("/a/ct_001.nii.gz")), "ct_001");
        assert_eq!(
            output_for(Path::new("/a/ct_001.nii.gz"), Path::new("/o")),
            PathBuf::from("/o/ct_001.nii.gz")
        );
        assert_eq!(
            output_for(Path::new("/a/x.jpeg"), Path::new("/o")),
            PathBuf::from("/o/x.png")
        );
        assert_eq!(
            sibling(Path::new("/o/ct.nii.gz"), "_prob", ".nii.gz"),
            PathBuf::from("/o/ct_prob.nii.gz")
        );
    }

    #[test]
    fn label_prompt_box_and_click_inside() {
        // An L-shaped structure: the centroid is outside it, the click must not be.
        let (h, w) = (6, 6);
        let mut plane = vec![0u32; h * w];
        for y in 1..5 {
            plane[y * w + 1] = 3;
        }
        for x in 1..5 {
            plane[4 * w + x] = 3;
        }
        let (b, c) = label_prompt(&plane, h, w, 3).unwrap();
        assert_eq!(b, [1.0, 1.0, 4.0, 4.0]);
        assert_eq!(plane[c[1] as usize * w + c[0] as usize], 3);
        assert!(label_prompt(&plane, h, w, 7).is_none());
    }

    #[test]
    fn manifest_parses_objects_and_reports_bad_fields() {
        let dir = std::env::temp_dir().join(format!("medsa-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = dir.join("m.json");
        std::fs::write(
            &m,
            r#"{"cases": [{"image": "a.png", "points": [[1, 2], [3, 4, 0]], "box": [0, 0, 5, 5]},
                          {"image": "v.nii.gz", "objects": [{"box": [1, 1, 0, 4, 4, 2]}], "label": "gt/v.nii.gz"}]}"#,
        )
        .unwrap();
        let c = read_manifest(&m, Path::new("/out")).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].objects[0].points,
            vec![[1.0, 2.0, 0.0, 1.0], [3.0, 4.0, 0.0, 0.0]]
        );
        assert_eq!(c[0].objects[0].bbox, Some([0.0, 0.0, 0.0, 5.0, 5.0, 0.0]));
        assert_eq!(c[1].output, PathBuf::from("/out/v.nii.gz"));
        assert_eq!(c[1].ground_truth, Some(dir.join("gt/v.nii.gz")));
        std::fs::write(&m, r#"[{"image": "a.png", "box": [1, 2, 3]}]"#).unwrap();
        let e = read_manifest(&m, Path::new("/out"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.json") && e.contains("case 0") && e.contains("box"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
