//! A native reader for PyTorch checkpoints written by `torch.save` (the zip format, the default
//! since PyTorch 1.6), so that official `.pth` files convert to safetensors without Python.
//!
//! The file is a zip archive (STORED entries, ZIP64 for large files) holding
//! `<prefix>/data.pkl`, a pickle of the saved object, and `<prefix>/data/<key>`, the raw
//! little-endian bytes of each storage. The pickle is run on a small virtual machine that knows
//! exactly the opcodes and globals `torch.save` emits for state dicts and training checkpoints;
//! tensors stay lazy views (storage, offset, size, stride) until the state dict is chosen, so an
//! optimizer state next to the weights costs nothing.
//!
//! Every failure is an [`Error::Pth`] naming the file and what was found; no input panics.

mod pickle;
mod reader;
mod zip;

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use reader::Reader;

/// The element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float (read as f32).
    F64,
    /// 64-bit integer.
    I64,
    /// 32-bit integer.
    I32,
    /// 16-bit integer.
    I16,
    /// 8-bit integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether the values are floating point (model weights).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// The safetensors-style name (F32, BF16, I64, BOOL, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of a checkpoint's state dict.
#[derive(Clone, Debug)]
pub struct PthTensor {
    /// The key, with a DataParallel `module.` prefix removed.
    pub name: String,
    /// The stored element type.
    pub dtype: DType,
    /// The shape.
    pub shape: Vec<usize>,
    /// The values as contiguous f32 for floating-point tensors; `None` for integer and boolean
    /// tensors (buffers such as counters, not model weights).
    pub tensor: Option<Tensor>,
}

/// Reads the floating-point tensors of a checkpoint's state dict (f64 narrowed to f32, views
/// made contiguous), in file order. Integer and boolean tensors are left out: see
/// [`read_checkpoint`] to list them.
pub fn read_state_dict(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    Ok(read_checkpoint(path)?
        .into_iter()
        .filter_map(|t| t.tensor.map(|x| (t.name, x)))
        .collect())
}

/// Reads every tensor of a checkpoint's state dict with its stored dtype.
///
/// The state dict is the top-level dict when all its values are tensors, else its `state_dict`
/// (or `model`) entry, as in training checkpoints (`{"epoch", "state_dict", "optimizer", ...}`).
pub fn read_checkpoint(path: impl AsRef<Path>) -> Result<Vec<PthTensor>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len == 0 {
        return Err(err(path, "empty file"));
    }
    // SAFETY: read-only map; a file truncated under us while mapped is the one case memmap
    // cannot protect against, as with every mmap-based loader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Reader { path, bytes: &mmap }.read()
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Pth {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Entry point for fuzzing (`fuzz/fuzz_targets/pickle.rs`), not a stable API: runs the pickle
/// virtual machine over raw `data.pkl` bytes exactly as [`read_checkpoint`] does, then picks the
/// state dict and checks and materialises every tensor view against a stub storage resolver
/// (each storage record is 16 KiB of zeros, enough for the
/// views in the seed pickles), so the fuzzer reaches the VM and the view checks
/// without having to build a zip archive around them. Malformed input is an `Err`; a panic is
/// a bug.
#[doc(hidden)]
pub fn fuzz_pickle(pickle: &[u8]) -> Result<()> {
    static STUB: [u8; 16384] = [0; 16384];
    let path = Path::new("fuzz/data.pkl");
    let top = pickle::Vm::new(path, pickle).run()?;
    let reader = Reader { path, bytes: &[] };
    let resolve = |_: &str| Some(Ok(&STUB[..]));
    reader.state_dict(&top.value, "fuzz/", &resolve)?;
    Ok(())
}
