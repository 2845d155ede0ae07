//! The emulated device of [`Cuda::emulated`](super::Cuda::emulated): kernel launches go to the
//! CPU emulator of `tools/kemu` (the kernels' own source compiled as C++, each block's threads
//! run as coroutines, warp collectives and tensor-core fragments emulated; what it checks:
//! `tools/kemu/kemu.h`), device memory is host memory, and the GEMMs cuBLASLt runs on a device
//! are computed here. The backend above it (launchers, shapes, the pool, every op) is the one
//! that runs on a GPU, so tests on machines without one exercise the CUDA code itself.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;

use super::gemm::{Epilogue, GemmSpec};
use super::{Arg, Precision};
use crate::error::{Error, Result};

/// The opt-in shared memory per block the emulated device reports (sm_90's 227 KB), so every
/// kernel variant a Hopper card runs is launched.
pub(super) const MAX_SMEM_OPTIN: i32 = 232448;

/// `kemu_k_<kernel>(void** params)` of `tools/kemu/kemu_register.h`.
type KernelFn = unsafe extern "C" fn(*mut *mut c_void);

/// `kemu_launch` of `tools/kemu/kemu.cpp`.
type LaunchFn = unsafe extern "C" fn(
    KernelFn,
    *const c_char,
    *const u32,
    *const u32,
    u32,
    *mut *mut c_void,
    i32,
    i32,
    u64,
    *mut c_char,
    usize,
) -> i32;

/// How the emulator interleaves the threads of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmuSchedule {
    /// Threads in index order; asynchronous copies land when issued.
    InOrder,
    /// Threads in a new random order at every round (seeded); asynchronous copies land at the
    /// wait. An output that differs from [`EmuSchedule::InOrder`]'s reveals a race: a missing
    /// barrier or wait.
    Shuffled(u64),
}

/// The loaded emulator library.
pub(super) struct Emu {
    launch: LaunchFn,
    kernels: Mutex<HashMap<String, KernelFn>>,
    schedule: Mutex<EmuSchedule>,
    lib: libloading::Library,
}

impl Emu {
    /// Loads the emulator build of the kernels at `path`.
    pub(super) fn load(path: &Path) -> Result<Self> {
        let err = |e: libloading::Error| {
            Error::Device(format!("kernel emulator {}: {e}", path.display()))
        };
        // SAFETY: the library is the emulator build of our kernels; loading runs only the
        // constructors of its C++ globals.
        let lib = unsafe { libloading::Library::new(path) }.map_err(err)?;
        // SAFETY: kemu_launch has the signature of LaunchFn (tools/kemu/kemu.cpp).
        let launch = unsafe { *lib.get::<LaunchFn>(b"kemu_launch\0").map_err(err)? };
        Ok(Emu {
            launch,
            kernels: Mutex::new(HashMap::new()),
            schedule: Mutex::new(EmuSchedule::InOrder),
            lib,
        })
    }

    pub(super) fn set_schedule(&self, s: EmuSchedule) {
        *self.schedule.lock().unwrap() = s;
    }

    fn kernel(&self, name: &str) -> Result<KernelFn> {
        let mut k = self.kernels.lock().unwrap();
        if let Some(f) = k.get(name) {
            return Ok(*f);
        }
        // SAFETY: every kemu_k_* entry has the signature of KernelFn (kemu_register.h).
        let f = unsafe {
            self.lib
                .get::<KernelFn>(format!("kemu_k_{name}\0").as_bytes())
        }
        .map(|s| *s)
        .map_err(|_| Error::Device(format!("kernel `{name}` is not in any of kernels/*.cu")))?;
        k.insert(name.to_string(), f);
        Ok(f)
    }

    /// Runs kernel `name` (suffix included) to completion.
    pub(super) fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.kernel(name)?;
        let mut store = args.to_vec();
        let mut params = Arg::pointers(&mut store);
        let (order, defer, seed) = match *self.schedule.lock().unwrap() {
            EmuSchedule::InOrder => (0, 0, 0),
            EmuSchedule::Shuffled(seed) => (2, 1, seed),
        };
        let cname = CString::new(name).expect("kernel names have no NUL");
        let (g, b) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
        let mut msg = vec![0u8; 1024];
        // SAFETY: params points at live values of the kernel's parameter types (the list a
        // device launch passes), and pointer arguments address this backend's host-memory pool.
        let rc = unsafe {
            (self.launch)(
                f,
                cname.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                smem,
                params.as_mut_ptr(),
                order,
                defer,
                seed,
                msg.as_mut_ptr() as *mut c_char,
                msg.len(),
            )
        };
        if rc != 0 {
            let end = msg.iter().position(|&c| c == 0).unwrap_or(msg.len());
            return Err(Error::Device(format!(
                "launching {name} (emulated): {}",
                String::from_utf8_lossy(&msg[..end])
            )));
        }
        Ok(())
    }
}

