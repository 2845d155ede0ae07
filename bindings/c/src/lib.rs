//! The C ABI (`include/medsa.h`): opaque handles over [`medsa::runtime`], status codes, a
//! thread-local last-error string. Every entry point runs inside [`guard`], which turns a
//! panic into `MEDSA_ERR_INTERNAL` instead of unwinding into C.

#![allow(clippy::missing_safety_doc)] // the header documents each function's contract

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use medsa::backend::RunOptions;
use medsa::runtime::{Embeddings, Model, ModelSource, SegmentOptions};
use medsa::sam::{MaskOutput, Prompts};
use medsa::Tensor;

/// `medsa_status`.
pub const MEDSA_OK: c_int = 0;
/// A NULL pointer, a zero size or a buffer too small.
pub const MEDSA_ERR_ARGUMENT: c_int = 1;
/// The engine refused the input or failed.
pub const MEDSA_ERR_ENGINE: c_int = 2;
/// A caught panic.
pub const MEDSA_ERR_INTERNAL: c_int = 3;

/// `MEDSA_ABI_VERSION`.
pub const ABI_VERSION: u32 = 1;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Why a call failed: a bad argument, or an engine error.
enum Fail {
    Arg(String),
    Engine(String),
}

impl From<medsa::Error> for Fail {
    fn from(e: medsa::Error) -> Self {
        Fail::Engine(e.to_string())
    }
}

fn arg(msg: impl Into<String>) -> Fail {
    Fail::Arg(msg.into())
}

/// Runs `f`, records its error and maps it (or a panic) to a status code.
fn guard(f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    set_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => MEDSA_OK,
        Ok(Err(Fail::Arg(m))) => {
            set_error(&m);
            MEDSA_ERR_ARGUMENT
        }
        Ok(Err(Fail::Engine(m))) => {
            set_error(&m);
            MEDSA_ERR_ENGINE
        }
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!(
                "internal error in medsa (please report it): {why}"
            ));
            MEDSA_ERR_INTERNAL
        }
    }
}

unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p)
        .to_str()
        .map(Some)
        .map_err(|_| arg(format!("{what}: not valid UTF-8")))
}

unsafe fn ref_arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    p.as_ref().ok_or_else(|| arg(format!("{what} is NULL")))
}

unsafe fn out_arg<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    p.as_mut().ok_or_else(|| arg(format!("{what} is NULL")))
}

/// `n` values at `p`, which must not be NULL when `n > 0`.
unsafe fn slice_arg<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(arg(format!("{what} is NULL")));
    }
    Ok(std::slice::from_raw_parts(p, n))
}

/// `medsa_model`.
pub struct MedsaModel(Model);
/// `medsa_embeddings`.
pub struct MedsaEmbeddings(Embeddings);
/// `medsa_masks`.
pub struct MedsaMasks {
    logits: Tensor,
    iou: Tensor,
    low: Tensor,
}

static VERSION: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();

#[no_mangle]
pub extern "C" fn medsa_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn medsa_abi_version() -> u32 {
    ABI_VERSION
}

