//! Batch manifests (`.json`): the JSON shape checks, points and boxes, `from_label`, and the
//! output path derivation. `read_manifest` only computes paths; the out folder is never created.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = medsa_fuzz::scratch_file("manifest", "json", data);
    let out = medsa_fuzz::scratch_dir("manifest").join("out");
    medsa_fuzz::debug("read_manifest", &medsa::batch::read_manifest(&path, &out));
});
