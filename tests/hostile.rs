//! Hostile and broken input against `medsa-engine`, one family per test: files whose header
//! claims more than the budget (read under an address-space cap, so a reader that allocates what
//! the header claims aborts instead of passing), outputs that try to leave `-o`, non-finite
//! weights and voxels, and prompt counts over what a label map can hold. Every case asserts that
//! the error names the file (or case) and the problem, and that nothing is written elsewhere.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use medsa::weights::SafetensorsFile;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

/// The engine under an address-space limit of `mib` MiB (`ulimit -v` in a shell that then
/// execs it): an allocation past it fails, which Rust reports as an abort, not an error line.
fn capped(mib: u64) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("ulimit -v \"$0\" && exec \"$@\"")
        .arg((mib * 1024).to_string())
        .arg(env!("CARGO_BIN_EXE_medsa-engine"));
    c
}

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hostile-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Runs a command; returns (success, stdout + stderr). A panic or an abort is never acceptable.
fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "panic: {text}");
    assert!(
        !text.contains("memory allocation of"),
        "allocation failure (over the memory cap): {text}"
    );
    assert!(
        o.status.code().is_some(),
        "killed by a signal ({:?}): {text}",
        o.status
    );
    (o.status.success(), text)
}

fn segment(c: &mut Command, model: &str, input: &Path, out: &Path) {
    c.arg("segment")
        .arg("--checkpoint")
        .arg(common::fixture(model, "weights"))
        .arg("-i")
        .arg(input)
        .arg("-o")
        .arg(out)
        .arg("--quiet");
}

#[test]
fn a_nifti_bomb_is_refused_before_its_data_is_read() {
    let d = tmpdir("bomb");
    // A small .nii.gz whose header claims 2048^3 UINT8 voxels (8 GiB), followed by 256 MiB of
    // zeros that compress to a few hundred KiB: the old reader inflated it all.
    let bomb = d.join("bomb.nii.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&bomb).unwrap(),
        flate2::Compression::best(),
    );
    gz.write_all(&common::nifti_header([2048, 2048, 2048], 2, 8))
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20);
    let out = d.join("out");
    let t0 = std::time::Instant::now();
    let mut c = capped(1024);
    segment(&mut c, "volume", &bomb, &out);
    let (ok, text) = run(c.args(["--voxel", "1,1,1"]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("bomb.nii.gz")
            && text.contains("2048x2048x2048")
            && text.contains("budget of 1073741824 voxels"),
        "the error names the file, its dims and the limit: {text}"
    );
    // Refused from the header: nothing like inflating 256 MiB.
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
    assert!(!out.join("bomb.nii.gz").exists());
}

#[test]
fn the_voxel_budget_is_configurable_and_exact() {
    let d = tmpdir("budget");
    // dtype_int16.nii is 7 x 6 x 5 = 210 voxels.
    let vol = common::fixtures_dir().join("nifti/dtype_int16.nii");
    let out = d.join("out");
    let mut c = bin();
    segment(&mut c, "volume", &vol, &out);
    let (ok, text) = run(c.args(["--voxel", "3,2,1", "--max-voxels", "210"]));
    assert!(ok, "a volume at the budget passes: {text}");
    let mut c = bin();
    segment(&mut c, "volume", &vol, &d.join("out2"));
    let (ok, text) = run(c.args(["--voxel", "3,2,1", "--max-voxels", "209"]));
    assert!(!ok);
    assert!(
        text.contains("dtype_int16.nii") && text.contains("7x6x5") && text.contains("209"),
        "{text}"
    );
    // The environment default, for front ends that do not pass the flag.
    let mut c = bin();
    segment(&mut c, "volume", &vol, &d.join("out3"));
    let (ok, text) = run(c.args(["--voxel", "3,2,1"]).env("MEDSA_MAX_VOXELS", "100"));
    assert!(!ok && text.contains("budget of 100 voxels"), "{text}");
    let mut c = bin();
    segment(&mut c, "volume", &vol, &d.join("out4"));
    let (ok, text) = run(c.args(["--voxel", "3,2,1"]).env("MEDSA_MAX_VOXELS", "lots"));
    assert!(!ok && text.contains("MEDSA_MAX_VOXELS"), "{text}");
}