#[no_mangle]
pub extern "C" fn medsa_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[no_mangle]
pub unsafe extern "C" fn medsa_model_open(
    checkpoint: *const c_char,
    adapter: *const c_char,
    device: *const c_char,
    precision: *const c_char,
    out: *mut *mut MedsaModel,
) -> c_int {
    guard(|| {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let ck = str_arg(checkpoint, "checkpoint")?.ok_or_else(|| arg("checkpoint is NULL"))?;
        let ad = str_arg(adapter, "adapter")?.map(std::path::PathBuf::from);
        let dev = str_arg(device, "device")?.unwrap_or("cpu");
        let prec = str_arg(precision, "precision")?.unwrap_or("f32");
        let m = Model::open(ModelSource::new(ck, ad), dev, prec, &RunOptions::default())?;
        *out = Box::into_raw(Box::new(MedsaModel(m)));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_model_free(model: *mut MedsaModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

#[no_mangle]
pub unsafe extern "C" fn medsa_model_image_size(
    model: *const MedsaModel,
    height: *mut usize,
    width: *mut usize,
) -> c_int {
    guard(|| {
        let m = ref_arg(model, "model")?;
        let (h, w) = m.0.image_size();
        *out_arg(height, "height")? = h;
        *out_arg(width, "width")? = w;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_model_info(
    model: *const MedsaModel,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> c_int {
    guard(|| {
        let m = ref_arg(model, "model")?;
        let text = m.0.info().to_string();
        *out_arg(len, "len")? = text.len();
        if buf.is_null() {
            return Ok(());
        }
        if cap < text.len() + 1 {
            return Err(arg(format!(
                "buf: {cap} bytes, the info needs {} (with the NUL)",
                text.len() + 1
            )));
        }
        let dst = std::slice::from_raw_parts_mut(buf.cast::<u8>(), text.len() + 1);
        dst[..text.len()].copy_from_slice(text.as_bytes());
        dst[text.len()] = 0;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_embed(
    model: *const MedsaModel,
    images: *const f32,
    batch: usize,
    height: usize,
    width: usize,
    out: *mut *mut MedsaEmbeddings,
) -> c_int {
    guard(|| {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let m = ref_arg(model, "model")?;
        if batch == 0 || height == 0 || width == 0 {
            return Err(arg("batch, height and width must be at least 1"));
        }
        let n = batch
            .checked_mul(3 * height)
            .and_then(|v| v.checked_mul(width))
            .ok_or_else(|| arg("images: batch x 3 x height x width overflows"))?;
        let data = slice_arg(images, n, "images")?;
        let e = m.0.embed(data, [batch, 3, height, width], None, None)?;
        *out = Box::into_raw(Box::new(MedsaEmbeddings(e)));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_embeddings_shape(
    emb: *const MedsaEmbeddings,
    shape: *mut usize,
) -> c_int {
    guard(|| {
        let e = ref_arg(emb, "emb")?;
        if shape.is_null() {
            return Err(arg("shape is NULL"));
        }
        std::slice::from_raw_parts_mut(shape, 4).copy_from_slice(&e.0.shape());
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_embeddings_copy(
    model: *const MedsaModel,
    emb: *const MedsaEmbeddings,
    out: *mut f32,
    len: usize,
) -> c_int {
    guard(|| {
        let m = ref_arg(model, "model")?;
        let e = ref_arg(emb, "emb")?;
        let n: usize = e.0.shape().iter().product();
        if len < n {
            return Err(arg(format!(
                "out: room for {len} values, the embeddings have {n}"
            )));
        }
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        let t = m.0.download(&e.0)?;
        std::slice::from_raw_parts_mut(out, n).copy_from_slice(t.data());
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_embeddings_free(emb: *mut MedsaEmbeddings) {
    if !emb.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(emb))));
    }
}

/// `medsa_prompt`.
#[repr(C)]
pub struct MedsaPrompt {
    points: *const f32,
    point_labels: *const f32,
    num_points: usize,
    bbox: *const f32,
    mask_input: *const f32,
    multimask: c_int,
    input_height: usize,
    input_width: usize,
    output_height: usize,
    output_width: usize,
}

#[no_mangle]
pub unsafe extern "C" fn medsa_decode(
    model: *const MedsaModel,
    emb: *const MedsaEmbeddings,
    index: usize,
    prompt: *const MedsaPrompt,
    out: *mut *mut MedsaMasks,
) -> c_int {
    guard(|| {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let m = ref_arg(model, "model")?;
        let e = ref_arg(emb, "emb")?;
        let p = ref_arg(prompt, "prompt")?;
        let [b, _, h, w] = e.0.shape();
        if index >= b {
            return Err(arg(format!(
                "index {index}: the embeddings hold {b} images"
            )));
        }
        let n = p.num_points;
        let mut prompts = Prompts::default();
        if n > 0 {
            let pts = slice_arg(p.points, 2 * n, "prompt.points")?;
            let lab = slice_arg(p.point_labels, n, "prompt.point_labels")?;
            prompts.point_coords = Some(Tensor::from_vec(pts.to_vec(), &[1, n, 2])?);
            prompts.point_labels = Some(Tensor::from_vec(lab.to_vec(), &[1, n])?);
        }
        if !p.bbox.is_null() {
            let bx = slice_arg(p.bbox, 4, "prompt.box")?;
            prompts.boxes = Some(Tensor::from_vec(bx.to_vec(), &[1, 4])?);
        }
        if !p.mask_input.is_null() {
            let mi = slice_arg(p.mask_input, 16 * h * w, "prompt.mask_input")?;
            prompts.mask_inputs = Some(Tensor::from_vec(mi.to_vec(), &[1, 1, 4 * h, 4 * w])?);
        }
        let size = |a: usize, b: usize| (a > 0 && b > 0).then_some((a, b));
        let one = if b == 1 {
            None
        } else {
            Some(m.0.select(&e.0, index)?)
        };
        let d = m.0.decode(
            one.as_ref().unwrap_or(&e.0),
            &prompts,
            MaskOutput::from_multimask(p.multimask != 0),
            size(p.input_height, p.input_width),
            size(p.output_height, p.output_width),
        )?;
        *out = Box::into_raw(Box::new(MedsaMasks {
            logits: d.masks,
            iou: d.iou_predictions,
            low: d.low_res_masks,
        }));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_masks_shape(
    masks: *const MedsaMasks,
    count: *mut usize,
    height: *mut usize,
    width: *mut usize,
    low_height: *mut usize,
    low_width: *mut usize,
) -> c_int {
    guard(|| {
        let m = ref_arg(masks, "masks")?;
        let s = m.logits.shape();
        let l = m.low.shape();
        *out_arg(count, "count")? = s[1];
        *out_arg(height, "height")? = s[2];
        *out_arg(width, "width")? = s[3];
        *out_arg(low_height, "low_height")? = l[2];
        *out_arg(low_width, "low_width")? = l[3];
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn medsa_masks_logits(masks: *const MedsaMasks) -> *const f32 {
    masks
        .as_ref()
        .map_or(std::ptr::null(), |m| m.logits.data().as_ptr())
}

#[no_mangle]
pub unsafe extern "C" fn medsa_masks_iou(masks: *const MedsaMasks) -> *const f32 {
    masks
        .as_ref()
        .map_or(std::ptr::null(), |m| m.iou.data().as_ptr())
}

#[no_mangle]
pub unsafe extern "C" fn medsa_masks_low_res(masks: *const MedsaMasks) -> *const f32 {
    masks
        .as_ref()
        .map_or(std::ptr::null(), |m| m.low.data().as_ptr())
}

#[no_mangle]
pub unsafe extern "C" fn medsa_masks_free(masks: *mut MedsaMasks) {
    if !masks.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(masks))));
    }
}

#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn medsa_segment_volume(
    model: *const MedsaModel,
    data: *const f32,
    nx: usize,
    ny: usize,
    nz: usize,
    prompts_json: *const c_char,
    options_json: *const c_char,
    labels: *mut u8,
    len: usize,
) -> c_int {
    guard(|| {
        let m = ref_arg(model, "model")?;
        let n = nx
            .checked_mul(ny)
            .and_then(|v| v.checked_mul(nz))
            .filter(|&n| n > 0)
            .ok_or_else(|| arg(format!("dims {nx} x {ny} x {nz}: expected positive sizes")))?;
        if len < n || labels.is_null() {
            return Err(arg(format!(
                "labels: room for {len} values, the volume has {n}"
            )));
        }
        let vol = slice_arg(data, n, "data")?;
        let prompts =
            str_arg(prompts_json, "prompts_json")?.ok_or_else(|| arg("prompts_json is NULL"))?;
        let objects = medsa::batch::parse_objects(prompts, "prompts_json")?;
        let opts = match str_arg(options_json, "options_json")? {
            Some(t) => SegmentOptions::from_json(t)?,
            None => SegmentOptions::default(),
        };
        let v =
            m.0.segment_volume(vol.to_vec(), [nx, ny, nz], &objects, &opts, None)?;
        std::slice::from_raw_parts_mut(labels, n).copy_from_slice(&v.labels);
        Ok(())
    })
}
