//! `segment --propagate` end to end with the real LiteMedSAM on a synthetic volume whose answer
//! is known: two bright ellipsoids in noise. One box on one slice must recover the first
//! ellipsoid's extent to within a slice at each end; a 3D box bounds the second; the two are
//! labelled separately; a click refines only the slices it should; `--propagate-max-slices`
//! stops the walk; and the masks do not depend on whether a label file exists.
//!
//! Needs the LiteMedSAM checkpoint (`scripts/fetch-litemedsam.sh`, run by `scripts/test.sh`);
//! without it the tests say so and pass, unless `MEDSA_LITEMEDSAM` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use medsa::backend::cpu::Cpu;
use medsa::batch::{read_manifest, Intensity, Job, JobOptions, Propagation};
use medsa::data::nifti::{read_nifti, NiftiVolume};
use medsa::medsa::depth_branch::DepthMode;
use medsa::pipeline::Preset;
use medsa::sam::Sam;
use medsa::weights::WeightStore;

const DIMS: [usize; 3] = [64, 64, 24];

/// Ellipsoids: centre (x, y, z) and semi-axes in voxels.
const E1: ([f32; 3], [f32; 3]) = ([20.0, 32.0, 12.0], [10.0, 12.0, 8.0]);
const E2: ([f32; 3], [f32; 3]) = ([46.0, 30.0, 11.0], [9.0, 9.0, 6.0]);

fn inside(e: ([f32; 3], [f32; 3]), x: usize, y: usize, z: usize) -> bool {
    let (c, r) = e;
    let d = |v: usize, i: usize| (v as f32 - c[i]) / r[i];
    d(x, 0).powi(2) + d(y, 1).powi(2) + d(z, 2).powi(2) <= 1.0
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

fn run(c: &mut Command) -> (bool, String) {
    let o = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (o.status.success(), text)
}

/// The converted checkpoint in `dir`, or `None` (with the reason printed) without LiteMedSAM.
fn litemedsam(dir: &Path) -> Option<PathBuf> {
    let pth = common::litemedsam_pth()?;
    let st = dir.join("lite_medsam.safetensors");
    if !st.exists() {
        let (ok, text) = run(bin().arg("convert").arg(&pth).arg(&st));
        assert!(ok, "{text}");
    }
    Some(st)
}

/// Writes the volume (float32, bright ellipsoids at 180 in noise around 40) and its label map
/// (1 and 2) into `dir`.
fn write_volume(dir: &Path) -> PathBuf {
    let [nx, ny, nz] = DIMS;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut data = Vec::with_capacity(4 * nx * ny * nz);
    let mut lab = Vec::with_capacity(nx * ny * nz);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (a, b) = (inside(E1, x, y, z), inside(E2, x, y, z));
                let v = if a || b { 180.0f32 } else { 40.0 } + 40.0 * noise();
                data.extend_from_slice(&v.to_le_bytes());
                lab.push(if a {
                    1u8
                } else if b {
                    2
                } else {
                    0
                });
            }
        }
    }
    let img = dir.join("vol.nii");
    write_nifti(&img, 16, 32, &data);
    std::fs::create_dir_all(dir.join("gt")).unwrap();
    write_nifti(&dir.join("gt/vol.nii"), 2, 8, &lab);
    img
}

