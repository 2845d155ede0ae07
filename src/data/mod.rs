//! Medical image volume I/O: reading scans and writing segmentation outputs on the scan's grid.
//!
//! [`nifti`] reads and writes NIfTI-1 (`.nii`, `.nii.gz`).

pub mod nifti;

pub use nifti::{
    read_nifti, read_nifti_limited, volume_slices, write_f32, write_labels, NiftiHeader,
    NiftiVolume,
};
