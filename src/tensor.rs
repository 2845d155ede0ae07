//! Host tensors: shape + contiguous row-major f32 data.
//!
//! `Tensor` is the currency between files, the CPU reference backend and the host side of other
//! backends. Storage is reference counted so that reshapes and clones are free; every op that
//! changes values allocates a new buffer, and large buffers go back to the host pool
//! ([`crate::host_pool`]) when their last tensor drops, for the CPU backend to reuse.

use std::sync::Arc;

use crate::error::{Error, Result};

/// A tensor's values; returned to the host pool when dropped.
#[derive(Clone, PartialEq, Default)]
struct Buf(Vec<f32>);

impl Drop for Buf {
    fn drop(&mut self) {
        crate::host_pool::give(std::mem::take(&mut self.0));
    }
}

/// A contiguous, row-major f32 tensor in host memory.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Arc<Buf>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl Tensor {
    /// Wraps `data` with `shape`; fails when the element counts differ.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("shape {shape:?} needs {n} elements, got {}", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: Arc::new(Buf(data)),
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: Arc::new(Buf(vec![0.0; n])),
        }
    }

    /// A tensor filled with `v`.
    pub fn full(shape: &[usize], v: f32) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: Arc::new(Buf(vec![v; n])),
        }
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `i` (negative counts from the end).
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        let i = if i < 0 { r + i } else { i };
        self.shape[i as usize]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.0.len()
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data.0
    }

    /// Mutable access to the values (copies the buffer if it is shared).
    pub fn data_mut(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.data).0.as_mut_slice()
    }

    /// Consumes the tensor and returns its values (copies if shared).
    pub fn into_vec(self) -> Vec<f32> {
        match Arc::try_unwrap(self.data) {
            Ok(mut b) => std::mem::take(&mut b.0),
            Err(a) => a.0.clone(),
        }
    }

    /// Same data, new shape (no copy); fails when the element counts differ.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {:?} as {shape:?}", self.shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: self.data.clone(),
        })
    }
}
