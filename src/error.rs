//! Library errors. Every variant carries enough context (file, key, expected vs found) for a user
//! to fix the input without reading our code.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors reported by the medsa library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file that could not be parsed.
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        msg: String,
    },
    /// A checkpoint lacks a tensor the model needs.
    #[error("{path}: missing tensor `{key}`{}", expected_shape(expected))]
    MissingKey {
        /// The checkpoint.
        path: PathBuf,
        /// The key that is absent.
        key: String,
        /// The shape the model expects, when the caller knows it.
        expected: Option<Vec<usize>>,
    },
    /// A checkpoint has tensors the model does not know.
    #[error("{path}: unexpected tensor(s) {keys:?}")]
    UnexpectedKeys {
        /// The checkpoint.
        path: PathBuf,
        /// The unknown keys (first few).
        keys: Vec<String>,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint or input file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype we cannot load.
    #[error("{path}: tensor `{key}` has dtype {found}, expected one of {expected}")]
    DType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The dtype found.
        found: String,
        /// The dtypes this reader accepts.
        expected: &'static str,
    },
    /// The checkpoint's tensors do not describe a consistent model.
    #[error("{path}: {msg}")]
    Config {
        /// The checkpoint.
        path: PathBuf,
        /// What is inconsistent.
        msg: String,
    },
    /// A PyTorch checkpoint (`.pth`) that could not be read.
    #[error("{path}: {msg}")]
    Pth {
        /// The checkpoint.
        path: PathBuf,
        /// What was found.
        msg: String,
    },
    /// A data file (an image volume such as NIfTI) that is malformed or in a form we do not
    /// support; `msg` names the field and the value found.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the header field.
        msg: String,
    },
    /// Bad user input that is not tied to a file (prompts, sizes, options).
    #[error("{0}")]
    Input(String),
    /// An operation got tensors of incompatible shapes (a bug in the caller).
    #[error("shape error in {op}: {msg}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A device (CUDA) failure.
    #[error("device error: {0}")]
    Device(String),
}

impl Error {
    /// Shorthand for a shape error in `op`.
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
}

/// The `(expected shape [..])` suffix of a missing-key message, or nothing when the shape is not
/// known at the point of the lookup.
fn expected_shape(expected: &Option<Vec<usize>>) -> String {
    match expected {
        Some(s) => format!(" (expected shape {s:?})"),
        None => String::new(),
    }
}
