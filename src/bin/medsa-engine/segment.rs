//! The `segment` subcommand: batch mode (`-i`/`-o`: files, folders, manifests, 2D and volumes,
//! through `medsa::batch`) and single-image mode (`--image`/`--out`: one mask PNG from
//! `--point`/`--box` prompts).

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use medsa::backend::Backend;
use medsa::batch;
use medsa::pipeline;
use medsa::sam::model::postprocess_masks;
use medsa::sam::{MaskOutput, Prompts, Trace};
use medsa::Tensor;

use crate::cli::{depth_mode_of, preset_arg, preset_of, PresetArg, SegmentArgs};
use crate::device::{CliSource, ModelSource};

fn parse_floats(s: &str, what: &str, n: &[usize]) -> Result<Vec<f32>> {
    Ok(batch::parse_numbers(s, what, n)?)
}

pub(super) fn segment_cmd<B: Backend>(be: &B, a: &SegmentArgs) -> Result<()> {
    // An adapter (or a merged model) records how its training data was preprocessed; that is
    // the default here.
    let src = ModelSource::of(a);
    let meta = src.meta()?;
    let arch_preset = medsa::meta::architecture_preset_of(&a.checkpoint);
    let meta_preset = meta.preset.or(arch_preset).map(preset_arg);
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
            &src,
            &meta,
            image,
            &a.points,
            a.bbox.as_deref(),
            out,
            a.multimask,
            a.preset.or(meta_preset).unwrap_or(PresetArg::Sam),
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
    let label_id = a.label_id.or(meta.label_id);
    if a.propagate && a.prompt_from_label.is_some() {
        bail!(
            "--propagate segments from the prompts you give; --prompt-from-label (prompts from \
             the ground truth) is for evaluation without it"
        );
    }
    if a.prompt_from_label.is_some() && label_id.is_none() {
        bail!("--prompt-from-label needs --label-id N (the model's metadata names no label)");
    }
    let model = src.load(be, &meta)?;
    let d = medsa::runtime::ModelDefaults::of(&src, &meta, model.config.decoder_flavour)?;
    let opts = batch::JobOptions {
        preset: a.preset.map(preset_of).unwrap_or(d.preset),
        volume_preset: a.volume_preset.map(preset_of).unwrap_or(d.volume_preset),
        intensity: match &a.intensity {
            Some(i) => batch::Intensity::parse(i)?,
            None => d.intensity,
        },
        chunk: a.chunk,
        depth_mode: match a.depth_mode {
            Some(m) => depth_mode_of(m),
            None => d.depth_mode,
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
        out_dir: out_dir.clone(),
        propagate: a.propagate.then_some(batch::Propagation {
            margin: a.propagate_margin,
            min_area: a.propagate_min_area,
            min_iou: a.propagate_min_iou,
            min_stability: a.propagate_min_stability,
            max_slices: a.propagate_max_slices,
            mask_input: a.propagate_mask_input,
        }),
        global_from_label: a
            .prompt_from_label
            .clone()
            .map(|p| (p, label_id.unwrap_or(1), a.click)),
        labels: a.labels.clone(),
        label_id,
        quiet: a.quiet,
    };
    // Say which defaults the model's own metadata supplied, so a run is never silently fed
    // differently from how the model was trained (or from what the user assumed).
    let mut from_meta = Vec::new();
    if a.intensity.is_none() {
        if let Some(i) = meta.intensity {
            from_meta.push(format!(
                "intensity {}",
                medsa::train::checkpoint::intensity_name(i)
            ));
        }
    }
    if a.preset.is_none() && a.volume_preset.is_none() {
        if let Some(p) = meta.preset {
            from_meta.push(format!(
                "preset {}",
                medsa::train::checkpoint::preset_name(p)
            ));
        } else if let Some(p) = arch_preset {
            from_meta.push(format!(
                "preset {} (the architecture's own: no preset in the metadata)",
                medsa::train::checkpoint::preset_name(p)
            ));
        }
    }
    if a.label_id.is_none() {
        if let Some(l) = meta.label_id {
            from_meta.push(format!("label id {l}"));
        }
    }
    if !from_meta.is_empty() {
        eprintln!(
            "segment: from the model's metadata: {} (the options --intensity, --preset / --volume-preset, --label-id override them)",
            from_meta.join(", ")
        );
    }
    let cases = batch::shard(batch::discover(input, out_dir)?, a.num_parts, a.part_id)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}", out_dir.display()))?;
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
    meta: &medsa::meta::ModelMeta,
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
    let model = src.load(be, meta)?;
    let (sh, sw) = model.config.img_size();
    if sh != sw {
        bail!(
            "{}: non-square native input {sh}x{sw} is not supported by segment",
            src.checkpoint.display()
        );
    }
    let img = pipeline::load_image(image)?;
    let prep = pipeline::prepare(&img, sh, preset_of(preset))?;
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
