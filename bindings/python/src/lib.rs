//! `medsa._medsa`: the compiled half of the Python package. Each function is a thin call into
//! [`medsa::runtime`]: arrays come in as borrowed numpy buffers (C-contiguous; the Python half,
//! `python/medsa/__init__.py`, arranges that and copies only when the caller's array is not), go
//! out as numpy arrays that own the engine's buffers (no copy), and every engine error becomes a
//! `medsa.MedsaError` with the engine's message. Compute runs with the GIL released.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use medsa::backend::RunOptions;
use medsa::runtime::{Embeddings as RtEmbeddings, Model as RtModel, ModelSource, SegmentOptions};
use medsa::sam::{MaskOutput, Prompts};
use medsa::Tensor;

pyo3::create_exception!(
    _medsa,
    MedsaError,
    PyRuntimeError,
    "An error reported by the medsa engine: the message names the file, field or argument and what was expected."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    MedsaError::new_err(e.to_string())
}

/// A C-contiguous borrowed view of `a`, or a clear error.
fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| err(format!("{what}: the array must be C-contiguous")))
}

/// Wraps an engine-owned buffer as a numpy array of `shape` without copying it.
fn to_numpy<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, data).reshape(shape)?.into_any())
}

fn tensor_to_numpy<'py>(py: Python<'py>, t: Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape().to_vec();
    to_numpy(py, t.into_vec(), &shape)
}

fn tensor_of(a: &PyReadonlyArrayDyn<'_, f32>, what: &str, rank: usize) -> PyResult<Tensor> {
    if a.ndim() != rank {
        return Err(err(format!(
            "{what}: expected {rank} dimensions, got shape {:?}",
            a.shape()
        )));
    }
    Tensor::from_vec(slice(a, what)?.to_vec(), a.shape()).map_err(err)
}

/// A model loaded on its device.
#[pyclass(module = "medsa._medsa", frozen)]
struct Model {
    inner: RtModel,
}

/// Image embeddings, kept on the model's device.
#[pyclass(module = "medsa._medsa", frozen)]
struct Embeddings {
    inner: RtEmbeddings,
}

