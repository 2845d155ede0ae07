//! The checking subcommands: `eval` (Dice, IoU and HD95 of predicted masks against ground
//! truth) and `selftest` (a backend against the CPU reference, op by op and on the golden
//! fixtures).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use medsa::backend::Backend;
use medsa::batch;
use medsa::selftest;

use crate::device::{on_device, open_device};

pub(super) fn selftest(device: &str, precision: &str, fixtures: &Path) -> Result<()> {
    let precisions: Vec<&str> = match precision {
        "both" => vec!["f32", "bf16"],
        p => vec![p],
    };
    let mut failed = 0;
    for p in precisions {
        let dev = open_device(device, p, &medsa::backend::RunOptions::default())?;
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
    let img = medsa::pipeline::decode_image(path, "mask")?.to_luma16();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((img.into_raw().into_iter().map(|v| v > 0).collect(), [h, w]))
}

pub(super) fn eval(pred: &Path, gt: &Path, spacing: &str, out: Option<&Path>) -> Result<()> {
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
