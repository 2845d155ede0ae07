//! Budgets on what one input file may make the engine allocate.
//!
//! A file's header says how large its content is, and a hostile or corrupt file can claim
//! anything: a 8 MB `.nii.gz` can declare 2048^3 voxels. Every reader checks what the header
//! claims against these budgets *before* allocating, and reads no more than the header claims, so
//! a case that is too large fails with an error naming the file, its size and the limit.
//!
//! The budgets are one value ([`Limits`]); the process default is [`Limits::from_env`] (the
//! built-in values, or `MEDSA_MAX_VOXELS` for the voxel budget) until a front end sets its own
//! with [`set_default`], as `medsa-engine` does from `--max-voxels` / `--max-pixels`. Readers
//! without an explicit budget argument use [`current`].

use std::sync::RwLock;

use crate::error::{Error, Result};

/// The voxel budget's environment variable (a whole number of voxels).
pub const MAX_VOXELS_ENV: &str = "MEDSA_MAX_VOXELS";

/// Budgets on one input. Each is a count, not bytes: the memory a case needs grows with it (4
/// bytes per voxel for the f32 volume, plus the label map and the per-slice work).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Voxels in one NIfTI volume (scan or label). The default, 2^30, is twice a 512 x 512 x
    /// 2000 CT (the largest common clinical volume) and 4 GiB as f32.
    pub max_voxels: u64,
    /// Pixels in one 2D image (PNG/JPEG, image or label). The default, 2^28 (16384 x 16384),
    /// is above any radiograph or whole-slide tile the model is run on.
    pub max_pixels: u64,
    /// Prompt entries (points + boxes over all objects) of one case.
    pub max_prompts: usize,
    /// Bytes of a JSON manifest.
    pub max_manifest_bytes: u64,
}

impl Limits {
    /// The built-in budgets (see each field).
    pub const DEFAULT: Limits = Limits {
        max_voxels: 1 << 30,
        max_pixels: 1 << 28,
        max_prompts: 100_000,
        max_manifest_bytes: 256 << 20,
    };

    /// The built-in budgets with the voxel budget from `MEDSA_MAX_VOXELS` when it is set.
    pub fn from_env() -> Result<Limits> {
        let mut l = Limits::DEFAULT;
        if let Ok(v) = std::env::var(MAX_VOXELS_ENV) {
            l.max_voxels = v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "{MAX_VOXELS_ENV}=\"{v}\": expected a whole number of voxels above 0"
                    ))
                })?;
        }
        Ok(l)
    }

    /// Checks a volume's dims against the voxel budget; `what` names the file.
    pub fn check_voxels(&self, what: &std::path::Path, dims: [usize; 3]) -> Result<()> {
        let n = dims.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
        if n > self.max_voxels as u128 {
            return Err(Error::Format {
                path: what.to_path_buf(),
                msg: format!(
                    "dims {}x{}x{} are {n} voxels, over the budget of {} voxels (raise it with \
                     --max-voxels or {MAX_VOXELS_ENV} if the volume is real)",
                    dims[0], dims[1], dims[2], self.max_voxels
                ),
            });
        }
        Ok(())
    }

    /// Checks an image's size against the pixel budget; `what` names the file.
    pub fn check_pixels(&self, what: &std::path::Path, width: u64, height: u64) -> Result<()> {
        let n = width as u128 * height as u128;
        if n > self.max_pixels as u128 {
            return Err(Error::Format {
                path: what.to_path_buf(),
                msg: format!(
                    "image is {width}x{height} = {n} pixels, over the budget of {} pixels (raise \
                     it with --max-pixels if the image is real)",
                    self.max_pixels
                ),
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

static DEFAULT: RwLock<Option<Limits>> = RwLock::new(None);

/// Sets the process default budgets (what [`current`] returns from now on).
pub fn set_default(l: Limits) {
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = Some(l);
}

/// The process default budgets: those given to [`set_default`], else [`Limits::from_env`] (the
/// built-in values when the variable is malformed: a front end that wants that error calls
/// `from_env` itself).
pub fn current() -> Limits {
    if let Some(l) = *DEFAULT.read().unwrap_or_else(|e| e.into_inner()) {
        return l;
    }
    Limits::from_env().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_real_ct_passes_and_a_bomb_does_not() {
        let l = Limits::DEFAULT;
        let p = std::path::Path::new("ct.nii.gz");
        l.check_voxels(p, [512, 512, 2000]).unwrap();
        let e = l
            .check_voxels(p, [2048, 2048, 2048])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ct.nii.gz") && e.contains("2048x2048x2048") && e.contains("1073741824"),
            "{e}"
        );
        // Dims whose product overflows u64 are still refused, not wrapped.
        assert!(l.check_voxels(p, [usize::MAX, usize::MAX, 2]).is_err());
        assert!(l.check_pixels(p, 16384, 16384).is_ok());
        assert!(l.check_pixels(p, 16385, 16384).is_err());
    }
}