/// A little-endian NIfTI-1 file of `DIMS` with 1 mm voxels.
fn write_nifti(path: &Path, datatype: i16, bitpix: i16, data: &[u8]) {
    let mut b = common::nifti_header(DIMS, datatype, bitpix);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

/// Slices (z) where `vol` has label `id`.
fn extent(v: &NiftiVolume, id: u8) -> Option<(usize, usize)> {
    let [nx, ny, nz] = v.dims;
    let zs: Vec<usize> = (0..nz)
        .filter(|&z| {
            v.data[z * nx * ny..(z + 1) * nx * ny]
                .iter()
                .any(|&x| x.round() as u8 == id)
        })
        .collect();
    Some((*zs.first()?, *zs.last()?))
}

fn dice(a: &NiftiVolume, b: &NiftiVolume, id: u8) -> f64 {
    let (mut inter, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (x, y) in a.data.iter().zip(&b.data) {
        let (p, q) = (x.round() as u8 == id, y.round() as u8 == id);
        inter += (p && q) as usize;
        na += p as usize;
        nb += q as usize;
    }
    2.0 * inter as f64 / (na + nb).max(1) as f64
}

/// Label `id` on slice `z` as booleans.
fn plane(v: &NiftiVolume, id: u8, z: usize) -> Vec<bool> {
    let n = v.dims[0] * v.dims[1];
    v.data[z * n..(z + 1) * n]
        .iter()
        .map(|&x| x.round() as u8 == id)
        .collect()
}

const OBJ1: &str = r#"{"box": [10, 20, 12, 30, 44, 12]}"#;
const OBJ2: &str = r#"{"box": [37, 21, 8, 55, 39, 14]}"#;

#[test]
fn one_box_segments_the_whole_structure_and_clicks_refine_it() {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("propagate");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let Some(model) = litemedsam(&d) else { return };
    write_volume(&d);
    // The negative click sits inside the first ellipsoid on slice 12, near its left edge.
    let click = r#"{"box": [10, 20, 12, 30, 44, 12],
                    "interactions": [{"points": [[13, 32, 12, 0]], "propagate": PROP}]}"#;
    let manifest = format!(
        r#"[{{"image": "vol.nii", "output": "base.nii.gz", "objects": [{OBJ1}, {OBJ2}]}},
            {{"image": "vol.nii", "output": "local.nii.gz", "objects": [{}, {OBJ2}]}},
            {{"image": "vol.nii", "output": "repropagated.nii.gz", "objects": [{}, {OBJ2}]}}]"#,
        click.replace("PROP", "false"),
        click.replace("PROP", "true")
    );
    std::fs::write(d.join("cases.json"), manifest).unwrap();
    let out = d.join("out");
    // Through the library's batch job (what `segment --propagate` runs), so the model runs at
    // the test profile's optimisation: the command line is covered by the test below.
    let be = Cpu::new();
    let model = Sam::from_store(&be, &mut WeightStore::open(&model).unwrap()).unwrap();
    let opts = JobOptions {
        preset: Preset::LiteMedsam,
        volume_preset: Preset::LiteMedsam,
        intensity: Intensity::parse("window:0,255").unwrap(),
        chunk: 1,
        depth_mode: DepthMode::default(),
        batch_size: 1,
        skip_existing: false,
        multimask: false,
        probabilities: false,
        overview: false,
        global_objects: vec![],
        global_from_label: None,
        labels: None,
        label_id: None,
        quiet: true,
        out_dir: out.clone(),
        propagate: Some(Propagation::default()),
    };
    let cases = read_manifest(&d.join("cases.json"), &out).unwrap();
    let t0 = std::time::Instant::now();
    let summary = Job::new(&be, &model, opts).unwrap().run(cases);
    eprintln!(
        "3 propagated cases in {:.1} s, {} slices encoded",
        t0.elapsed().as_secs_f64(),
        summary.images()
    );
    assert_eq!(summary.failed(), 0, "{:?}", summary.cases);
    let gt = read_nifti(&d.join("gt/vol.nii")).unwrap();
    let base = read_nifti(&out.join("base.nii.gz")).unwrap();
    // Object 1: from one box on slice 12 to the ellipsoid's extent, within a slice at each end.
    let (t0, t1) = extent(&gt, 1).unwrap();
    let (p0, p1) = extent(&base, 1).expect("object 1 segmented");
    assert!(
        p0.abs_diff(t0) <= 1 && p1.abs_diff(t1) <= 1,
        "object 1 spans slices {p0}..={p1}, the ellipsoid {t0}..={t1}"
    );
    let d1 = dice(&base, &gt, 1);
    assert!(d1 > 0.8, "object 1 Dice {d1}");
    // Object 2: its 3D box's slices bound the walk, and it keeps its own label.
    assert_eq!(extent(&base, 2), Some((8, 14)));
    let [nx, ny, _] = DIMS;
    for z in 8..=14 {
        let got = plane(&base, 2, z);
        let want: Vec<bool> = (0..nx * ny)
            .map(|i| inside(E2, i % nx, i / nx, z))
            .collect();
        let inter = got.iter().zip(&want).filter(|(a, b)| **a && **b).count();
        let n = got.iter().filter(|a| **a).count() + want.iter().filter(|a| **a).count();
        assert!(
            2.0 * inter as f64 / n as f64 > 0.8,
            "object 2 on slice {z}: Dice {}",
            2.0 * inter as f64 / n as f64
        );
    }
    // A click with "propagate": false changes slice 12 of object 1 and nothing else.
    let local = read_nifti(&out.join("local.nii.gz")).unwrap();
    for z in 0..DIMS[2] {
        let same = plane(&local, 1, z) == plane(&base, 1, z);
        assert_eq!(same, z != 12, "object 1 on slice {z}: changed = {}", !same);
        assert_eq!(
            plane(&local, 2, z),
            plane(&base, 2, z),
            "object 2, slice {z}"
        );
    }
    // A background click can only take pixels away (LiteMedSAM, trained on boxes, takes few).
    let area = |v: &NiftiVolume| plane(v, 1, 12).iter().filter(|p| **p).count();
    assert!(
        area(&local) < area(&base),
        "{} vs {}",
        area(&local),
        area(&base)
    );
    // Re-propagated: slice 12 as the local refinement, the walk from it redone, object 2
    // untouched.
    let rep = read_nifti(&out.join("repropagated.nii.gz")).unwrap();
    assert_eq!(plane(&rep, 1, 12), plane(&local, 1, 12));
    for z in 0..DIMS[2] {
        assert_eq!(plane(&rep, 2, z), plane(&base, 2, z), "object 2, slice {z}");
    }
    let r = extent(&rep, 1).unwrap();
    assert!(r.0.abs_diff(t0) <= 1 && r.1.abs_diff(t1) <= 1, "{r:?}");
}

