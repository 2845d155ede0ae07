//! Output buffers of the CPU backend (pooled, huge-page backed when large) and the parallel
//! chunking the ops share.

use rayon::prelude::*;

use super::PAR_MIN;
use crate::error::Result;
use crate::tensor::Tensor;

/// A raw pointer that may cross threads; used where parallel tasks write provably disjoint parts
/// of one output buffer that cannot be split into slices up front (strided layouts).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: every user writes disjoint elements from each task and the buffer outlives the scope.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method (rather than field access) so closures capture the whole wrapper,
    /// which is `Sync`, instead of the bare pointer field.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Buffers at least this large (bytes) are backed by transparent huge pages where the kernel
/// allows it on request (`madvise` mode): a fresh 50 MB activation otherwise takes ~12K page
/// faults, which measured ~20% of a large linear layer.
const HUGE_MIN_BYTES: usize = 4 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

/// Asks for huge pages over the 2 MiB-aligned interior of `v`'s allocation (a hint: failure or
/// an unsupported kernel just leaves normal pages).
fn advise_huge(v: &mut Vec<f32>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        let bytes = v.capacity() * 4;
        if bytes < HUGE_MIN_BYTES {
            return;
        }
        let start = v.as_mut_ptr() as usize;
        let lo = start.next_multiple_of(HUGE);
        let hi = (start + bytes) / HUGE * HUGE;
        if hi > lo {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE changes no
            // contents, only how future faults are served.
            unsafe {
                madvise(lo as *mut std::ffi::c_void, hi - lo, MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = v;
}

/// A zero-filled buffer of `n` floats: a pooled one (`crate::host_pool`) or a fresh one,
/// huge-page backed when large.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    if let Some(mut v) = crate::host_pool::take(n) {
        v.resize(n, 0.0);
        return v;
    }
    // calloc leaves fresh large blocks untouched (the kernel's pages are already zero), so the
    // advice still applies to every page's first fault.
    let mut v = vec![0.0f32; n];
    advise_huge(&mut v);
    v
}

/// An empty buffer with room for `n` floats (huge-page backed when large), for producers that
/// write every element through the raw pointer before `set_len`.
pub(crate) fn with_capacity(n: usize) -> Vec<f32> {
    if let Some(v) = crate::host_pool::take(n) {
        return v;
    }
    let mut v = Vec::with_capacity(n);
    advise_huge(&mut v);
    v
}

/// Builds an output tensor; `data.len()` always matches `shape` by construction in this backend.
pub(crate) fn make(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape)
}

/// Splits `out` into chunks of `chunk` elements and runs `f(chunk_index, chunk)` on each, in
/// parallel when the tensor is large enough to pay for it.
pub(crate) fn for_chunks(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if chunk == 0 || out.is_empty() {
        return;
    }
    if out.len() >= PAR_MIN {
        // Group small chunks so each task moves at least ~4K elements.
        let per = (4096 / chunk).max(1);
        out.par_chunks_mut(chunk * per)
            .enumerate()
            .for_each(|(g, grp)| {
                for (i, c) in grp.chunks_mut(chunk).enumerate() {
                    f(g * per + i, c);
                }
            });
    } else {
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            f(i, c);
        }
    }
}