#[pymethods]
impl Embeddings {
    /// `(B, C, h, w)`.
    #[getter]
    fn shape(&self) -> (usize, usize, usize, usize) {
        let s = self.inner.shape();
        (s[0], s[1], s[2], s[3])
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (checkpoint, adapter=None, device="cpu", precision="f32", allow_base_mismatch=false))]
    fn new(
        py: Python<'_>,
        checkpoint: std::path::PathBuf,
        adapter: Option<std::path::PathBuf>,
        device: &str,
        precision: &str,
        allow_base_mismatch: bool,
    ) -> PyResult<Self> {
        let mut src = ModelSource::new(checkpoint, adapter);
        src.allow_base_mismatch = allow_base_mismatch;
        let inner = py
            .detach(|| RtModel::open(src, device, precision, &RunOptions::default()))
            .map_err(err)?;
        Ok(Model { inner })
    }

    /// The model's description as JSON text.
    fn info_json(&self) -> String {
        self.inner.info().to_string()
    }

    /// `(H, W)` of the model input.
    #[getter]
    fn image_size(&self) -> (usize, usize) {
        self.inner.image_size()
    }

    /// Encodes preprocessed images `(B, 3, H, W)` float32.
    #[pyo3(signature = (images, depth=None, depth_mode=None))]
    fn embed(
        &self,
        py: Python<'_>,
        images: PyReadonlyArrayDyn<'_, f32>,
        depth: Option<usize>,
        depth_mode: Option<&str>,
    ) -> PyResult<Embeddings> {
        let mode = match depth_mode {
            None => None,
            Some("compat") => Some(medsa::medsa::depth_branch::DepthMode::Compat),
            Some("per_token" | "per-token") => {
                Some(medsa::medsa::depth_branch::DepthMode::PerToken)
            }
            Some(m) => {
                return Err(err(format!(
                    "depth_mode \"{m}\": expected \"compat\" or \"per_token\""
                )))
            }
        };
        if images.ndim() != 4 {
            return Err(err(format!(
                "images: expected (B, 3, H, W), got shape {:?}",
                images.shape()
            )));
        }
        let s = images.shape();
        let shape = [s[0], s[1], s[2], s[3]];
        let data = slice(&images, "images")?;
        let inner = py
            .detach(|| self.inner.embed(data, shape, depth, mode))
            .map_err(err)?;
        Ok(Embeddings { inner })
    }

    /// The embeddings as a float32 array `(B, C, h, w)`.
    fn embeddings_array<'py>(
        &self,
        py: Python<'py>,
        emb: &Embeddings,
    ) -> PyResult<Bound<'py, PyAny>> {
        let t = py.detach(|| self.inner.download(&emb.inner)).map_err(err)?;
        tensor_to_numpy(py, t)
    }

    /// Decodes prompts in model-input pixels; returns `(masks, iou, low_res_logits)`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (emb, points=None, labels=None, boxes=None, mask_input=None, multimask=false, classes=None, input_size=None, original_size=None))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        emb: &Embeddings,
        points: Option<PyReadonlyArrayDyn<'_, f32>>,
        labels: Option<PyReadonlyArrayDyn<'_, f32>>,
        boxes: Option<PyReadonlyArrayDyn<'_, f32>>,
        mask_input: Option<PyReadonlyArrayDyn<'_, f32>>,
        multimask: bool,
        classes: Option<usize>,
        input_size: Option<(usize, usize)>,
        original_size: Option<(usize, usize)>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let prompts = Prompts {
            point_coords: points
                .as_ref()
                .map(|a| tensor_of(a, "points", 3))
                .transpose()?,
            point_labels: labels
                .as_ref()
                .map(|a| tensor_of(a, "labels", 2))
                .transpose()?,
            boxes: boxes
                .as_ref()
                .map(|a| tensor_of(a, "boxes", 2))
                .transpose()?,
            mask_inputs: mask_input
                .as_ref()
                .map(|a| tensor_of(a, "mask_input", 4))
                .transpose()?,
        };
        let output = match classes {
            Some(n) => MaskOutput::Classes(n),
            None => MaskOutput::from_multimask(multimask),
        };
        let d = py
            .detach(|| {
                self.inner
                    .decode(&emb.inner, &prompts, output, input_size, original_size)
            })
            .map_err(err)?;
        PyTuple::new(
            py,
            [
                tensor_to_numpy(py, d.masks)?,
                tensor_to_numpy(py, d.iou_predictions)?,
                tensor_to_numpy(py, d.low_res_masks)?,
            ],
        )
    }

    /// Segments an RGB image `(H, W, 3)` float32 on 0..255: `(labels uint8, probability float32)`,
    /// both `(H, W)`.
    fn segment_image<'py>(
        &self,
        py: Python<'py>,
        image: PyReadonlyArrayDyn<'_, f32>,
        prompts_json: &str,
        options_json: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let s = image.shape().to_vec();
        if s.len() != 3 || s[2] != 3 {
            return Err(err(format!("image: expected (H, W, 3), got shape {s:?}")));
        }
        let objects = medsa::batch::parse_objects(prompts_json, "prompts").map_err(err)?;
        let opts = SegmentOptions::from_json(options_json).map_err(err)?;
        let img = medsa::pipeline::RgbImage {
            height: s[0],
            width: s[1],
            data: slice(&image, "image")?.to_vec(),
        };
        let (labels, prob) = py
            .detach(|| self.inner.segment_image(&img, &objects, &opts))
            .map_err(err)?;
        PyTuple::new(
            py,
            [to_numpy(py, labels, &s[..2])?, to_numpy(py, prob, &s[..2])?],
        )
    }

    /// Segments a volume given as a C-contiguous float32 array `(nz, ny, nx)` (a NIfTI array's
    /// memory order): `(labels uint8, probability float32 or None)` in the same shape.
    #[pyo3(signature = (volume, prompts_json, options_json, progress=None))]
    fn segment_volume<'py>(
        &self,
        py: Python<'py>,
        volume: PyReadonlyArrayDyn<'_, f32>,
        prompts_json: &str,
        options_json: &str,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let s = volume.shape().to_vec();
        if s.len() != 3 {
            return Err(err(format!(
                "volume: expected 3 dimensions, got shape {s:?}"
            )));
        }
        let objects = medsa::batch::parse_objects(prompts_json, "prompts").map_err(err)?;
        let opts = SegmentOptions::from_json(options_json).map_err(err)?;
        let data = slice(&volume, "volume")?.to_vec();
        // A raising callback is reported after the run; the engine does not stop mid-volume.
        let failed: std::sync::Mutex<Option<PyErr>> = Default::default();
        let tell = |done: usize, total: usize| {
            if let Some(cb) = &progress {
                Python::attach(|py| {
                    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                    if f.is_none() {
                        if let Err(e) = cb.call1(py, (done, total)) {
                            *f = Some(e);
                        }
                    }
                });
            }
        };
        let m = py
            .detach(|| {
                self.inner
                    .segment_volume(data, [s[2], s[1], s[0]], &objects, &opts, Some(&tell))
            })
            .map_err(err)?;
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let prob = if opts.probabilities {
            to_numpy(py, m.prob, &s)?
        } else {
            py.None().into_bound(py)
        };
        PyTuple::new(py, [to_numpy(py, m.labels, &s)?, prob])
    }
}

/// The geometry of a NIfTI file, kept to write masks that overlay it.
#[pyclass(module = "medsa._medsa", frozen)]
struct Header {
    inner: medsa::data::nifti::NiftiHeader,
}

