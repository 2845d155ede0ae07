//! End-to-end tests of `medsa-engine segment` in batch mode: PNG folders and NIfTI volumes in,
//! masks on the input's grid out; a corrupt case is reported while the others complete;
//! `--skip-existing` resumes; sharding covers every case exactly once; metrics with --labels.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use medsa::data::nifti::read_nifti;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medsa-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn root() -> PathBuf {
    common::fixtures_dir()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "panic: {text}");
    (o.status.success(), text)
}

fn segment(input: &Path, out: &Path, model: &str) -> Command {
    let mut c = bin();
    c.arg("segment")
        .arg("--checkpoint")
        .arg(common::fixture(model, "weights"))
        .arg("-i")
        .arg(input)
        .arg("-o")
        .arg(out)
        .arg("--quiet");
    c
}

fn png_folder(dir: &Path, n: usize, corrupt: bool) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        std::fs::copy(
            root().join("examples/phantom.png"),
            dir.join(format!("case{i}.png")),
        )
        .unwrap();
    }
    if corrupt {
        std::fs::write(
            dir.join("broken.png"),
            b"\x89PNG\r\n\x1a\nthis is not a png",
        )
        .unwrap();
    }
}

#[test]
fn png_batch_keeps_going_past_a_corrupt_case_and_resumes() {
    let d = tmpdir("png");
    let (inp, out) = (d.join("in"), d.join("out"));
    png_folder(&inp, 2, true);
    let (ok, text) =
        run(segment(&inp, &out, "tiny").args(["--point", "128,80", "--batch-size", "2"]));
    assert!(!ok, "a failed case must make the run fail: {text}");
    assert!(
        text.contains("2 of 3 cases done, 0 skipped, 1 failed"),
        "{text}"
    );
    assert!(text.contains("failed: broken"), "{text}");
    for i in 0..2 {
        let m = image::open(out.join(format!("case{i}.png")))
            .unwrap()
            .to_luma8();
        assert_eq!((m.width(), m.height()), (192, 160));
        assert!(m.pixels().all(|p| p.0[0] <= 1), "label ids 0/1 expected");
    }
    assert!(!out.join("broken.png").exists());
    // Resume: case0's output is kept, case1's is redone.
    std::fs::remove_file(out.join("case1.png")).unwrap();
    let before = std::fs::metadata(out.join("case0.png"))
        .unwrap()
        .modified()
        .unwrap();
    let (_, text) = run(segment(&inp, &out, "tiny").args(["--point", "128,80", "--skip-existing"]));
    assert!(
        text.contains("1 of 3 cases done, 1 skipped, 1 failed"),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(out.join("case0.png"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    assert!(out.join("case1.png").exists());
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter().all(|n| !n.to_string_lossy().contains(".tmp")),
        "{left:?}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn sharding_covers_every_case_exactly_once() {
    let d = tmpdir("shard");
    let inp = d.join("in");
    png_folder(&inp, 5, false);
    let mut all = Vec::new();
    for part in 0..3 {
        let out = d.join(format!("out{part}"));
        let (ok, text) = run(segment(&inp, &out, "tiny_plain").args([
            "--point",
            "60,78",
            "--num-parts",
            "3",
            "--part-id",
            &part.to_string(),
        ]));
        assert!(ok, "{text}");
        all.extend(
            std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned()),
        );
    }
    all.sort();
    assert_eq!(
        all,
        (0..5).map(|i| format!("case{i}.png")).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(d);
}

/// 7x6x5 volumes: a box over slices 1..=3 with the SD-Trans depth branch in chunks of 2.
const VOLUME_ARGS: [&str; 7] = [
    "--box",
    "1,1,1,5,4,3",
    "--chunk",
    "2",
    "--intensity",
    "mr",
    "--probabilities",
];

#[test]
fn volumes_of_several_datatypes_keep_dims_and_affine() {
    let d = tmpdir("nii");
    let inp = d.join("in");
    std::fs::create_dir_all(&inp).unwrap();
    let nifti = common::fixtures_dir().join("nifti");
    for f in [
        "oblique_float32.nii",
        "dtype_int16.nii",
        "dtype_uint8.nii",
        "gzip_float32.nii.gz",
        "bigendian_int16.nii",
    ] {
        std::fs::copy(nifti.join(f), inp.join(f)).unwrap();
    }
    let out = d.join("out");
    let (ok, text) = run(segment(&inp, &out, "volume").args(VOLUME_ARGS));
    assert!(ok, "{text}");
    assert!(text.contains("5 of 5 cases done"), "{text}");
    for f in [
        "oblique_float32.nii",
        "dtype_int16.nii",
        "dtype_uint8.nii",
        "gzip_float32.nii.gz",
        "bigendian_int16.nii",
    ] {
        let src = read_nifti(&inp.join(f)).unwrap();
        let m = read_nifti(&out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.dims, src.dims, "{f}");
        assert_eq!(m.header.affine(), src.header.affine(), "{f}");
        assert_eq!(m.header.spacing(), src.header.spacing(), "{f}");
        assert_eq!(
            (m.header.qform_code(), m.header.sform_code()),
            (src.header.qform_code(), src.header.sform_code()),
            "{f}"
        );
        let [nx, ny, _] = m.dims;
        for z in [0usize, 4] {
            assert!(
                m.data[z * nx * ny..(z + 1) * nx * ny]
                    .iter()
                    .all(|&v| v == 0.0),
                "{f}: unprompted slice {z} must stay background"
            );
        }
        assert!(m.data.iter().all(|&v| v == 0.0 || v == 1.0), "{f}");
        let stem = f.trim_end_matches(".gz").trim_end_matches(".nii");
        let ext = if f.ends_with(".gz") {
            ".nii.gz"
        } else {
            ".nii"
        };
        let p = read_nifti(&out.join(format!("{stem}_prob{ext}"))).unwrap();
        assert!(
            p.data.iter().all(|v| (0.0..=1.0).contains(v)),
            "{f}: probabilities"
        );
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn prompts_outside_a_volume_name_the_case_and_the_prompt() {
    let d = tmpdir("nii-bad");
    let out = d.join("out");
    let (ok, text) = run(segment(
        &common::fixtures_dir().join("nifti/dtype_int16.nii"),
        &out,
        "volume",
    )
    .args(["--voxel", "3,2,9"]));
    assert!(!ok);
    assert!(
        text.contains("dtype_int16") && text.contains("z = 9"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn manifest_with_label_prompts_and_metrics() {
    let d = tmpdir("manifest");
    std::fs::copy(root().join("examples/phantom.png"), d.join("img.png")).unwrap();
    // Ground truth: the bright lesion of the phantom (label 2) inside organ B (label 1).
    let gt = image::GrayImage::from_fn(192, 160, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let lesion = (fx - 128.0).powi(2) + (fy - 80.0).powi(2) < 81.0;
        let organ = ((fx - 132.0) / 30.0).powi(2) + ((fy - 86.0) / 24.0).powi(2) < 1.0;
        image::Luma([if lesion {
            2
        } else if organ {
            1
        } else {
            0
        }])
    });
    gt.save(d.join("img_gt.png")).unwrap();
    std::fs::write(
        d.join("cases.json"),
        r#"{"cases": [{"image": "img.png", "label": "img_gt.png", "output": "img_mask.png",
                      "from_label": {"path": "img_gt.png", "id": 2, "click": true}}]}"#,
    )
    .unwrap();
    let out = d.join("out");
    let (ok, text) = run(segment(&d.join("cases.json"), &out, "tiny").args(["--label-id", "2"]));
    assert!(ok, "{text}");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("case,dice,iou,hd95\nimg,"), "{csv}");
    assert!(csv.lines().last().unwrap().starts_with("mean,"), "{csv}");
    assert!(out.join("img_mask.png").exists());
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn eval_scores_volumes_in_millimetres() {
    let d = tmpdir("eval-nii");
    let src = common::fixtures_dir().join("nifti/oblique_float32.nii");
    let v = read_nifti(&src).unwrap();
    let [nx, ny, nz] = v.dims;
    // Ground truth: a block; prediction: the same block shifted by one voxel along k.
    let block = |dz: usize| -> Vec<u8> {
        (0..nx * ny * nz)
            .map(|i| {
                let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
                ((1..5).contains(&x) && (1..4).contains(&y) && (1 + dz..3 + dz).contains(&z)) as u8
            })
            .collect()
    };
    medsa::data::nifti::write_labels(&d.join("gt.nii.gz"), &v.header, &block(0)).unwrap();
    medsa::data::nifti::write_labels(&d.join("pred.nii.gz"), &v.header, &block(1)).unwrap();
    let o = bin()
        .arg("eval")
        .arg(d.join("pred.nii.gz"))
        .arg(d.join("gt.nii.gz"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    // Overlap 1 of 2 slices: Dice 0.5; surfaces one voxel apart along k (pixdim 2.5 mm there).
    let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(row[1], "0.500000", "{text}");
    let hd: f64 = row[3].parse().unwrap();
    assert!(hd > 0.0 && hd <= 2.5 + 1e-6, "{text}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn jpeg_rgb_and_16_bit_grey_inputs_give_masks_at_their_size() {
    let d = tmpdir("formats");
    let inp = d.join("in");
    std::fs::create_dir_all(&inp).unwrap();
    let grey = image::open(root().join("examples/phantom.png"))
        .unwrap()
        .to_luma8();
    let rgb = image::DynamicImage::ImageLuma8(grey.clone()).to_rgb8();
    rgb.save(inp.join("colour.jpg")).unwrap();
    let deep = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(
        grey.width(),
        grey.height(),
        |x, y| image::Luma([grey.get_pixel(x, y).0[0] as u16 * 257]),
    );
    deep.save(inp.join("deep16.png")).unwrap();
    let out = d.join("out");
    let (ok, text) = run(segment(&inp, &out, "tiny").args(["--box", "100,55,165,115"]));
    assert!(ok, "{text}");
    for n in ["colour.png", "deep16.png"] {
        let m = image::open(out.join(n)).unwrap();
        assert_eq!((m.width(), m.height()), (192, 160), "{n}");
    }
    // The same picture at 8 and 16 bits must give the same mask (intensities are rescaled).
    let a = image::open(out.join("deep16.png")).unwrap().to_luma8();
    std::fs::copy(root().join("examples/phantom.png"), inp.join("eight.png")).unwrap();
    let (ok, text) =
        run(segment(&inp.join("eight.png"), &out, "tiny").args(["--box", "100,55,165,115"]));
    assert!(ok, "{text}");
    let b = image::open(out.join("eight.png")).unwrap().to_luma8();
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(d);
}

/// The batch tool on `--device cuda` in f32 (the GPU, or the kernel emulator without one)
/// against the same runs on the CPU: a PNG folder (tiny model, batched) and NIfTI volumes
/// (the depth branch in chunks, probabilities written). Probabilities agree to 1e-3 (f32 on
/// both, summed in other orders); a mask may differ only where the probability is that close
/// to 0.5.
#[cfg(feature = "cuda")]
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn batch_on_cuda_matches_the_cpu() {
    let test = "batch_on_cuda_matches_the_cpu";
    let d = tmpdir("on-cuda");
    let (pngs, vols) = (d.join("pngs"), d.join("vols"));
    png_folder(&pngs, 2, false);
    std::fs::create_dir_all(&vols).unwrap();
    for f in ["oblique_float32.nii", "gzip_float32.nii.gz"] {
        std::fs::copy(common::fixtures_dir().join("nifti").join(f), vols.join(f)).unwrap();
    }
    let png_args = ["--point", "128,80", "--batch-size", "2"];
    let cuda = ["--device", "cuda", "--precision", "f32"];
    for (input, model, args) in [
        (&pngs, "tiny", &png_args[..]),
        (&vols, "volume", &VOLUME_ARGS[..]),
    ] {
        let (on_cpu, on_cuda) = (
            d.join(format!("{model}-cpu")),
            d.join(format!("{model}-cuda")),
        );
        let mut c = segment(input, &on_cuda, model);
        c.args(args).args(cuda);
        if !common::kemu::cuda_command(test, &mut c) {
            return;
        }
        let (ok, text) = run(&mut c);
        assert!(ok, "{text}");
        let (ok, text) = run(segment(input, &on_cpu, model).args(args));
        assert!(ok, "{text}");
        if model == "tiny" {
            for i in 0..2 {
                let f = format!("case{i}.png");
                let a = image::open(on_cpu.join(&f)).unwrap().to_luma8();
                let b = image::open(on_cuda.join(&f)).unwrap().to_luma8();
                assert_eq!(a.dimensions(), b.dimensions(), "{f}");
                let differ = a.pixels().zip(b.pixels()).filter(|(x, y)| x != y).count();
                // No probabilities for PNGs: allow the few pixels a 1e-5 logit change can flip.
                assert!(
                    differ * 1000 <= a.len(),
                    "{f}: {differ} of {} pixels differ",
                    a.len()
                );
            }
            continue;
        }
        for (mask, prob) in [
            ("oblique_float32.nii", "oblique_float32_prob.nii"),
            ("gzip_float32.nii.gz", "gzip_float32_prob.nii.gz"),
        ] {
            let (pa, pb) = (
                read_nifti(&on_cpu.join(prob)).unwrap(),
                read_nifti(&on_cuda.join(prob)).unwrap(),
            );
            let (ma, mb) = (
                read_nifti(&on_cpu.join(mask)).unwrap(),
                read_nifti(&on_cuda.join(mask)).unwrap(),
            );
            assert_eq!(pb.dims, pa.dims, "{prob}");
            assert_eq!(mb.header.affine(), ma.header.affine(), "{mask}");
            for (i, (x, y)) in pa.data.iter().zip(&pb.data).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-3,
                    "{prob}[{i}]: {y} on CUDA, {x} on the CPU"
                );
                let (a, b) = (ma.data[i], mb.data[i]);
                assert!(
                    a == b || (x - 0.5).abs() <= 1e-3,
                    "{mask}[{i}]: {b} on CUDA, {a} on the CPU (probability {x})"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(d);
}

/// `--propagate` on `--device cuda` (the GPU, or the kernel emulator) walks the same slices and
/// writes the same probabilities as on the CPU: the propagation is backend-generic, and the
/// walk's decisions (mask box, area and score thresholds) must not flip between backends. The
/// thresholds are off so the random-weight model's masks walk as far as they go.
#[cfg(feature = "cuda")]
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn propagation_on_cuda_matches_the_cpu() {
    let test = "propagation_on_cuda_matches_the_cpu";
    let d = tmpdir("prop-cuda");
    let vol = common::fixtures_dir().join("nifti/oblique_float32.nii");
    let args = [
        "--box",
        "1,1,2,5,4,2",
        "--propagate",
        "--propagate-min-area",
        "1",
        "--propagate-min-iou",
        "0",
        "--propagate-min-stability",
        "0",
        "--propagate-margin",
        "0",
        "--chunk",
        "2",
        "--probabilities",
    ];
    let (on_cpu, on_cuda) = (d.join("cpu"), d.join("cuda"));
    let mut c = segment(&vol, &on_cuda, "volume");
    c.args(args)
        .args(["--device", "cuda", "--precision", "f32"]);
    if !common::kemu::cuda_command(test, &mut c) {
        return;
    }
    let (ok, text) = run(&mut c);
    assert!(ok, "{text}");
    let (ok, text) = run(segment(&vol, &on_cpu, "volume").args(args));
    assert!(ok, "{text}");
    let (pa, pb) = (
        read_nifti(&on_cpu.join("oblique_float32_prob.nii")).unwrap(),
        read_nifti(&on_cuda.join("oblique_float32_prob.nii")).unwrap(),
    );
    let (ma, mb) = (
        read_nifti(&on_cpu.join("oblique_float32.nii")).unwrap(),
        read_nifti(&on_cuda.join("oblique_float32.nii")).unwrap(),
    );
    assert!(
        ma.data.iter().any(|&v| v > 0.0),
        "the CPU run segmented nothing"
    );
    for (i, (x, y)) in pa.data.iter().zip(&pb.data).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3,
            "prob[{i}]: {y} on CUDA, {x} on the CPU"
        );
        let (a, b) = (ma.data[i], mb.data[i]);
        assert!(
            a == b || (x - 0.5).abs() <= 1e-3,
            "mask[{i}]: {b} on CUDA, {a} on the CPU (probability {x})"
        );
    }
    let _ = std::fs::remove_dir_all(d);
}