#[test]
fn the_walk_stops_at_max_slices_and_reads_no_label() {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("propagate-stop");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let Some(model) = litemedsam(&d) else { return };
    let img = write_volume(&d);
    let segment = |out: &str, extra: &[&str]| {
        let mut c = bin();
        c.arg("segment")
            .arg("--checkpoint")
            .arg(&model)
            .arg("-i")
            .arg(&img)
            .arg("-o")
            .arg(d.join(out))
            .args(["--box", "10,20,12,30,44,12", "--propagate", "--chunk", "1"])
            .args(["--intensity", "window:0,255", "--quiet"])
            .args(extra);
        let (ok, text) = run(&mut c);
        assert!(ok, "{text}");
        read_nifti(&d.join(out).join("vol.nii")).unwrap()
    };
    let v = segment("short", &["--propagate-max-slices", "2"]);
    assert_eq!(extent(&v, 1), Some((10, 14)));
    // Ground truth given for scoring changes nothing in the masks.
    let gt = d.join("gt");
    let w = segment(
        "scored",
        &[
            "--propagate-max-slices",
            "2",
            "--labels",
            gt.to_str().unwrap(),
        ],
    );
    assert_eq!(v.data, w.data);
    let csv = std::fs::read_to_string(d.join("scored/metrics.csv")).unwrap();
    assert!(csv.starts_with("case,dice,iou,hd95\nvol,"), "{csv}");
    // Prompts from a label are refused with --propagate: no ground truth on this path.
    let (ok, text) = run(bin()
        .arg("segment")
        .arg("--checkpoint")
        .arg(&model)
        .arg("-i")
        .arg(&img)
        .arg("-o")
        .arg(d.join("refused"))
        .args(["--propagate", "--label-id", "1", "--quiet"])
        .arg("--prompt-from-label")
        .arg(&gt));
    assert!(!ok && text.contains("--prompt-from-label"), "{text}");
    // Interactions need --propagate.
    std::fs::write(
        d.join("m.json"),
        r#"[{"image": "vol.nii", "objects": [{"box": [10, 20, 12, 30, 44, 12],
             "interactions": [{"points": [[13, 32, 12, 0]]}]}]}]"#,
    )
    .unwrap();
    let (ok, text) = run(bin()
        .arg("segment")
        .arg("--checkpoint")
        .arg(&model)
        .arg("-i")
        .arg(d.join("m.json"))
        .arg("-o")
        .arg(d.join("no-prop"))
        .arg("--quiet"));
    assert!(!ok && text.contains("run with --propagate"), "{text}");
}