#[test]
fn images_over_the_pixel_budget_are_refused_from_their_header() {
    let d = tmpdir("pixels");
    let out = d.join("out");
    // phantom.png is 192 x 160.
    let png = root().join("examples/phantom.png");
    let mut c = bin();
    segment(&mut c, "tiny", &png, &out);
    let (ok, text) = run(c.args(["--point", "128,80", "--max-pixels", "30000"]));
    assert!(!ok);
    assert!(
        text.contains("phantom.png") && text.contains("192x160") && text.contains("30000"),
        "{text}"
    );
    // A PNG whose IHDR claims 60000 x 60000 (3.6 G pixels), with no pixel data: refused by the
    // default budget before the decoder allocates.
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&60000u32.to_be_bytes());
    ihdr.extend_from_slice(&60000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut f = b"\x89PNG\r\n\x1a\n".to_vec();
    f.extend_from_slice(&13u32.to_be_bytes());
    f.extend_from_slice(&ihdr);
    f.extend_from_slice(&crc.to_be_bytes());
    // The start of the image data (the decoder reads up to it for the header), then the end.
    for (kind, data) in [
        (&b"IDAT"[..], &[0x78u8, 0x9c, 0x03, 0x00][..]),
        (b"IEND", &[]),
    ] {
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        f.extend_from_slice(&(data.len() as u32).to_be_bytes());
        f.extend_from_slice(&chunk);
        f.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    let big = d.join("huge.png");
    std::fs::write(&big, &f).unwrap();
    let mut c = capped(1024);
    segment(&mut c, "tiny", &big, &out);
    let (ok, text) = run(c.args(["--point", "1,1"]));
    assert!(!ok);
    assert!(
        text.contains("huge.png") && text.contains("60000x60000") && text.contains("budget"),
        "{text}"
    );
}

/// CRC-32 (IEEE), for hand-made PNG chunks.
fn crc32(b: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[cfg(unix)]
#[test]
fn outputs_cannot_leave_the_output_folder() {
    let d = tmpdir("escape");
    std::fs::copy(root().join("examples/phantom.png"), d.join("img.png")).unwrap();
    let out = d.join("work/out");
    let outside = d.join("outside");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("linked")).unwrap();
    // A link planted where the probability map of the good case goes: replaced, not followed.
    let victim = d.join("victim.png");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("sub_ok_prob.png")).unwrap();
    let abs = d.join("abs.png");
    let manifest = format!(
        r#"[{{"image": "img.png", "output": "../../escape.png", "box": [100, 60, 150, 100]}},
            {{"image": "img.png", "output": "{}", "box": [100, 60, 150, 100]}},
            {{"image": "img.png", "output": "linked/escape.png", "box": [100, 60, 150, 100]}},
            {{"image": "img.png", "output": "sub_ok.png", "box": [100, 60, 150, 100]}}]"#,
        abs.display()
    );
    std::fs::write(d.join("cases.json"), manifest).unwrap();
    let mut c = bin();
    segment(&mut c, "tiny", &d.join("cases.json"), &out);
    let (ok, text) = run(c.arg("--probabilities"));
    assert!(!ok, "three cases must fail: {text}");
    assert!(text.contains("3 of 4 cases failed"), "{text}");
    for bad in ["../../escape.png", "abs.png", "linked/escape.png"] {
        assert!(
            text.lines()
                .any(|l| l.contains("failed: img") && l.contains(bad) && l.contains("output")),
            "{bad} is reported as its case's failure: {text}"
        );
    }
    assert!(!d.join("escape.png").exists());
    assert!(!abs.exists());
    assert!(!outside.join("escape.png").exists());
    assert!(out.join("sub_ok.png").is_file());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!std::fs::symlink_metadata(out.join("sub_ok_prob.png"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[cfg(unix)]
#[test]
fn atomic_writes_do_not_follow_a_planted_temp_link() {
    let d = tmpdir("tmp-link");
    let victim = d.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let target = d.join("metrics.csv");
    // write_atomic's temp name for this process.
    let tmp = d.join(format!(".metrics.csv.{}.tmp", std::process::id()));
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    medsa::weights::write_atomic(&target, b"case,dice\n").unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "case,dice\n");
    assert!(std::fs::symlink_metadata(&tmp).is_err(), "temp file left");
}

#[test]
fn a_nan_weight_is_named_at_load_and_by_info() {
    let d = tmpdir("nan-weight");
    let src = SafetensorsFile::open(common::fixture("tiny", "weights")).unwrap();
    let key = "image_encoder.blocks.0.attn.qkv.weight";
    let mut tensors = Vec::new();
    for k in src.keys() {
        let mut t = src.tensor(k).unwrap();
        if k == key {
            t.data_mut()[5] = f32::NAN;
        }
        tensors.push((k.to_string(), t));
    }
    assert!(tensors.iter().any(|t| t.0 == key), "fixture has {key}");
    let bad = d.join("bad.safetensors");
    medsa::weights::save_safetensors(&bad, &tensors, src.metadata()).unwrap();
    let (ok, text) = run(bin().arg("info").arg(&bad));
    assert!(ok, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("non-finite") && l.contains("1 NaN/Inf values in 1 tensors")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(key) && l.trim_end().ends_with(" 1")),
        "{text}"
    );
    let (ok, text) = run(bin().arg("info").arg(common::fixture("tiny", "weights")));
    assert!(ok && text.contains("non-finite      none"), "{text}");
    let out = d.join("out");
    let mut c = bin();
    c.arg("segment")
        .arg("--checkpoint")
        .arg(&bad)
        .arg("-i")
        .arg(root().join("examples/phantom.png"))
        .arg("-o")
        .arg(&out)
        .args(["--point", "128,80", "--quiet"]);
    let (ok, text) = run(&mut c);
    assert!(!ok);
    assert!(
        text.contains("bad.safetensors") && text.contains(key) && text.contains("1 non-finite"),
        "{text}"
    );
    assert!(!out.join("phantom.png").exists());
}

