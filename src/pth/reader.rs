//! The checkpoint reader proper: checks the file is a `torch.save` zip archive, runs its
//! `data.pkl`, picks the state dict out of the saved object and maps each tensor view onto its
//! storage bytes (bounds-checked), materialising floating-point tensors as contiguous f32.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::pickle::{Dict, TensorRef, Value, Vm};
use super::zip::{entry_data, zip_entries};
use super::{err, DType, PthTensor};

/// Gives a storage record's bytes by its archive name, `None` when there is no such record.
pub(super) type Resolve<'r, 'a> = dyn Fn(&str) -> Option<Result<&'a [u8]>> + 'r;

pub(super) struct Reader<'a> {
    pub(super) path: &'a Path,
    pub(super) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        err(self.path, msg)
    }

    pub(super) fn read(&self) -> Result<Vec<PthTensor>> {
        let b = self.bytes;
        if !b.starts_with(b"PK\x03\x04") && !b.starts_with(b"PK\x05\x06") {
            if b.first() == Some(&0x80) {
                return Err(self.err(
                    "legacy (non-zip) torch.save format: re-save with torch>=1.6 \
                     (torch.save(torch.load(f), f))",
                ));
            }
            if b.len() > 262 && &b[257..262] == b"ustar" {
                return Err(self.err(
                    "legacy tar torch.save format: re-save with torch>=1.6 (torch.save(torch.load(f), f))",
                ));
            }
            return Err(self.err("not a PyTorch checkpoint (no zip signature at the start)"));
        }
        let entries = zip_entries(self.path, b)?;
        let pkl = entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .min()
            .cloned();
        let Some(pkl) = pkl else {
            if entries
                .keys()
                .any(|n| n.ends_with("/constants.pkl") || n.contains("/code/"))
            {
                return Err(self.err(
                    "a TorchScript archive (torch.jit.save), not a torch.save checkpoint: \
                     save model.state_dict() with torch.save",
                ));
            }
            return Err(self.err(format!(
                "zip archive without `<name>/data.pkl` ({} entries): not a torch.save checkpoint",
                entries.len()
            )));
        };
        let prefix = &pkl[..pkl.len() - "data.pkl".len()];
        if let Some(bo) = entries.get(&format!("{prefix}byteorder")) {
            let bo = entry_data(self.path, b, bo, &format!("{prefix}byteorder"))?;
            if bo != b"little" {
                return Err(self.err(format!(
                    "byteorder `{}`: only little-endian checkpoints are supported",
                    String::from_utf8_lossy(bo)
                )));
            }
        }
        let data = entry_data(self.path, b, &entries[&pkl], &pkl)?;
        let top = Vm::new(self.path, data).run()?;
        let resolve = |name: &str| entries.get(name).map(|e| entry_data(self.path, b, e, name));
        self.state_dict(&top.value, prefix, &resolve)
    }

    /// Picks the state dict out of the unpickled object and maps each tensor view onto its
    /// storage. `resolve` gives the bytes of a storage record by its archive name (`None` when
    /// the archive has no such record); kept apart from the zip so the pickle alone can be
    /// fuzzed against stub storages ([`super::fuzz_pickle`]).
    pub(super) fn state_dict(
        &self,
        top: &Value,
        prefix: &str,
        resolve: &Resolve<'_, 'a>,
    ) -> Result<Vec<PthTensor>> {
        let sd = self.find_state_dict(top)?;
        let mut out = Vec::new();
        for (k, v) in sd.borrow().iter() {
            let key = match k {
                Value::Str(s) => s.clone(),
                other => {
                    return Err(self.err(format!(
                        "state dict has a non-string key ({})",
                        other.kind()
                    )))
                }
            };
            let t = match v {
                Value::Tensor(t) => t,
                other => {
                    return Err(self.err(format!(
                        "state dict entry `{key}` is {}, not a tensor",
                        other.kind()
                    )))
                }
            };
            let name = key.strip_prefix("module.").unwrap_or(&key).to_string();
            let tensor = if t.storage.dtype.is_float() {
                Some(self.materialise(resolve, prefix, &key, t)?)
            } else {
                // Still check the view fits its storage, so a bad file fails here too.
                self.storage_bytes(resolve, prefix, &key, t)?;
                None
            };
            out.push(PthTensor {
                name,
                dtype: t.storage.dtype,
                shape: t.size.clone(),
                tensor,
            });
        }
        Ok(out)
    }

    fn find_state_dict(&self, top: &Value) -> Result<Dict> {
        let d = match top {
            Value::Dict(d) => d,
            Value::Object(g) | Value::Global(g) => {
                return Err(self.err(format!(
                    "unsupported pickle global `{g}` at the top level: the file holds a pickled \
                     Python object (e.g. a whole nn.Module), not a state dict; save \
                     model.state_dict() instead"
                )))
            }
            other => {
                return Err(self.err(format!(
                    "the saved object is {}, expected a state dict",
                    other.kind()
                )))
            }
        };
        let all_tensors = {
            let v = d.borrow();
            !v.is_empty() && v.iter().all(|(_, x)| matches!(x, Value::Tensor(_)))
        };
        if all_tensors {
            return Ok(d.clone());
        }
        for name in ["state_dict", "model"] {
            if let Some(Value::Dict(inner)) = dict_get(d, name) {
                return Ok(inner);
            }
        }
        // Name what is there, and the first foreign object found, to make the error useful.
        let v = d.borrow();
        let keys: Vec<String> = v
            .iter()
            .take(12)
            .map(|(k, x)| match k {
                Value::Str(s) => format!("{s} ({})", x.kind()),
                other => other.kind(),
            })
            .collect();
        if let Some(g) = v.iter().find_map(|(_, x)| match x {
            Value::Object(g) | Value::Global(g) => Some(g.clone()),
            _ => None,
        }) {
            return Err(self.err(format!(
                "unsupported pickle global `{g}` and no state dict among the top-level entries [{}]",
                keys.join(", ")
            )));
        }
        Err(self.err(format!(
            "no state dict: the top-level dict is not all tensors and has no `state_dict` or \
             `model` dict (entries: [{}])",
            keys.join(", ")
        )))
    }

    /// The storage's bytes and the largest element index the view touches (checked).
    fn storage_bytes(
        &self,
        resolve: &Resolve<'_, 'a>,
        prefix: &str,
        key: &str,
        t: &TensorRef,
    ) -> Result<&'a [u8]> {
        let s = &t.storage;
        let name = format!("{prefix}data/{}", s.key);
        let bytes = resolve(&name).ok_or_else(|| {
            self.err(format!(
                "tensor `{key}`: storage record `{name}` is missing from the archive"
            ))
        })??;
        let need = s.numel.checked_mul(s.dtype.size());
        if need.is_none_or(|n| n > bytes.len()) {
            return Err(self.err(format!(
                "tensor `{key}`: storage `{name}` has {} bytes, {} {} elements need {}",
                bytes.len(),
                s.numel,
                s.dtype,
                need.map_or("more".into(), |n| n.to_string())
            )));
        }
        if t.size.len() != t.stride.len() {
            return Err(self.err(format!(
                "tensor `{key}`: size {:?} and stride {:?} differ in rank",
                t.size, t.stride
            )));
        }
        if t.size.iter().all(|&n| n > 0) {
            let last = t
                .size
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&n, &st)| {
                    (n - 1).checked_mul(st).and_then(|x| x.checked_add(acc))
                });
            if last.is_none_or(|l| l >= s.numel) {
                return Err(self.err(format!(
                    "tensor `{key}`: view (offset {}, size {:?}, stride {:?}) runs past its \
                     storage of {} elements",
                    t.offset, t.size, t.stride, s.numel
                )));
            }
        }
        Ok(bytes)
    }

    fn materialise(
        &self,
        resolve: &Resolve<'_, 'a>,
        prefix: &str,
        key: &str,
        t: &TensorRef,
    ) -> Result<Tensor> {
        let bytes = self.storage_bytes(resolve, prefix, key, t)?;
        let numel = t
            .size
            .iter()
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .ok_or_else(|| self.err(format!("tensor `{key}`: size {:?} overflows", t.size)))?;
        // A view that fits its storage can still have far more elements than the storage when
        // strides overlap (stride 0, as `expand` makes): a few bytes of pickle would then ask
        // for terabytes. No state-dict tensor needs that, so materialise at most the storage.
        if numel > t.storage.numel {
            return Err(self.err(format!(
                "tensor `{key}`: view (size {:?}, stride {:?}) has {numel} elements, more than \
                 its storage of {}: overlapping (expanded) views are not supported; save the \
                 tensor with .contiguous()",
                t.size, t.stride, t.storage.numel
            )));
        }
        let dtype = t.storage.dtype;
        let get = |i: usize| -> f32 {
            let es = dtype.size();
            let b = &bytes[i * es..(i + 1) * es];
            match dtype {
                DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                DType::F64 => {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                }
                _ => unreachable!("materialise is only called for float dtypes"),
            }
        };
        let mut data = Vec::with_capacity(numel);
        if numel > 0 {
            // Contiguous row-major strides: one linear run.
            let mut contiguous = true;
            let mut expect = 1usize;
            for (&n, &st) in t.size.iter().zip(&t.stride).rev() {
                if n != 1 && st != expect {
                    contiguous = false;
                }
                expect = expect.saturating_mul(n);
            }
            if contiguous {
                data.extend((t.offset..t.offset + numel).map(get));
            } else {
                // Odometer over the index; `src` follows it incrementally.
                let rank = t.size.len();
                let mut idx = vec![0usize; rank];
                let mut src = t.offset;
                for _ in 0..numel {
                    data.push(get(src));
                    for d in (0..rank).rev() {
                        idx[d] += 1;
                        src += t.stride[d];
                        if idx[d] < t.size[d] {
                            break;
                        }
                        src -= t.stride[d] * t.size[d];
                        idx[d] = 0;
                    }
                }
            }
        }
        Tensor::from_vec(data, &t.size).map_err(|e| self.err(format!("tensor `{key}`: {e}")))
    }
}

fn dict_get(d: &Dict, key: &str) -> Option<Value> {
    d.borrow().iter().find_map(|(k, v)| match k {
        Value::Str(s) if s == key => Some(v.clone()),
        _ => None,
    })
}
