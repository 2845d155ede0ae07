//! The CUDA backend: kernels from `kernels/*.cu` (compiled to fatbins at build time and embedded),
//! device memory through a caching allocator, GEMMs on cuBLASLt, everything on one stream.
//!
//! Storage is bf16 (f32 accumulation everywhere) or f32 (for parity with the CPU reference),
//! fixed per backend instance. The CUDA libraries are loaded at run time: on a machine without a
//! driver, [`Cuda::new`] returns a clear error instead of failing to start.

mod attention;
mod attention_backward;
mod backward;
mod conv;
mod copies;
mod emu;
mod fused;
mod gemm;
mod layernorm;
mod ops;
mod params;
mod pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::backend::RunOptions;
use crate::error::{Error, Result};
pub use attention::AttentionOptions;
pub use emu::EmuSchedule;
pub(crate) use pool::dev;
pub use pool::Pool;

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use crate::backend::Precision;

/// A device allocation, returned to its pool when the last tensor using it is dropped.
pub struct DevBuf {
    ptr: sys::CUdeviceptr,
    size: usize,
    pool: Arc<Pool>,
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.pool.release(self.ptr, self.size);
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} B)", self.ptr, self.size)
    }
}

/// A contiguous tensor in device memory (element type = the backend's precision).
#[derive(Clone, Debug)]
pub struct CudaTensor {
    shape: Vec<usize>,
    buf: Arc<DevBuf>,
}

impl CudaTensor {
    /// Device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A kernel argument, passed by value.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    /// A device pointer.
    P(u64),
    /// `int`.
    I(i32),
    /// `long long`.
    L(i64),
    /// `float`.
    F(f32),
    /// The permutation struct of `kernels/common.cuh`.
    Perm(PermArgs),
}

impl Arg {
    /// cuLaunchKernel's parameter array: a pointer to each argument's value (valid while
    /// `args` is neither moved nor dropped).
    pub(crate) fn pointers(args: &mut [Arg]) -> Vec<*mut std::ffi::c_void> {
        args.iter_mut()
            .map(|a| match a {
                Arg::P(v) => v as *mut u64 as *mut _,
                Arg::I(v) => v as *mut i32 as *mut _,
                Arg::L(v) => v as *mut i64 as *mut _,
                Arg::F(v) => v as *mut f32 as *mut _,
                Arg::Perm(v) => v as *mut PermArgs as *mut _,
            })
            .collect()
    }
}

/// `struct PermArgs { int rank; int pad; long long out_dims[6]; long long in_strides[6]; }`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PermArgs {
    pub rank: i32,
    pub pad: i32,
    pub out_dims: [i64; 6],
    pub in_strides: [i64; 6],
}

/// A CUDA device: its context and stream, the kernel modules, cuBLASLt.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(String, Arc<CudaModule>)>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    blas: gemm::Blas,
}

/// Where the backend's work runs.
enum Device {
    /// An NVIDIA GPU.
    Gpu(Gpu),
    /// The CPU kernel emulator ([`Cuda::emulated`]).
    Emu(emu::Emu),
}

/// The shape error of op `op`, written once for every launcher file.
pub(super) fn shape_err(op: &'static str, msg: String) -> Error {
    Error::shape(op, msg)
}

/// The CUDA backend on one device.
pub struct Cuda {
    device: Device,
    pool: Arc<Pool>,
    precision: Precision,
    name: String,
    max_smem_optin: i32,
    /// The model's fused path ([`RunOptions::fused`]). The fused ops themselves always run
    /// their kernels when called.
    fuse: bool,
    /// GELU linears in cuBLASLt's tanh epilogue, bf16 inference only
    /// ([`RunOptions::gelu_tanh_epilogue`]).
    gelu_tanh: bool,
    /// The warp-per-row `layer_norm` kernel ([`RunOptions::layernorm_rows`]).
    layernorm_rows: bool,
    /// The opt-in attention kernel options.
    attn: AttentionOptions,
    /// Per-kernel timings when `MEDSA_PROFILE=1` (each launch synchronised: for profiling only).
    profile: Option<Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
}

// SAFETY: the driver objects are used from one thread at a time through `&self` methods that
// bind the context first; cudarc's handles are thread-safe driver objects.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

/// Whether the NVIDIA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

