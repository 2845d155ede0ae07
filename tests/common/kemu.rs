//! The CPU emulator build of `kernels/*.cu` (`tools/kemu`), for tests of the CUDA backend on
//! machines without a GPU: built once per version of the sources into the target folder, then
//! loaded by [`Cuda::emulated`].
//!
//! Per kernel file (`kernels/*.cu`, and `tools/kemu/checks.cu`: kernels wrong on purpose, for
//! the emulator's own test), the preprocessed source names its `extern "C"` kernels (macros expanded);
//! a wrapper compiles the file followed by one `KEMU_REGISTER` entry point per kernel. The
//! wrappers and the runtime (`tools/kemu/kemu.cpp`) are compiled in parallel and linked into
//! one shared library. Needs a C++17 compiler (`$CXX`, default `g++`) on x86-64 Linux.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use medsa::backend::cuda::{Cuda, Precision};

const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fno-strict-aliasing",
    "-fvisibility=hidden",
    "-Wall",
    "-Wno-unknown-pragmas",
];

fn root() -> PathBuf {
    super::fixtures_dir()
        .parent()
        .and_then(Path::parent)
        .expect("tests/fixtures has a project root")
        .to_path_buf()
}

fn sources(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["tools/kemu", "tools/kemu/include", "kernels"] {
        for e in std::fs::read_dir(root.join(dir)).expect("source folder") {
            let p = e.expect("folder entry").path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// FNV-1a of the sources' names and contents and the flags.
fn hash(root: &Path, cxx: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for f in sources(root) {
        eat(f
            .strip_prefix(root)
            .unwrap_or(&f)
            .to_string_lossy()
            .as_bytes());
        eat(&std::fs::read(&f).expect("source file"));
    }
    eat(cxx.as_bytes());
    for f in FLAGS {
        eat(f.as_bytes());
    }
    h
}

/// The `extern "C"` functions a preprocessed kernel file defines: `extern "C" void NAME(`.
fn kernel_names(pre: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = pre;
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + 10..];
        let t = rest.trim_start();
        let Some(t) = t.strip_prefix("void") else {
            continue;
        };
        if !t.starts_with(char::is_whitespace) {
            continue;
        }
        let t = t.trim_start();
        let end = t
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(t.len());
        if end > 0 && t[end..].trim_start().starts_with('(') {
            names.push(t[..end].to_string());
        }
    }
    names
}

fn compile_cmd(cxx: &str, root: &Path) -> Command {
    let mut c = Command::new(cxx);
    c.args(FLAGS)
        .arg("-I")
        .arg(root.join("tools/kemu/include"))
        .arg("-I")
        .arg(root.join("tools/kemu"))
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-include")
        .arg(root.join("tools/kemu/kemu.h"));
    c
}

fn check(what: &str, o: std::process::Output) -> Vec<u8> {
    assert!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn build() -> Result<PathBuf, String> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Err("the emulator's coroutine switch is written for x86-64 Linux".into());
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&cxx)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(format!("no C++ compiler `{cxx}` (set CXX to one)"));
    }
    if std::env::var("MEDSA_TEST_EMULATOR").is_ok_and(|v| v == "0") {
        return Err("MEDSA_TEST_EMULATOR=0".into());
    }
    let root = root();
    // The build's scratch folder, or the system's when the test runs from a copy elsewhere.
    let tmp = Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let h = hash(&root, &cxx);
    let lib = tmp.join(format!("libkemu-{h:016x}.so"));
    if lib.exists() {
        return Ok(lib);
    }
    let dir = tmp.join(format!("kemu-{h:016x}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("emulator build folder");
    let mut units = vec![root.join("tools/kemu/kemu.cpp")];
    for f in sources(&root) {
        if f.extension().is_some_and(|e| e == "cu") {
            let pre = check(
                &format!("preprocessing {}", f.display()),
                compile_cmd(&cxx, &root)
                    .args(["-E", "-x", "c++"])
                    .arg(&f)
                    .output()
                    .expect("run the C++ compiler"),
            );
            let names = kernel_names(&String::from_utf8_lossy(&pre));
            assert!(!names.is_empty(), "{} defines no kernel", f.display());
            let mut w = format!(
                "#include \"{}\"\n#include \"kemu_register.h\"\n",
                f.display()
            );
            for n in names {
                w += &format!("KEMU_REGISTER({n})\n");
            }
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            let unit = dir.join(format!("k_{stem}.cpp"));
            std::fs::write(&unit, w).expect("write a wrapper");
            units.push(unit);
        }
    }
    // Compile the units in parallel, then link.
    let jobs: Vec<_> = units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let obj = dir.join(format!("u{i}.o"));
            let child = compile_cmd(&cxx, &root)
                .arg("-c")
                .arg(u)
                .arg("-o")
                .arg(&obj)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run the C++ compiler");
            (u.clone(), obj, child)
        })
        .collect();
    let mut objs = Vec::new();
    for (u, obj, child) in jobs {
        check(
            &format!("compiling {} for the emulator", u.display()),
            child.wait_with_output().expect("wait for the compiler"),
        );
        objs.push(obj);
    }
    let part = dir.join("libkemu.so");
    check(
        "linking the emulator",
        Command::new(&cxx)
            .args(["-shared", "-o"])
            .arg(&part)
            .args(&objs)
            .output()
            .expect("run the C++ compiler"),
    );
    std::fs::rename(&part, &lib).expect("move the emulator library into place");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(lib)
}

/// The emulator library, built on first use; `Err(reason)` where it cannot be built here.
pub fn library() -> Result<&'static Path, &'static str> {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(build)
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(String::as_str)
}

/// The CUDA backend on the emulator, or `None` with the reason printed.
pub fn emulated_device(test: &str, p: Precision) -> Option<Cuda> {
    match library() {
        Ok(lib) => Some(Cuda::emulated(lib, p).unwrap_or_else(|e| panic!("{test}: {e}"))),
        Err(why) => {
            use std::io::Write;
            // The build found what the emulator needs (else the test is compiled as ignored):
            // failing to get it now is a broken emulator build, not a reason to pass.
            if !cfg!(medsa_no_cuda_tests) {
                panic!("{test}: the CUDA kernel emulator could not be built: {why}");
            }
            let _ = writeln!(
                std::io::stderr(),
                "{test}: SKIPPED: the CUDA kernel emulator is not available: {why}"
            );
            None
        }
    }
}

/// Prepares `cmd`, a `medsa-engine` command with `--device cuda`, to run where it can: as is on
/// a machine with a GPU driver, else on the kernel emulator (`MEDSA_CUDA_EMULATOR`); `false`,
/// with the reason printed, when neither is available.
pub fn cuda_command(test: &str, cmd: &mut std::process::Command) -> bool {
    use std::io::Write;
    if medsa::backend::cuda::driver_present() {
        return true;
    }
    match library() {
        Ok(lib) => {
            cmd.env("MEDSA_CUDA_EMULATOR", lib);
            true
        }
        Err(why) => {
            if !cfg!(medsa_no_cuda_tests) {
                panic!(
                    "{test}: no GPU driver, and the CUDA kernel emulator could not be built: {why}"
                );
            }
            let _ = writeln!(
                std::io::stderr(),
                "{test}: SKIPPED: no GPU driver, and the CUDA kernel emulator is not available: {why}"
            );
            false
        }
    }
}