#[test]
fn nan_voxels_fail_their_case_and_the_batch_goes_on() {
    let d = tmpdir("nan-voxels");
    let inp = d.join("in");
    std::fs::create_dir_all(&inp).unwrap();
    let good = common::fixtures_dir().join("nifti/dtype_float32.nii");
    std::fs::copy(&good, inp.join("good.nii")).unwrap();
    let mut b = std::fs::read(&good).unwrap();
    // Voxel 10 (float32 at vox_offset 352) becomes NaN.
    b[352 + 40..352 + 44].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(inp.join("holes.nii"), b).unwrap();
    let out = d.join("out");
    let mut c = bin();
    segment(&mut c, "volume", &inp, &out);
    let (ok, text) = run(c.args(["--voxel", "3,2,1"]));
    assert!(!ok);
    assert!(text.contains("1 of 2 cases failed"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("failed: holes")
            && l.contains("holes.nii")
            && l.contains("1 of 210 values are NaN or infinite")),
        "{text}"
    );
    assert!(out.join("good.nii").exists());
    assert!(!out.join("holes.nii").exists());
}

#[test]
fn prompt_counts_over_a_label_map_are_refused() {
    let d = tmpdir("objects");
    std::fs::copy(root().join("examples/phantom.png"), d.join("img.png")).unwrap();
    let objs: Vec<String> = (0..256)
        .map(|i| format!(r#"{{"points": [[{}, 50]]}}"#, i % 190))
        .collect();
    std::fs::write(
        d.join("many.json"),
        format!(
            r#"[{{"image": "img.png", "objects": [{}]}}]"#,
            objs.join(",")
        ),
    )
    .unwrap();
    let mut c = bin();
    segment(&mut c, "tiny", &d.join("many.json"), &d.join("out"));
    let (ok, text) = run(&mut c);
    assert!(!ok);
    assert!(
        text.contains("many.json") && text.contains("case 0") && text.contains("at most 255"),
        "{text}"
    );
}

/// Out of device memory on CUDA (the kernel emulator given a small device, as a full GPU would
/// fail): the case that does not fit fails with the op, the bytes asked for and the bytes free,
/// and the batch goes on to the next case, which fits.
#[cfg(feature = "cuda")]
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn out_of_device_memory_fails_the_case_and_the_batch_goes_on() {
    let test = "out_of_device_memory_fails_the_case_and_the_batch_goes_on";
    let lib = match common::kemu::library() {
        Ok(l) => l,
        Err(why) => {
            if !cfg!(medsa_no_cuda_tests) {
                panic!("{test}: the CUDA kernel emulator could not be built: {why}");
            }
            eprintln!("{test}: SKIPPED: the CUDA kernel emulator is not available: {why}");
            return;
        }
    };
    let d = tmpdir("oom");
    let inp = d.join("in");
    std::fs::create_dir_all(&inp).unwrap();
    let nifti = common::fixtures_dir().join("nifti");
    // Sorted by name: the 5-slice volume (one chunk of 5 through the encoder) comes first and
    // does not fit; the single-slice one after it does.
    std::fs::copy(nifti.join("dtype_int16.nii"), inp.join("a_five_slices.nii")).unwrap();
    std::fs::copy(nifti.join("flat2d_uint8.nii"), inp.join("b_one_slice.nii")).unwrap();
    let out = d.join("out");
    let mut c = bin();
    segment(&mut c, "volume", &inp, &out);
    c.args([
        "--voxel",
        "1,1,0",
        "--chunk",
        "5",
        "--device",
        "cuda",
        "--precision",
        "f32",
    ])
    .env("MEDSA_CUDA_EMULATOR", lib)
    .env("MEDSA_CUDA_EMULATOR_BYTES", OOM_BUDGET.to_string());
    let (ok, text) = run(&mut c);
    assert!(!ok, "{text}");
    assert!(text.contains("1 of 2 cases failed"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("failed: a_five_slices"))
        .unwrap_or_else(|| panic!("the big case is reported: {text}"));
    assert!(
        line.contains("out of device memory in ")
            && line.contains("requested ")
            && line.contains(&format!("bytes free of {OOM_BUDGET}")),
        "{line}"
    );
    assert!(out.join("b_one_slice.nii").exists(), "{text}");
    assert!(!out.join("a_five_slices.nii").exists());
}
/// The emulated device's memory in the out-of-memory test: measured, the 5-slice chunk fails
/// below 1.4 MB and the single slice runs above 0.8 MB (the tiny volume model's weights and one
/// slice's activations); the middle of that window.
const OOM_BUDGET: usize = 1_000_000;
