//! The `forward` subcommand: the model on raw input tensors (.safetensors in), every output
//! tensor out, for parity checks against the PyTorch reference.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use medsa::backend::Backend;
use medsa::medsa::depth_branch::DepthMode;
use medsa::sam::model::postprocess_masks;
use medsa::sam::{DepthSpec, MaskOutput, Prompts, Trace};
use medsa::weights::{save_safetensors, SafetensorsFile};
use medsa::Tensor;

use crate::cli::{depth_mode_of, DepthModeArg};
use crate::device::{CliSource, ModelSource};

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
pub(super) fn forward<B: Backend>(
    be: &B,
    src: &ModelSource,
    inputs: &Path,
    out: &Path,
    multimask: Option<bool>,
    classes: Option<usize>,
    depth: Option<usize>,
    depth_mode: Option<DepthModeArg>,
    input_size: Option<String>,
    original_size: Option<String>,
) -> Result<()> {
    let model_meta = src.meta()?;
    let model = src.load(be, &model_meta)?;
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
        None => match f.contains("depth") {
            // Any float or integer dtype, as the reference code writes it; one whole number.
            true => {
                let t = f.tensor_numeric("depth")?;
                match t.data() {
                    [v] if v.fract() == 0.0 && *v >= 0.0 => *v as usize,
                    other => bail!(
                        "{}: tensor `depth` is {other:?}: expected one whole number of slices per volume",
                        inputs.display()
                    ),
                }
            }
            false => meta.get("depth").and_then(|v| v.parse().ok()).unwrap_or(0),
        },
    };
    let mode = match (depth_mode, meta.get("depth_mode").map(|s| s.as_str())) {
        (Some(m), _) => depth_mode_of(m),
        (None, Some("compat")) => DepthMode::Compat,
        (None, Some("per_token" | "per-token")) => DepthMode::PerToken,
        (None, _) => model_meta.depth_mode_or(model.config.decoder_flavour),
    };
    let depth = (d > 0).then_some(DepthSpec { d, mode });
    // Classes: the option, else the inputs' `classes` metadata, else the model's recorded
    // class count when it has more than one; otherwise SAM's single / multimask output.
    let classes = match classes {
        Some(n) => n,
        None => match meta.get("classes") {
            Some(v) => v.parse().map_err(|_| {
                anyhow!(
                    "{}: metadata `classes` = \"{v}\": expected a whole number",
                    inputs.display()
                )
            })?,
            None => model_meta.num_classes.filter(|&n| n > 1).unwrap_or(0),
        },
    };
    let output = if classes > 0 {
        MaskOutput::Classes(classes)
    } else {
        MaskOutput::from_multimask(multimask)
    };
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
    let o = model.forward(be, &images, &prompts, output, depth, &mut Trace::off())?;
    let low = be.upload(&o.low_res_masks)?;
    let masks = be.download(&postprocess_masks(be, &low, hw, input_size, original_size)?)?;
    let mut md = HashMap::new();
    md.insert("multimask_output".to_string(), multimask.to_string());
    md.insert("classes".to_string(), classes.to_string());
    md.insert("depth".to_string(), d.to_string());
    if let Some(dp) = depth {
        md.insert(
            "depth_mode".to_string(),
            medsa::meta::depth_mode_name(dp.mode).to_string(),
        );
    }
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
