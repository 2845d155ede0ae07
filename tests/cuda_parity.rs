//! The CUDA backend against the CPU reference: every op on fresh random inputs, then the whole
//! model on the golden fixtures, in f32 and bf16 storage. Without a CUDA driver or device these
//! tests print why and return (CI has no GPU; `scripts/gpu-check.sh` runs them on one).
#![cfg(feature = "cuda")]

mod common;

use medsa::backend::cuda::{driver_present, Cuda, Precision};
use medsa::selftest::{self, Tolerance};

/// Writes straight to stderr: libtest captures `println!`, and a skip must be visible in CI logs.
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "cuda_parity: SKIPPED: {why}");
}

fn device(p: Precision) -> Option<Cuda> {
    if !driver_present() {
        skip("no NVIDIA driver (libcuda.so) on this machine");
        return None;
    }
    match Cuda::new(0, p) {
        Ok(c) => Some(c),
        Err(e) => {
            skip(&format!("no usable CUDA device: {e}"));
            None
        }
    }
}

fn check(p: Precision, op_tol: Tolerance, model_tol: Tolerance) {
    let Some(mut be) = device(p) else { return };
    let mut checks = selftest::ops(&be, op_tol);
    // The whole model on both encoder paths: op by op, and fused (MEDSA_FUSE=1).
    for fuse in [false, true] {
        be.set_fusion(fuse);
        let mut m = selftest::model(&be, &common::fixtures_dir(), model_tol);
        for c in &mut m {
            c.name = format!("{} [{}]", c.name, if fuse { "fused" } else { "op by op" });
        }
        checks.extend(m);
    }
    let failed = selftest::report(&checks);
    println!("peak device memory {} MiB", be.pool().peak() >> 20);
    assert_eq!(
        failed, 0,
        "{failed} CUDA parity checks failed (see the table above)"
    );
}

#[test]
fn cuda_f32_matches_cpu_reference() {
    check(Precision::F32, Tolerance::F32, Tolerance::F32);
}

#[test]
fn cuda_bf16_matches_cpu_reference() {
    check(Precision::Bf16, Tolerance::BF16, Tolerance::BF16_MODEL);
}

#[test]
fn missing_device_is_an_error_not_a_panic() {
    // Ordinal 999 never exists: either no driver or no such device, both reported as errors.
    match Cuda::new(999, Precision::F32) {
        Ok(_) => panic!("cuda:999 opened"),
        Err(e) => assert!(e.to_string().contains("cuda:999"), "{e}"),
    }
}
