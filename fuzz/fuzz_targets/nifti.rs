//! NIfTI-1 volumes through `read_nifti`. The first byte picks the container: plain `.nii`, the
//! rest gzip-compressed as `.nii.gz` (so mutations reach the header parser through the gzip
//! reader), or the raw rest under a `.nii.gz` name (corrupt gzip streams).
#![no_main]

use std::io::Write;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static BUDGET: Once = Once::new();
    // A voxel budget of 2^24 (64 MiB as f32) instead of the default 2^30, so that a volume a
    // header can declare but the 2048 MB fuzzing memory limit cannot hold is refused by the
    // reader's own budget check (which is what is under test) rather than reported as an
    // out-of-memory finding. Set once, before any read, while the process is one thread.
    BUDGET.call_once(|| std::env::set_var("MEDSA_MAX_VOXELS", "16777216"));
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = match mode % 3 {
        0 => medsa_fuzz::scratch_file("nifti", "nii", rest),
        1 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(rest).expect("gzip into memory");
            let bytes = gz.finish().expect("gzip into memory");
            medsa_fuzz::scratch_file("nifti", "nii.gz", &bytes)
        }
        _ => medsa_fuzz::scratch_file("nifti", "nii.gz", rest),
    };
    let v = medsa::data::nifti::read_nifti(&path);
    medsa_fuzz::debug("read_nifti", &v);
    if let Ok(v) = v {
        // Touch what callers use next: the slice view and the geometry.
        let (_, _, nz) = medsa::data::nifti::volume_slices(&v);
        let _ = v.slice(0);
        let _ = v.slice(nz);
        let _ = v.header.affine();
        let _ = v.header.spacing();
    }
});
