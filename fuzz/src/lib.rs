//! Helpers shared by the fuzz targets.
//!
//! Most medsa readers take a path rather than bytes (they memory-map or sniff the file), so
//! each input is written to a scratch file and the real function is called on it: that way the
//! fuzzer exercises exactly the code a user's file goes through.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A per-process scratch folder in RAM (`/dev/shm/medsa-fuzz-<target>-<pid>/`): tmpfs keeps
/// the per-input write cheap, and the pid keeps concurrent campaigns apart.
pub fn scratch_dir(target: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(format!(
            "/dev/shm/medsa-fuzz-{target}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&d).expect("cannot create the fuzz scratch folder");
        d
    })
}

/// Writes `data` to `<scratch>/input.<ext>` and returns the path. A failed write is a broken
/// harness, not a finding in medsa, hence the panic with a clear message.
pub fn scratch_file(target: &str, ext: &str, data: &[u8]) -> PathBuf {
    let p = scratch_dir(target).join(format!("input.{ext}"));
    std::fs::write(&p, data).expect("cannot write the fuzz input file");
    p
}

/// With `MEDSA_FUZZ_DEBUG` set, prints what a reader answered, so seeds can be checked by
/// running a target on them (`fuzz/target/.../<target> fuzz/seeds/<target>/*`): a seed that
/// fails early reaches little code. Silent otherwise (libFuzzer runs millions of inputs).
pub fn debug<T, E: std::fmt::Display>(what: &str, r: &Result<T, E>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("MEDSA_FUZZ_DEBUG").is_some()) {
        match r {
            Ok(_) => eprintln!("{what}: ok"),
            Err(e) => eprintln!("{what}: {e}"),
        }
    }
}
