//! GEMMs on cuBLASLt, in column-major terms: `D (m x n, ldc) = op(A) op(B)` (+ a bias of length
//! m added to every column, + a residual C laid out as D, optionally through GELU). Row-major callers swap operands: row-major `Y = X W^T` is
//! column-major `Y^T = W X^T`. Compute is f32 (no TF32) with f32 or bf16 storage; the
//! heuristic's choice is cached per shape, so steady-state calls only build descriptors.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaContext, CudaStream};

use super::pool::{dev, Pool};
use super::{Cuda, Precision};
use crate::error::{Error, Result};

const WORKSPACE: usize = 32 << 20;

/// One GEMM problem (column-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmSpec {
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    pub batch: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub bias: bool,
}

/// What a GEMM does besides the product: `D = gelu?(alpha * op(A) op(B) + C + bias)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue {
    /// Bias of length m (column-major rows), added to every column.
    pub bias: Option<u64>,
    /// cuBLASLt's GELU epilogue (its tanh form, see `Cuda::linear`).
    pub gelu: bool,
    /// C, laid out as D (beta = 1): a residual stream added in the same pass.
    pub residual: Option<u64>,
    /// Scale of the product.
    pub alpha: f32,
}

impl Default for Epilogue {
    fn default() -> Self {
        Epilogue {
            bias: None,
            gelu: false,
            residual: None,
            alpha: 1.0,
        }
    }
}

/// The cuBLASLt handle, its workspace and the algorithm cache.
pub(crate) struct Blas {
    handle: ltsys::cublasLtHandle_t,
    workspace: (u64, usize),
    _pool: Arc<Pool>,
    /// The heuristic's choice per (problem, bf16, GELU epilogue); `None` when it has none for a
    /// GELU epilogue, so the caller's fallback does not ask again on every call.
    algos: Mutex<HashMap<(GemmSpec, bool, bool), Option<ltsys::cublasLtMatmulAlgo_t>>>,
}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("cuBLASLt {what}: {e:?}"))
}

