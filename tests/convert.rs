//! The native `.pth` reader and `medsa-engine convert`: every tensor of the torch.save fixtures
//! (written by tools/reference/write_pth_fixture.py) matches the values PyTorch saved, the
//! converted tiny SAM loads and equals the original weights, and malformed files are errors that
//! name the file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use medsa::pth::{read_checkpoint, read_state_dict, DType};
use medsa::weights::SafetensorsFile;

fn pth(name: &str) -> PathBuf {
    common::fixture_ext("pth", name, "pth")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medsa-convert-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every tensor of `got` equals the expected file's, bit for bit, in the same key set.
fn assert_same(got: &[(String, medsa::Tensor)], want: &Path) {
    let want = SafetensorsFile::open(want).unwrap();
    let mut keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    let mut wkeys: Vec<&str> = want.keys().collect();
    wkeys.sort();
    assert_eq!(keys, wkeys, "key sets differ");
    for (k, t) in got {
        let w = want.tensor(k).unwrap();
        assert_eq!(t.shape(), w.shape(), "{k}: shape");
        let gb: Vec<u32> = t.data().iter().map(|x| x.to_bits()).collect();
        let wb: Vec<u32> = w.data().iter().map(|x| x.to_bits()).collect();
        assert_eq!(gb, wb, "{k}: values differ");
    }
}

#[test]
fn small_state_dict_matches_torch() {
    let got = read_state_dict(pth("small")).unwrap();
    assert_same(&got, &common::fixture("pth", "small"));
    // Non-float tensors are reported with their dtype, not converted.
    let all = read_checkpoint(pth("small")).unwrap();
    let find = |n: &str| all.iter().find(|t| t.name == n).unwrap();
    assert_eq!(find("i64").dtype, DType::I64);
    assert_eq!(find("i64").shape, vec![2, 3]);
    assert!(find("i64").tensor.is_none());
    assert_eq!(find("flag").dtype, DType::Bool);
    assert_eq!(find("f16").dtype, DType::F16);
    assert_eq!(find("bf16").dtype, DType::BF16);
    assert_eq!(find("f64").dtype, DType::F64);
    assert_eq!(find("scalar").shape, Vec::<usize>::new());
    assert_eq!(find("scalar").tensor.as_ref().unwrap().data(), &[3.5]);
    // File order is kept.
    assert_eq!(all[0].name, "f32");
    assert_eq!(all.len(), 14);
}

#[test]
fn medsa_training_checkpoint_uses_state_dict_and_strips_module() {
    let got = read_state_dict(pth("medsa_style")).unwrap();
    assert!(got.iter().all(|(k, _)| !k.starts_with("module.")));
    assert_same(&got, &common::fixture("pth", "medsa_style"));
}

#[test]
fn tiny_plain_pth_matches_safetensors() {
    let got = read_state_dict(pth("tiny_plain")).unwrap();
    assert_same(&got, &common::fixture("tiny_plain", "weights"));
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

#[test]
fn convert_cli_tiny_plain_loads_and_matches() {
    let dir = tmpdir("cli");
    let out = dir.join("tiny.safetensors");
    let o = bin()
        .arg("convert")
        .arg(pth("tiny_plain"))
        .arg(&out)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "convert failed: {text}");
    assert!(text.contains("SAM model: custom"), "{text}");
    let be = medsa::backend::cpu::Cpu::new();
    medsa::sam::Sam::load(&be, &out).unwrap_or_else(|e| panic!("{e}"));
    let conv = SafetensorsFile::open(&out).unwrap();
    let got: Vec<(String, medsa::Tensor)> = conv
        .keys()
        .map(|k| (k.to_string(), conv.tensor(k).unwrap()))
        .collect();
    assert_same(&got, &common::fixture("tiny_plain", "weights"));
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1);

    // BF16 output also loads, values rounded to BF16.
    let out16 = dir.join("tiny_bf16.safetensors");
    let o = bin()
        .args(["convert", "--dtype", "bf16"])
        .arg(pth("tiny_plain"))
        .arg(&out16)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    medsa::sam::Sam::load(&be, &out16).unwrap_or_else(|e| panic!("{e}"));

    // Non-SAM state dicts convert too, with the integer tensors dropped and reported.
    let small = dir.join("small.safetensors");
    let o = bin()
        .arg("convert")
        .arg(pth("small"))
        .arg(&small)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}");
    assert!(text.contains("skipping `i64`"), "{text}");
    assert!(text.contains("not loadable as a SAM model"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A zip archive of STORED entries, as torch.save writes them (CRCs left zero: not checked).
fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data) in entries {
        let off = out.len() as u32;
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend(0u32.to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(*data);
        cd.extend(0x0201_4b50u32.to_le_bytes());
        cd.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        cd.extend(0u32.to_le_bytes());
        cd.extend((data.len() as u32).to_le_bytes());
        cd.extend((data.len() as u32).to_le_bytes());
        cd.extend((name.len() as u16).to_le_bytes());
        cd.extend([0u8; 12]);
        cd.extend(off.to_le_bytes());
        cd.extend(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend(&cd);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((cd.len() as u32).to_le_bytes());
    out.extend(cd_off.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// Writes `bytes` in `dir` and checks reading it fails with a message naming the file and
/// containing `what`.
fn expect_err(dir: &Path, name: &str, bytes: &[u8], what: &str) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = read_state_dict(&p).expect_err(name).to_string();
    assert!(e.contains(&p.display().to_string()), "{name}: {e}");
    assert!(e.contains(what), "{name}: expected `{what}` in: {e}");
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let dir = tmpdir("bad");
    let good = std::fs::read(pth("small")).unwrap();
    // Truncated at many points: never a panic, always an error.
    for cut in [0, 10, 100, good.len() / 2, good.len() - 30, good.len() - 1] {
        let p = dir.join(format!("cut{cut}.pth"));
        std::fs::write(&p, &good[..cut]).unwrap();
        let e = read_state_dict(&p).expect_err("truncated").to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
    expect_err(&dir, "truncated.pth", &good[..good.len() / 2], "zip");
    // Corrupt bytes anywhere: errors or (payload bytes) wrong values, never a panic.
    for i in (0..good.len()).step_by(7) {
        let mut b = good.clone();
        b[i] ^= 0x5a;
        let p = dir.join("flip.pth");
        std::fs::write(&p, &b).unwrap();
        let _ = read_state_dict(&p);
    }
    let mut rng = 0x1234_5678u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    expect_err(&dir, "random.pth", &random, "not a PyTorch checkpoint");
    expect_err(
        &dir,
        "nopkl.pth",
        &stored_zip(&[("archive/version", b"3\n")]),
        "without `<name>/data.pkl`",
    );
    expect_err(
        &dir,
        "legacy.pth",
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        "legacy (non-zip) torch.save format",
    );
    // A pickled object instead of a state dict.
    let module = b"\x80\x02ctorch.nn.modules.linear\nLinear\nq\x00)\x81q\x01}q\x02b.";
    expect_err(
        &dir,
        "module.pth",
        &stored_zip(&[("archive/data.pkl", module)]),
        "unsupported pickle global `torch.nn.modules.linear.Linear`",
    );
    // A numpy array in the state dict.
    let np = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02)Rq\x03s.";
    expect_err(
        &dir,
        "numpy.pth",
        &stored_zip(&[("archive/data.pkl", np)]),
        "unsupported pickle global `numpy.core.multiarray._reconstruct`",
    );
    // An unknown opcode.
    expect_err(
        &dir,
        "opcode.pth",
        &stored_zip(&[("archive/data.pkl", b"\x80\x02I1\n.")]),
        "unsupported pickle opcode 0x49",
    );
    // A storage record shorter than the tensor needs.
    let pkl = b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89)tRs.";
    expect_err(
        &dir,
        "short.pth",
        &stored_zip(&[("archive/data.pkl", pkl), ("archive/data/0", &[0u8; 12])]),
        "has 12 bytes",
    );
    // A view past its storage.
    let pkl = b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x02K\x04\x85K\x01\x85\x89)tRs.";
    expect_err(
        &dir,
        "view.pth",
        &stored_zip(&[("archive/data.pkl", pkl), ("archive/data/0", &[0u8; 16])]),
        "runs past its storage",
    );
    // The same well-formed file reads.
    let p = dir.join("ok.pth");
    std::fs::write(
        &p,
        stored_zip(&[
            ("archive/data.pkl", &pkl.replace_offset()),
            ("archive/data/0", &1f32.to_le_bytes().repeat(4)),
        ]),
    )
    .unwrap();
    let got = read_state_dict(&p).unwrap();
    assert_eq!(got[0].0, "w");
    assert_eq!(got[0].1.data(), &[1.0; 4]);
    let _ = std::fs::remove_dir_all(&dir);
}

trait ReplaceOffset {
    fn replace_offset(&self) -> Vec<u8>;
}

impl ReplaceOffset for [u8] {
    /// The storage offset `K\x02` of the view test set back to `K\x00`.
    fn replace_offset(&self) -> Vec<u8> {
        let mut v = self.to_vec();
        let i = v.windows(4).position(|w| w == b"QK\x02K").unwrap();
        v[i + 2] = 0;
        v
    }
}
