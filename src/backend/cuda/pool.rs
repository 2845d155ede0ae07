//! A caching device allocator: freed blocks go to per-size free lists and are handed out again,
//! so a warm model makes no cudaMalloc per op. All work runs on one stream, so a block freed by
//! the host after its last use was enqueued can be reused by any later op on that stream.
//!
//! Sizes are rounded up to 512 bytes, then to one of 4 steps per power of two above 1 MiB, which
//! bounds waste at 25% while keeping the number of distinct sizes small.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext};

use crate::error::{Error, Result};

/// The caching allocator of one device.
pub struct Pool {
    /// The device's context; `None`: host memory for the CPU kernel emulator
    /// (`Cuda::emulated`), 256-byte aligned like the driver's allocations.
    ctx: Option<Arc<CudaContext>>,
    free: Mutex<BTreeMap<usize, Vec<sys::CUdeviceptr>>>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    reserved: AtomicUsize,
    /// The emulated device's memory size (`None`: unlimited host memory).
    budget: Option<usize>,
}

fn round(bytes: usize) -> usize {
    let b = bytes.max(1).div_ceil(512) * 512;
    if b <= 1 << 20 {
        return b;
    }
    let p = usize::BITS - 1 - b.leading_zeros(); // floor(log2 b)
    let step = 1usize << (p - 2);
    b.div_ceil(step) * step
}

impl Pool {
    /// A pool for `ctx` (`None`: host memory for the emulator).
    pub fn new(ctx: Option<Arc<CudaContext>>) -> Self {
        Pool {
            ctx,
            free: Mutex::new(BTreeMap::new()),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            budget: None,
        }
    }

    /// A host-memory pool for the emulator that behaves like a device of `bytes` memory: an
    /// allocation past it fails as a full device would (tests of out-of-memory handling).
    pub fn emulated_with_budget(bytes: usize) -> Self {
        let mut p = Pool::new(None);
        p.budget = Some(bytes);
        p
    }

    /// A block of at least `bytes` for `op` (named in the out-of-memory error); returns
    /// `(pointer, rounded size)`.
    pub fn alloc(&self, op: &str, bytes: usize) -> Result<(sys::CUdeviceptr, usize)> {
        let size = round(bytes);
        let cached = self
            .free
            .lock()
            .unwrap()
            .get_mut(&size)
            .and_then(|v| v.pop());
        let ptr = match cached {
            Some(p) => p,
            None => {
                let p = match self.fresh(size) {
                    Ok(p) => p,
                    Err(_) => {
                        // Out of memory with blocks cached: give them back and retry once.
                        self.trim()?;
                        self.fresh(size)
                            .map_err(|e| self.out_of_memory(op, size, e))?
                    }
                };
                self.reserved.fetch_add(size, Ordering::Relaxed);
                p
            }
        };
        let now = self.in_use.fetch_add(size, Ordering::Relaxed) + size;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok((ptr, size))
    }

    /// A new block from the driver (or the emulator's host memory, within its budget).
    fn fresh(&self, size: usize) -> std::result::Result<sys::CUdeviceptr, String> {
        match &self.ctx {
            Some(ctx) => {
                ctx.bind_to_thread().map_err(|e| e.to_string())?;
                // SAFETY: a plain allocation on the bound context; freed by trim/drop.
                unsafe { result::malloc_sync(size) }.map_err(|e| e.to_string())
            }
            None => {
                let reserved = self.reserved.load(Ordering::Relaxed);
                if self.budget.is_some_and(|b| reserved + size > b) {
                    return Err("over the emulated device's budget".into());
                }
                host_alloc(size).map_err(|e| e.to_string())
            }
        }
    }

    /// The out-of-memory error: the op, what it asked for and what the device has free.
    fn out_of_memory(&self, op: &str, size: usize, why: String) -> Error {
        let in_use = self.in_use.load(Ordering::Relaxed);
        let (free, total) = match (&self.ctx, self.budget) {
            (Some(_), _) => result::mem_get_info().unwrap_or((0, 0)),
            (None, Some(b)) => (b.saturating_sub(self.reserved.load(Ordering::Relaxed)), b),
            (None, None) => (0, 0),
        };
        Error::Device(format!(
            "out of device memory in {op}: requested {size} bytes, {free} bytes free of {total} \
             ({in_use} bytes in use by this process; {why})"
        ))
    }

    /// Returns a block to the cache.
    pub fn release(&self, ptr: sys::CUdeviceptr, size: usize) {
        self.in_use.fetch_sub(size, Ordering::Relaxed);
        self.free.lock().unwrap().entry(size).or_default().push(ptr);
    }

    /// Frees every cached block (after synchronising, so no queued op still uses one).
    pub fn trim(&self) -> Result<()> {
        if let Some(ctx) = &self.ctx {
            ctx.bind_to_thread().map_err(dev)?;
            ctx.synchronize().map_err(dev)?;
        }
        let mut free = self.free.lock().unwrap();
        for (size, ptrs) in free.iter_mut() {
            for p in ptrs.drain(..) {
                match &self.ctx {
                    Some(_) => unsafe { result::free_sync(p) }.map_err(dev)?,
                    None => host_free(p, *size),
                }
                self.reserved.fetch_sub(*size, Ordering::Relaxed);
            }
        }
        free.clear();
        Ok(())
    }

    /// Bytes handed out now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// The most bytes ever handed out at once since the last [`Pool::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement from the current use.
    pub fn reset_peak(&self) {
        self.peak.store(self.in_use(), Ordering::Relaxed);
    }

    /// Bytes obtained from the driver (in use + cached).
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.trim();
    }
}

fn host_layout(size: usize) -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(size, 256).expect("pool sizes are small multiples of 512")
}

/// Emulator memory: fresh blocks are filled with 0xff bytes (NaN in f32 and bf16), so a kernel
/// that reads what nobody wrote shows it.
fn host_alloc(size: usize) -> Result<u64> {
    // SAFETY: size > 0 (pool sizes are rounded up to 512).
    let p = unsafe { std::alloc::alloc(host_layout(size)) };
    if p.is_null() {
        return Err(Error::Device(format!(
            "out of host memory allocating {size} bytes for the emulated device"
        )));
    }
    // SAFETY: p is a fresh allocation of size bytes.
    unsafe { std::ptr::write_bytes(p, 0xff, size) };
    Ok(p as u64)
}

fn host_free(p: u64, size: usize) {
    // SAFETY: allocated by host_alloc with the same size.
    unsafe { std::alloc::dealloc(p as *mut u8, host_layout(size)) }
}

pub(crate) fn dev(e: impl std::fmt::Display) -> Error {
    Error::Device(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::round;

    #[test]
    fn rounding_is_monotone_and_bounded() {
        let mut last = 0;
        for b in (1..(64 << 20)).step_by(77_777) {
            let r = round(b);
            assert!(
                r >= b && r >= last && (r as f64) <= (b as f64) * 1.25 + 512.0,
                "{b} -> {r}"
            );
            last = r;
        }
    }
}