#[pymethods]
impl Header {
    /// `(nx, ny, nz)`.
    #[getter]
    fn dims(&self) -> (usize, usize, usize) {
        let d = self.inner.dims();
        (d[0], d[1], d[2])
    }
    /// Voxel size `(sx, sy, sz)` in the file's units (mm for almost all scans).
    #[getter]
    fn spacing(&self) -> (f64, f64, f64) {
        let s = self.inner.spacing();
        (s[0], s[1], s[2])
    }
    /// The voxel-to-world 4x4 matrix (sform if set, else qform, else the pixdim scaling).
    #[getter]
    fn affine(&self) -> Vec<Vec<f64>> {
        self.inner.affine().iter().map(|r| r.to_vec()).collect()
    }
    /// `(qform_code, sform_code)`.
    #[getter]
    fn codes(&self) -> (i16, i16) {
        (self.inner.qform_code(), self.inner.sform_code())
    }
    fn __repr__(&self) -> String {
        format!(
            "Header(dims={:?}, spacing={:?})",
            self.inner.dims(),
            self.inner.spacing()
        )
    }
}

/// Reads a NIfTI-1 file (`.nii` or `.nii.gz`): `(float32 array (nz, ny, nx), Header)`.
#[pyfunction]
fn read_nifti<'py>(py: Python<'py>, path: std::path::PathBuf) -> PyResult<Bound<'py, PyTuple>> {
    let v = py
        .detach(|| medsa::data::nifti::read_nifti(&path))
        .map_err(err)?;
    let [nx, ny, nz] = v.dims;
    let arr = to_numpy(py, v.data, &[nz, ny, nx])?;
    let h = Bound::new(py, Header { inner: v.header })?.into_any();
    PyTuple::new(py, [arr, h])
}

/// Writes `data` (C-contiguous `(nz, ny, nx)`, uint8 labels or float32) on `like`'s grid,
/// atomically.
#[pyfunction]
fn write_nifti(
    py: Python<'_>,
    path: std::path::PathBuf,
    data: &Bound<'_, PyAny>,
    like: &Header,
) -> PyResult<()> {
    let [nx, ny, nz] = like.inner.dims();
    let check = |shape: &[usize]| -> PyResult<()> {
        if shape != [nz, ny, nx] {
            return Err(err(format!(
                "{}: the array has shape {shape:?}, the header's grid is (nx, ny, nz) = ({nx}, {ny}, {nz})",
                path.display()
            )));
        }
        Ok(())
    };
    if let Ok(a) = data.extract::<PyReadonlyArrayDyn<'_, u8>>() {
        check(a.shape())?;
        let d = slice(&a, "data")?;
        py.detach(|| medsa::data::nifti::write_labels(&path, &like.inner, d))
            .map_err(err)
    } else if let Ok(a) = data.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        check(a.shape())?;
        let d = slice(&a, "data")?;
        py.detach(|| medsa::data::nifti::write_f32(&path, &like.inner, d))
            .map_err(err)
    } else {
        Err(err(format!(
            "{}: expected a uint8 label array or a float32 array",
            path.display()
        )))
    }
}

/// The two masks of a metric as flat slices, once their shapes agree.
fn mask_pair<'a>(
    op: &str,
    pred: &'a PyReadonlyArrayDyn<'_, bool>,
    truth: &'a PyReadonlyArrayDyn<'_, bool>,
) -> PyResult<(&'a [bool], &'a [bool])> {
    if pred.shape() != truth.shape() {
        return Err(err(format!(
            "{op}: prediction shape {:?} differs from ground truth shape {:?}",
            pred.shape(),
            truth.shape()
        )));
    }
    Ok((slice(pred, "pred")?, slice(truth, "truth")?))
}

/// Dice, IoU and HD95 of two C-contiguous boolean arrays of one shape, with per-axis spacing.
#[pyfunction]
fn scores(
    py: Python<'_>,
    pred: PyReadonlyArrayDyn<'_, bool>,
    truth: PyReadonlyArrayDyn<'_, bool>,
    spacing: Vec<f64>,
) -> PyResult<(f64, f64, f64)> {
    let shape = pred.shape().to_vec();
    let (p, t) = mask_pair("scores", &pred, &truth)?;
    let s = py
        .detach(|| medsa::metrics::scores(p, t, &shape, &spacing))
        .map_err(err)?;
    Ok((s.dice, s.iou, s.hd95))
}

/// Dice and IoU of two C-contiguous boolean arrays of one shape (no HD95).
#[pyfunction]
fn overlap(
    py: Python<'_>,
    pred: PyReadonlyArrayDyn<'_, bool>,
    truth: PyReadonlyArrayDyn<'_, bool>,
) -> PyResult<(f64, f64)> {
    let (p, t) = mask_pair("overlap", &pred, &truth)?;
    py.detach(|| medsa::metrics::overlap(p, t)).map_err(err)
}

/// The engine's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _medsa(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MedsaError", m.py().get_type::<MedsaError>())?;
    m.add_class::<Model>()?;
    m.add_class::<Embeddings>()?;
    m.add_class::<Header>()?;
    m.add_function(wrap_pyfunction!(read_nifti, m)?)?;
    m.add_function(wrap_pyfunction!(write_nifti, m)?)?;
    m.add_function(wrap_pyfunction!(scores, m)?)?;
    m.add_function(wrap_pyfunction!(overlap, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