impl Cuda {
    /// Opens device `ordinal`. Fails with a clear message when there is no driver or device.
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self> {
        if !driver_present() {
            return Err(Error::Device(format!(
                "cuda:{ordinal}: no NVIDIA driver found (libcuda.so could not be loaded); use --device cpu"
            )));
        }
        if fatbins::MODULES.is_empty() {
            return Err(Error::Device("this build has no CUDA kernels".into()));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::Device(format!("cuda:{ordinal}: cannot open the device: {e}")))?;
        let stream = ctx.default_stream();
        let mut modules = Vec::new();
        for (name, image) in fatbins::MODULES {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| Error::Device(format!("loading kernels/{name}.cu: {e}")))?;
            modules.push((name.to_string(), m));
        }
        let dname = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (cc_major, cc_minor) = (
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .map_err(dev)?,
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .map_err(dev)?,
        );
        let max_smem_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(dev)?;
        let pool = Arc::new(Pool::new(Some(ctx.clone())));
        let blas = gemm::Blas::new(&ctx, &stream, &pool)?;
        Ok(Self::with_device(
            Device::Gpu(Gpu {
                ctx,
                stream,
                modules,
                funcs: Mutex::new(HashMap::new()),
                blas,
            }),
            pool,
            format!("cuda:{ordinal} {dname} (sm_{cc_major}{cc_minor}, {precision:?})"),
            precision,
            max_smem_optin,
        ))
    }

    /// The backend on the CPU kernel emulator instead of a GPU: `library` is the emulator build
    /// of `kernels/*.cu` (`tools/kemu`; tests/common/kemu.rs builds it). Every op runs this
    /// backend's own launch code and the kernels' own source, on host memory; GEMMs (cuBLASLt
    /// on a device) are computed on the CPU. Orders of magnitude slower than a GPU: for tests
    /// of the CUDA code on machines without one. It reports the shared-memory limit of sm_90.
    ///
    /// `MEDSA_CUDA_EMULATOR_BYTES` (an emulator diagnostic) gives the emulated device that much
    /// memory, so out-of-memory handling can be tested without a GPU.
    pub fn emulated(library: &std::path::Path, precision: Precision) -> Result<Self> {
        let emu = emu::Emu::load(library)?;
        let pool = match std::env::var("MEDSA_CUDA_EMULATOR_BYTES") {
            Ok(v) => Pool::emulated_with_budget(v.trim().parse().map_err(|_| {
                Error::Input(format!(
                    "MEDSA_CUDA_EMULATOR_BYTES=\"{v}\": expected a number of bytes"
                ))
            })?),
            Err(_) => Pool::new(None),
        };
        Ok(Self::with_device(
            Device::Emu(emu),
            Arc::new(pool),
            format!("emulated CUDA device (kemu on the CPU, {precision:?})"),
            precision,
            emu::MAX_SMEM_OPTIN,
        ))
    }

    fn with_device(
        device: Device,
        pool: Arc<Pool>,
        name: String,
        precision: Precision,
        max_smem_optin: i32,
    ) -> Self {
        Cuda {
            name,
            device,
            pool,
            precision,
            max_smem_optin,
            fuse: RunOptions::default().fused,
            gelu_tanh: RunOptions::default().gelu_tanh_epilogue,
            layernorm_rows: RunOptions::default().layernorm_rows,
            attn: RunOptions::default().attention,
            profile: std::env::var("MEDSA_PROFILE")
                .ok()
                .filter(|v| v == "1")
                .map(|_| Mutex::new(Default::default())),
        }
    }

    /// How the emulated device interleaves threads ([`Cuda::emulated`]); no effect on a GPU.
    pub fn set_emulator_schedule(&self, s: EmuSchedule) {
        if let Device::Emu(e) = &self.device {
            e.set_schedule(s);
        }
    }

    /// Whether this backend runs on the CPU kernel emulator.
    pub fn is_emulated(&self) -> bool {
        matches!(self.device, Device::Emu(_))
    }

    /// Emulated device only: runs kernel `name` (its full name, in any file the emulator library
    /// was built from) as one block of `threads` threads with `smem` bytes of dynamic shared
    /// memory and `ptrs` as its (pointer) arguments: for testing the emulator itself on kernels
    /// outside the backend (`tools/kemu/checks.cu`).
    pub fn emulator_launch(&self, name: &str, threads: u32, smem: u32, ptrs: &[u64]) -> Result<()> {
        match &self.device {
            Device::Emu(e) => {
                let args: Vec<Arg> = ptrs.iter().map(|&p| Arg::P(p)).collect();
                e.launch(name, (1, 1, 1), (threads, 1, 1), smem, &args)
            }
            Device::Gpu(_) => Err(Error::Device(
                "emulator_launch: this backend runs on a GPU, not on the emulator".into(),
            )),
        }
    }

    /// Runs `f` and, when profiling, records its synchronised wall time under `name`.
    pub(crate) fn timed<R>(
        &self,
        name: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        let Some(p) = &self.profile else { return f() };
        self.synchronize()?;
        let t = std::time::Instant::now();
        let r = f()?;
        self.synchronize()?;
        let dt = t.elapsed().as_secs_f64();
        let mut m = p.lock().unwrap();
        let e = m.entry(name()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        Ok(r)
    }

    /// The profile table (kernel, calls, total seconds), largest first; empty unless
    /// `MEDSA_PROFILE=1`. Resets the counters.
    pub fn take_profile(&self) -> Vec<(String, u64, f64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let mut v: Vec<_> = std::mem::take(&mut *p.lock().unwrap())
            .into_iter()
            .map(|(k, (n, t))| (k, n, t))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Takes `o`'s choices (the host pool's cap is the CPU's and is left alone).
    pub fn set_run_options(&mut self, o: &RunOptions) {
        self.fuse = o.fused;
        self.gelu_tanh = o.gelu_tanh_epilogue;
        self.layernorm_rows = o.layernorm_rows;
        self.attn = o.attention;
    }

    /// The backend's [`RunOptions`] (the host pool's default cap).
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            fused: self.fuse,
            gelu_tanh_epilogue: self.gelu_tanh,
            layernorm_rows: self.layernorm_rows,
            attention: self.attn,
            ..RunOptions::default()
        }
    }

    /// Whether the model takes the fused path.
    pub fn fusion(&self) -> bool {
        self.fuse
    }

    /// Chooses the model's path (fused or op by op) alone: for tests that check both.
    pub fn set_fusion(&mut self, on: bool) {
        self.fuse = on;
    }

    /// The attention kernel options asked for ([`RunOptions::attention`], or the last
    /// [`Cuda::set_attention_options`]).
    pub fn attention_options(&self) -> AttentionOptions {
        self.attn
    }

    /// Chooses the attention kernel options alone: for tests and benches that compare them.
    pub fn set_attention_options(&mut self, o: AttentionOptions) {
        self.attn = o;
    }

    /// Storage precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The allocator (peak and current bytes).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        match &self.device {
            Device::Gpu(g) => {
                g.ctx.bind_to_thread().map_err(dev)?;
                g.stream.synchronize().map_err(dev)
            }
            // Emulated work is done when its call returns.
            Device::Emu(_) => Ok(()),
        }
    }

    /// An uninitialised tensor for `op` (named if the device is out of memory).
    pub(crate) fn empty(&self, op: &str, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        let (ptr, size) = self.pool.alloc(op, n * self.precision.size())?;
        Ok(CudaTensor {
            shape: shape.to_vec(),
            buf: Arc::new(DevBuf {
                ptr,
                size,
                pool: self.pool.clone(),
            }),
        })
    }

    /// A kernel by base name, for this backend's precision (`layernorm` -> `layernorm_bf16`).
    fn func(&self, g: &Gpu, base: &str) -> Result<CudaFunction> {
        let name = format!("{base}_{}", self.precision.suffix());
        let mut funcs = g.funcs.lock().unwrap();
        if let Some(f) = funcs.get(&name) {
            return Ok(f.clone());
        }
        for (_, m) in &g.modules {
            if let Ok(f) = m.load_function(&name) {
                funcs.insert(name, f.clone());
                return Ok(f);
            }
        }
        Err(Error::Device(format!(
            "kernel `{name}` is not in any of kernels/*.cu"
        )))
    }

    /// Launches kernel `base` with `args` (in the order of the kernel's parameter list).
    pub(crate) fn launch(
        &self,
        base: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        if smem as i32 > self.max_smem_optin {
            return Err(Error::Device(format!(
                "{base}: needs {smem} bytes of shared memory, the device allows {}",
                self.max_smem_optin
            )));
        }
        let g = match &self.device {
            Device::Gpu(g) => g,
            Device::Emu(e) => {
                let name = format!("{base}_{}", self.precision.suffix());
                return self.timed(
                    || format!("kernel {base}"),
                    || e.launch(&name, grid, block, smem, args),
                );
            }
        };
        let f = self.func(g, base)?;
        if smem > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(dev)?;
        }
        let mut store: Vec<Arg> = args.to_vec();
        let mut params = Arg::pointers(&mut store);
        self.timed(
            || format!("kernel {base}"),
            || {
                g.ctx.bind_to_thread().map_err(dev)?;
                unsafe {
                    result::launch_kernel(
                        f.cu_function(),
                        grid,
                        block,
                        smem,
                        g.stream.cu_stream(),
                        &mut params,
                    )
                }
                .map_err(|e| {
                    Error::Device(format!("launching {base}_{}: {e}", self.precision.suffix()))
                })
            },
        )
    }

    /// Grid for a grid-stride elementwise kernel over `n` items (block 256).
    pub(crate) fn grid1d(n: usize) -> (u32, u32, u32) {
        (n.div_ceil(256).clamp(1, 65535 * 4) as u32, 1, 1)
    }
}