/// Element `i` of the array at host address `p`.
fn ld(p: Precision, addr: u64, i: usize) -> f32 {
    // SAFETY (both arms): callers pass addresses of pool blocks holding element i.
    unsafe {
        match p {
            Precision::F32 => *(addr as *const f32).add(i),
            Precision::Bf16 => half::bf16::from_bits(*(addr as *const u16).add(i)).to_f32(),
        }
    }
}

fn st(p: Precision, addr: u64, i: usize, v: f32) {
    // SAFETY (both arms): callers pass addresses of pool blocks holding element i.
    unsafe {
        match p {
            Precision::F32 => *(addr as *mut f32).add(i) = v,
            Precision::Bf16 => *(addr as *mut u16).add(i) = half::bf16::from_f32(v).to_bits(),
        }
    }
}

/// Host-to-"device" copy of `v`, stored in precision `p` at `addr`.
pub(super) fn store(p: Precision, addr: u64, v: &[f32]) {
    for (i, &x) in v.iter().enumerate() {
        st(p, addr, i, x);
    }
}

/// "Device"-to-host copy of `n` elements.
pub(super) fn load(p: Precision, addr: u64, n: usize) -> Vec<f32> {
    (0..n).map(|i| ld(p, addr, i)).collect()
}

/// cuBLASLt's GELU epilogue (the tanh form).
fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh())) as f32
}

/// The GEMM of [`GemmSpec`] with its epilogue, column-major like cuBLASLt: for every batch,
/// `D = gelu?(alpha op(A) op(B) + C + bias)`, products summed in f64 and rounded once to the
/// storage precision (cuBLASLt sums in f32; the difference is far inside every tolerance).
/// Each batch's op(A) rows and op(B) columns are read into f32 once, then the columns of D
/// are computed in parallel.
pub(super) fn gemm(p: Precision, s: &GemmSpec, a: u64, b: u64, d: u64, epi: &Epilogue) {
    let (m, n, k) = (s.m as usize, s.n as usize, s.k as usize);
    let (lda, ldb, ldc) = (s.lda as usize, s.ldb as usize, s.ldc as usize);
    let batch_addr =
        |base: u64, stride: i64, bi: i64| (base as i64 + bi * stride * p.size() as i64) as u64;
    for bi in 0..s.batch.max(1) as i64 {
        let (a, b, dd) = (
            batch_addr(a, s.stride_a, bi),
            batch_addr(b, s.stride_b, bi),
            batch_addr(d, s.stride_c, bi),
        );
        let cc = epi.residual.map(|c| batch_addr(c, s.stride_c, bi));
        // rows[i][kk] = op(A)[i][kk], cols[j][kk] = op(B)[kk][j]
        let vectors = |base: u64, count: usize, index: &dyn Fn(usize, usize) -> usize| {
            (0..count)
                .map(|v| {
                    (0..k)
                        .map(|kk| ld(p, base, index(v, kk)))
                        .collect::<Vec<f32>>()
                })
                .collect::<Vec<_>>()
        };
        let rows = vectors(a, m, &|i, kk| {
            if s.transa {
                kk + i * lda
            } else {
                i + kk * lda
            }
        });
        let cols = vectors(b, n, &|j, kk| {
            if s.transb {
                j + kk * ldb
            } else {
                kk + j * ldb
            }
        });
        cols.par_iter().enumerate().for_each(|(j, col)| {
            for (i, row) in rows.iter().enumerate() {
                let acc: f64 = row
                    .iter()
                    .zip(col)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum();
                let idx = i + j * ldc;
                let mut v = epi.alpha as f64 * acc;
                if let Some(c) = cc {
                    v += ld(p, c, idx) as f64;
                }
                if let Some(bias) = epi.bias {
                    v += ld(p, bias, i) as f64;
                }
                let v = if epi.gelu {
                    gelu_tanh(v as f32)
                } else {
                    v as f32
                };
                st(p, dd, idx, v);
            }
        });
    }
}