impl Blas {
    pub(crate) fn new(
        ctx: &Arc<CudaContext>,
        _stream: &Arc<CudaStream>,
        pool: &Arc<Pool>,
    ) -> Result<Self> {
        ctx.bind_to_thread().map_err(dev)?;
        let present =
            std::panic::catch_unwind(|| unsafe { ltsys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(Error::Device(
                "libcublasLt.so could not be loaded: add the CUDA library folder to LD_LIBRARY_PATH".into(),
            ));
        }
        let handle = lt::create_handle().map_err(|e| {
            Error::Device(format!(
                "cannot start cuBLASLt (is libcublasLt.so on the library path?): {e:?}"
            ))
        })?;
        let workspace = pool.alloc("the cuBLASLt workspace", WORKSPACE)?;
        Ok(Blas {
            handle,
            workspace,
            _pool: pool.clone(),
            algos: Mutex::new(HashMap::new()),
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
        self._pool.release(self.workspace.0, self.workspace.1);
    }
}

struct Descs {
    desc: ltsys::cublasLtMatmulDesc_t,
    layouts: [ltsys::cublasLtMatrixLayout_t; 3],
}

impl Drop for Descs {
    fn drop(&mut self) {
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn set_desc<T>(
    d: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    unsafe {
        lt::set_matmul_desc_attribute(
            d,
            a,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| blas_err("descriptor", e))
}

fn layout(
    dt: ltsys::cudaDataType,
    rows: u64,
    cols: u64,
    ld: i64,
    batch: i32,
    stride: i64,
) -> Result<ltsys::cublasLtMatrixLayout_t> {
    let l = lt::create_matrix_layout(dt, rows, cols, ld).map_err(|e| blas_err("layout", e))?;
    if batch > 1 {
        unsafe {
            lt::set_matrix_layout_attribute(
                l,
                ltsys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &batch as *const i32 as *const c_void,
                4,
            )
            .map_err(|e| blas_err("layout", e))?;
            lt::set_matrix_layout_attribute(
                l,
                ltsys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                8,
            )
            .map_err(|e| blas_err("layout", e))?;
        }
    }
    Ok(l)
}

impl Cuda {
    /// Runs one GEMM on the backend's stream: `d = op(a) op(b) (+ bias)`.
    pub(crate) fn gemm(
        &self,
        s: GemmSpec,
        a: u64,
        b: u64,
        d: u64,
        bias: Option<u64>,
    ) -> Result<()> {
        let epi = Epilogue {
            bias,
            ..Epilogue::default()
        };
        match self.gemm_ex(s, a, b, d, epi)? {
            true => Ok(()),
            // Plain and bias-only GEMMs always have an algorithm; this is not reached.
            false => Err(blas_err("matmul", format!("no algorithm for {s:?}"))),
        }
    }

    /// Runs one GEMM with an epilogue: `d = gelu?(alpha * op(a) op(b) + residual + bias)`.
    /// Returns `Ok(false)`, having done nothing, when cuBLASLt has no algorithm for a GELU
    /// epilogue on this shape (the caller then applies the activation itself).
    pub(crate) fn gemm_ex(
        &self,
        s: GemmSpec,
        a: u64,
        b: u64,
        d: u64,
        epi: Epilogue,
    ) -> Result<bool> {
        self.timed(
            || {
                format!(
                    "gemm m{} n{} k{} batch{}{}{}",
                    s.m,
                    s.n,
                    s.k,
                    s.batch,
                    if epi.gelu { " +gelu" } else { "" },
                    if epi.residual.is_some() {
                        " +residual"
                    } else {
                        ""
                    }
                )
            },
            || self.gemm_inner(s, a, b, d, epi),
        )
    }

    fn gemm_inner(&self, s: GemmSpec, a: u64, b: u64, d: u64, epi: Epilogue) -> Result<bool> {
        let g = match &self.device {
            super::Device::Gpu(g) => g,
            super::Device::Emu(_) => {
                super::emu::gemm(self.precision, &s, a, b, d, &epi);
                return Ok(true);
            }
        };
        let bias = epi.bias;
        let blas = &g.blas;
        let key = (s, self.precision == Precision::Bf16, epi.gelu);
        if matches!(blas.algos.lock().unwrap().get(&key), Some(None)) {
            return Ok(false);
        }
        let dt = match self.precision {
            Precision::F32 => ltsys::cudaDataType::CUDA_R_32F,
            Precision::Bf16 => ltsys::cudaDataType::CUDA_R_16BF,
        };
        g.ctx.bind_to_thread().map_err(dev)?;
        let desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| blas_err("descriptor", e))?;
        let (ar, ac) = if s.transa { (s.k, s.m) } else { (s.m, s.k) };
        let (br, bc) = if s.transb { (s.n, s.k) } else { (s.k, s.n) };
        let descs = Descs {
            desc,
            layouts: [
                layout(dt, ar, ac, s.lda, s.batch, s.stride_a)?,
                layout(dt, br, bc, s.ldb, s.batch, s.stride_b)?,
                layout(dt, s.m, s.n, s.ldc, s.batch, s.stride_c)?,
            ],
        };
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        set_desc(
            descs.desc,
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &(s.transa as i32),
        )?;
        set_desc(
            descs.desc,
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &(s.transb as i32),
        )?;
        use ltsys::cublasLtEpilogue_t as E;
        let kind = match (bias.is_some(), epi.gelu) {
            (false, false) => None,
            (true, false) => Some(E::CUBLASLT_EPILOGUE_BIAS),
            (false, true) => Some(E::CUBLASLT_EPILOGUE_GELU),
            (true, true) => Some(E::CUBLASLT_EPILOGUE_GELU_BIAS),
        };
        if let Some(kind) = kind {
            set_desc(descs.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &kind)?;
        }
        if let Some(bp) = bias {
            set_desc(descs.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp)?;
            if s.batch > 1 {
                set_desc(descs.desc, A::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &0i64)?;
            }
        }
        // The residual enters as C (beta = 1), same layout as D; the algorithm choice does not
        // depend on beta, only on the epilogue (part of the cache key).
        let cached = blas.algos.lock().unwrap().get(&key).copied();
        let algo = match cached {
            Some(Some(a)) => a,
            Some(None) => return Ok(false),
            None => {
                let pref = lt::create_matmul_pref().map_err(|e| blas_err("preference", e))?;
                let ws = WORKSPACE as u64;
                let r = unsafe {
                    lt::set_matmul_pref_attribute(
                        pref,
                        ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &ws as *const u64 as *const c_void,
                        8,
                    )
                    .and_then(|_| {
                        lt::get_matmul_algo_heuristic(
                            blas.handle,
                            descs.desc,
                            descs.layouts[0],
                            descs.layouts[1],
                            descs.layouts[2],
                            descs.layouts[2],
                            pref,
                        )
                    })
                };
                unsafe {
                    let _ = lt::destroy_matmul_pref(pref);
                }
                let h = match r {
                    Ok(h) => h,
                    // Any failure to find a GELU-epilogue algorithm (NOT_SUPPORTED is the
                    // usual one) only costs speed: the caller applies the exact GELU kernel.
                    Err(_) if epi.gelu => {
                        blas.algos.lock().unwrap().insert(key, None);
                        return Ok(false);
                    }
                    Err(e) => return Err(blas_err(&format!("no algorithm for {s:?}"), e)),
                };
                blas.algos.lock().unwrap().insert(key, Some(h.algo));
                h.algo
            }
        };
        let (alpha, beta) = (epi.alpha, if epi.residual.is_some() { 1f32 } else { 0f32 });
        let c = epi.residual.unwrap_or(d);
        unsafe {
            lt::matmul(
                blas.handle,
                descs.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                descs.layouts[0],
                b as *const c_void,
                descs.layouts[1],
                c as *const c_void,
                descs.layouts[2],
                d as *mut c_void,
                descs.layouts[2],
                &algo,
                blas.workspace.0 as *mut c_void,
                WORKSPACE,
                g.stream.cu_stream() as ltsys::cudaStream_t,
            )
        }
        .map_err(|e| blas_err(&format!("matmul {s:?}"), e))?;
        Ok(true)
    }
}
