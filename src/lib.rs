//! medsa: the Medical SAM Adapter (SAM + Med-SA adapters, SD-Trans, HyP-Adpt) on a CPU reference
//! backend and NVIDIA GPUs.
//!
//! `docs/SPEC.md` defines the model; [`backend::Backend`] is the op set;
//! [`sam::Sam`] is the model.

#![warn(missing_docs)]

pub mod backend;
pub mod batch;
pub mod data;
pub mod error;
pub mod host_pool;
pub mod limits;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::Tensor;
pub mod medsa;
pub mod meta;
pub mod metrics;
pub mod nn;
pub mod pipeline;
pub mod pth;
pub mod runtime;
pub mod sam;
pub mod selftest;
pub mod weights;

/// The project's size rule (DESIGN.md): no source file over 700 lines, so a file stays one
/// concern a reader can hold.
#[cfg(test)]
mod source_files {
    use std::path::{Path, PathBuf};

    const CEILING: usize = 700;
    const FOLDERS: &[&str] = &[
        "src", "kernels", "tests", "benches", "tools", "scripts", "bindings", "fuzz", "examples",
    ];
    const EXTENSIONS: &[&str] = &["rs", "cu", "cuh", "py", "sh", "c", "h", "cpp", "pyi"];

    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                // Fixtures, build outputs and fetched data are not ours to size.
                if !matches!(
                    name.as_str(),
                    "fixtures" | "target" | "data" | "corpus" | "artifacts"
                ) && !name.starts_with('.')
                {
                    walk(&p, out);
                }
            } else if p
                .extension()
                .is_some_and(|x| EXTENSIONS.contains(&x.to_string_lossy().as_ref()))
            {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_source_file_is_over_the_line_ceiling() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for f in FOLDERS {
            walk(&root.join(f), &mut files);
        }
        assert!(files.len() > 100, "found only {} source files", files.len());
        let over: Vec<String> = files
            .iter()
            .filter_map(|p| {
                let n = std::fs::read_to_string(p).ok()?.lines().count();
                (n > CEILING).then(|| format!("{} ({n} lines)", p.display()))
            })
            .collect();
        assert!(over.is_empty(), "over {CEILING} lines: {over:?}");
    }
}
