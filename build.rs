//! Compiles every `kernels/*.cu` with nvcc into a fatbin (SASS for sm_80, sm_86, sm_89, sm_90a
//! plus PTX for compute_80) when the `cuda` feature is on, and generates the table that embeds
//! them (`$OUT_DIR/kernels.rs`). nvcc is looked up in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, the
//! project's own toolchain folder (`.tools/cuda-pkgs`, filled by `scripts/setup-cuda.sh`), then
//! `PATH`. Use CUDA 13.0.x: newer nvcc emits PTX that driver 580 rejects.

use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: &[&str] = &[
    "arch=compute_80,code=sm_80",
    "arch=compute_86,code=sm_86",
    "arch=compute_89,code=sm_89",
    "arch=compute_90a,code=sm_90a",
    "arch=compute_80,code=compute_80",
];

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            let p = PathBuf::from(h).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let local = root.join(".tools/cuda-pkgs/nvidia/cu13/bin/nvcc");
    if local.exists() {
        return Some(local);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.exists())
}

/// Whether this build's CUDA tests can run: a GPU driver on the build machine, or the CPU kernel
/// emulator (`tools/kemu`: x86-64 Linux with a C++ compiler, not turned off by
/// `MEDSA_TEST_EMULATOR=0`). Where neither is, the tests are compiled as ignored, with the
/// reason, so the summary counts them as skipped rather than passed.
fn cuda_tests_can_run() -> bool {
    println!("cargo::rustc-check-cfg=cfg(medsa_no_cuda_tests)");
    println!("cargo:rerun-if-env-changed=MEDSA_TEST_EMULATOR");
    println!("cargo:rerun-if-env-changed=CXX");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let emulator = env("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && env("CARGO_CFG_TARGET_OS") == "linux"
        && std::env::var("MEDSA_TEST_EMULATOR").map_or(true, |v| v != "0")
        && Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let driver = Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so"));
    emulator || driver
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() && !cuda_tests_can_run() {
        println!("cargo:rustc-cfg=medsa_no_cuda_tests");
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let gen = out.join("kernels.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        std::fs::write(&gen, "/// No kernels: built without the `cuda` feature.\npub const MODULES: &[(&str, &[u8])] = &[];\n").unwrap();
        return;
    }
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        if matches!(s.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")) {
            println!("cargo:rerun-if-changed={}", s.display());
        }
    }
    let cu: Vec<&PathBuf> = sources
        .iter()
        .filter(|s| s.extension().is_some_and(|e| e == "cu"))
        .collect();
    let nvcc = find_nvcc(&root).unwrap_or_else(|| {
        panic!(
            "\n\nmedsa: the `cuda` feature needs nvcc (CUDA 13.0.x) to compile kernels/*.cu.\n\
             Run `scripts/setup-cuda.sh` (installs nvcc 13.0 from PyPI into .tools/, no GPU needed),\n\
             or set NVCC / CUDA_HOME, or build without CUDA: `cargo build --no-default-features`.\n\n"
        )
    });
    // One nvcc per file, in parallel: each compiles five targets.
    let jobs: Vec<_> = cu
        .iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            let fatbin = out.join(format!("{stem}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg("-fatbin")
                .arg("-O3")
                .arg("-std=c++17")
                .arg("-Xptxas")
                .arg("-v")
                .arg("-I")
                .arg(&kdir);
            for a in ARCHS {
                cmd.arg("-gencode").arg(a);
            }
            cmd.arg(src).arg("-o").arg(&fatbin);
            let child = cmd
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("medsa: cannot run {}: {e}", nvcc.display()));
            (stem, fatbin, src.to_path_buf(), child)
        })
        .collect();
    let mut table = String::from("/// Build-time fatbins of `kernels/*.cu`: (module name, image).\npub const MODULES: &[(&str, &[u8])] = &[\n");
    let mut report = String::new();
    for (stem, fatbin, src, child) in jobs {
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() {
            panic!("medsa: nvcc failed on {}:\n{err}", src.display());
        }
        for line in err.lines() {
            if line.contains("warning") {
                println!("cargo:warning={}: {line}", src.display());
            }
        }
        report.push_str(&format!("== {}\n{err}\n", src.display()));
        table.push_str(&format!(
            "    (\"{stem}\", include_bytes!(\"{}\")),\n",
            fatbin.display()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("ptxas-report.txt"), report).unwrap();
    std::fs::write(&gen, table).unwrap();
}
