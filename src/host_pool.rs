//! A pool of large host buffers, so the CPU backend reuses memory instead of faulting in fresh
//! pages for every op's output.
//!
//! Without it, every large output (a 4096 x 3072 MLP activation is 50 MB) comes from a fresh
//! `mmap` and the kernel zeroes each page on first touch: ~10% of a CPU vit_b forward was
//! `clear_page` (perf, 2 cores). Tensors hand their storage back here when the last reference
//! drops ([`crate::tensor::Tensor`]); the CPU backend takes buffers of the size it needs from
//! here first. A model repeats the same shapes block after block, so exact sizes match.
//!
//! Only buffers of at least [`MIN_BYTES`] are kept, at most [`set_cap_mb`] MiB in all (default
//! [`DEFAULT_CAP_MB`]; 0 turns the pool off; `RunOptions::host_pool_mb` on the command line),
//! oldest dropped first.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

/// Smaller buffers come cheaply from the allocator's own free lists.
pub const MIN_BYTES: usize = 1 << 20;

/// Default cap on the bytes held, in MiB.
pub const DEFAULT_CAP_MB: usize = 512;

/// The pool's state: a FIFO of free buffers and their total size.
#[derive(Debug, Default)]
pub struct Pool {
    free: VecDeque<Vec<f32>>,
    bytes: usize,
    cap: usize,
}

impl Pool {
    /// An empty pool holding at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Pool {
            free: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    /// A free buffer with room for `n` floats and not much more (capacity in `n ..= n + n/8`),
    /// emptied (length 0), or `None`.
    pub fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        let i = self
            .free
            .iter()
            .position(|v| v.capacity() >= n && v.capacity() <= n + n / 8)?;
        let mut v = self.free.remove(i)?;
        self.bytes -= v.capacity() * 4;
        v.clear();
        Some(v)
    }

    /// Keeps `v` for reuse when it is large enough, evicting the oldest buffers to stay under
    /// the cap; otherwise frees it.
    pub fn give(&mut self, v: Vec<f32>) {
        let b = v.capacity() * 4;
        if b < MIN_BYTES || b > self.cap {
            return;
        }
        while self.bytes + b > self.cap {
            match self.free.pop_front() {
                Some(old) => self.bytes -= old.capacity() * 4,
                None => break,
            }
        }
        self.bytes += b;
        self.free.push_back(v);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

fn global() -> &'static Mutex<Pool> {
    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(Pool::new(DEFAULT_CAP_MB << 20)))
}

/// Sets the process-wide pool's cap to `mb` MiB (0: no pool), dropping the oldest buffers held
/// beyond it.
pub fn set_cap_mb(mb: usize) {
    let mut p = global().lock().unwrap_or_else(|e| e.into_inner());
    p.cap = mb.saturating_mul(1 << 20);
    while p.bytes > p.cap {
        match p.free.pop_front() {
            Some(old) => p.bytes -= old.capacity() * 4,
            None => break,
        }
    }
}

/// A buffer for `n` floats from the process-wide pool (length 0), if one is free.
pub fn take(n: usize) -> Option<Vec<f32>> {
    if n * 4 < MIN_BYTES {
        return None;
    }
    global().lock().unwrap_or_else(|e| e.into_inner()).take(n)
}

/// Returns a buffer to the process-wide pool (or frees it).
pub fn give(v: Vec<f32>) {
    if v.capacity() * 4 < MIN_BYTES {
        return;
    }
    global().lock().unwrap_or_else(|e| e.into_inner()).give(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    #[test]
    fn reuses_exact_and_near_sizes_only() {
        let mut p = Pool::new(64 * MB);
        let v = vec![1f32; MB]; // 4 MiB
        let ptr = v.as_ptr();
        p.give(v);
        assert_eq!(p.bytes(), 4 * MB);
        assert!(p.take(2 * MB).is_none(), "a larger request");
        assert!(p.take(MB / 2).is_none(), "a much smaller request");
        let w = p.take(MB - 100).expect("a slightly smaller request");
        assert_eq!(w.as_ptr(), ptr);
        assert!(w.is_empty());
        assert_eq!(p.bytes(), 0);
    }

    #[test]
    fn small_buffers_are_not_kept_and_the_cap_evicts_oldest() {
        let mut p = Pool::new(10 * MB);
        p.give(vec![0f32; 1000]);
        assert_eq!(p.bytes(), 0);
        let a = vec![0f32; MB]; // 4 MiB each
        let b = vec![0f32; MB + 1];
        let c = vec![0f32; MB + 2];
        let (pb, pc) = (b.as_ptr(), c.as_ptr());
        p.give(a);
        p.give(b);
        p.give(c); // 12 MiB > 10: the first goes
        assert!(p.bytes() <= 10 * MB);
        let (tb, tc) = (p.take(MB + 1).unwrap(), p.take(MB + 2).unwrap());
        assert_eq!((tb.as_ptr(), tc.as_ptr()), (pb, pc));
        assert!(p.take(MB).is_none());
        // A buffer over the cap is never kept.
        p.give(vec![0f32; 3 * MB]);
        assert_eq!(p.bytes(), 0);
    }

    #[test]
    fn zero_cap_keeps_nothing() {
        let mut p = Pool::new(0);
        p.give(vec![0f32; MB]);
        assert_eq!(p.bytes(), 0);
        assert!(p.take(MB).is_none());
    }
}
