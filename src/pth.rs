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

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

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

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        err(self.path, msg)
    }

    fn read(&self) -> Result<Vec<PthTensor>> {
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
        let sd = self.find_state_dict(&top)?;
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
                Some(self.materialise(&entries, prefix, &key, t)?)
            } else {
                // Still check the view fits its storage, so a bad file fails here too.
                self.storage_bytes(&entries, prefix, &key, t)?;
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
    fn storage_bytes<'b>(
        &'b self,
        entries: &HashMap<String, Entry>,
        prefix: &str,
        key: &str,
        t: &TensorRef,
    ) -> Result<&'b [u8]> {
        let s = &t.storage;
        let name = format!("{prefix}data/{}", s.key);
        let e = entries.get(&name).ok_or_else(|| {
            self.err(format!(
                "tensor `{key}`: storage record `{name}` is missing from the archive"
            ))
        })?;
        let bytes = entry_data(self.path, self.bytes, e, &name)?;
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
        entries: &HashMap<String, Entry>,
        prefix: &str,
        key: &str,
        t: &TensorRef,
    ) -> Result<Tensor> {
        let bytes = self.storage_bytes(entries, prefix, key, t)?;
        let numel = t
            .size
            .iter()
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .ok_or_else(|| self.err(format!("tensor `{key}`: size {:?} overflows", t.size)))?;
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

// ---------------------------------------------------------------------------------------------
// Zip (STORED entries, ZIP64)

/// One archive member: where its data lies.
struct Entry {
    /// Offset of the local file header.
    local: u64,
    /// Stored size.
    size: u64,
    /// Compression method (0 = STORED).
    method: u16,
    /// General-purpose flags (bit 0: encrypted).
    flags: u16,
}

fn rd_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn rd_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn zip_entries(path: &Path, b: &[u8]) -> Result<HashMap<String, Entry>> {
    let bad = |what: &str| err(path, format!("truncated or corrupt zip archive: {what}"));
    // End of central directory: 22 bytes plus a comment of up to 64 KiB, searched backwards.
    const EOCD: u32 = 0x0605_4b50;
    if b.len() < 22 {
        return Err(bad("shorter than an end-of-central-directory record"));
    }
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..=b.len() - 22)
        .rev()
        .find(|&i| rd_u32(b, i) == Some(EOCD))
        .ok_or_else(|| bad("no end-of-central-directory record"))?;
    let mut count = rd_u16(b, eocd + 10).ok_or_else(|| bad("EOCD"))? as u64;
    let mut cd_size = rd_u32(b, eocd + 12).ok_or_else(|| bad("EOCD"))? as u64;
    let mut cd_off = rd_u32(b, eocd + 16).ok_or_else(|| bad("EOCD"))? as u64;
    if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
        // ZIP64: a locator right before the EOCD points at the ZIP64 EOCD record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| rd_u32(b, l) == Some(0x0706_4b50))
            .ok_or_else(|| bad("ZIP64 end-of-central-directory locator missing"))?;
        let z = rd_u64(b, loc + 8).ok_or_else(|| bad("ZIP64 locator"))?;
        let z = usize::try_from(z)
            .ok()
            .filter(|&z| rd_u32(b, z) == Some(0x0606_4b50))
            .ok_or_else(|| bad("ZIP64 end-of-central-directory record missing"))?;
        count = rd_u64(b, z + 32).ok_or_else(|| bad("ZIP64 EOCD"))?;
        cd_size = rd_u64(b, z + 40).ok_or_else(|| bad("ZIP64 EOCD"))?;
        cd_off = rd_u64(b, z + 48).ok_or_else(|| bad("ZIP64 EOCD"))?;
    }
    let cd_start = usize::try_from(cd_off).map_err(|_| bad("central directory offset"))?;
    let cd_end = usize::try_from(cd_size)
        .ok()
        .and_then(|s| cd_start.checked_add(s))
        .filter(|&e| e <= b.len())
        .ok_or_else(|| bad("central directory runs past the end of the file"))?;
    let mut out = HashMap::new();
    let mut p = cd_start;
    for _ in 0..count {
        if p + 46 > cd_end || rd_u32(b, p) != Some(0x0201_4b50) {
            return Err(bad("central directory entry"));
        }
        let r16 = |o| rd_u16(b, p + o).unwrap_or(0);
        let r32 = |o| rd_u32(b, p + o).unwrap_or(0);
        let flags = r16(8);
        let method = r16(10);
        let mut csize = r32(20) as u64;
        let mut usize_ = r32(24) as u64;
        let (nlen, xlen, clen) = (r16(28) as usize, r16(30) as usize, r16(32) as usize);
        let mut local = r32(42) as u64;
        let name_end = p + 46 + nlen;
        let next = name_end + xlen + clen;
        if next > cd_end {
            return Err(bad("central directory entry runs past the directory"));
        }
        let name = String::from_utf8_lossy(&b[p + 46..name_end]).into_owned();
        // ZIP64 extended information: the 64-bit values of the fields set to all ones, in order.
        let mut x = name_end;
        while x + 4 <= name_end + xlen {
            let (id, len) = (r16(x - p) as usize, r16(x + 2 - p) as usize);
            let body = x + 4;
            if body + len > name_end + xlen {
                return Err(bad("extra field"));
            }
            if id == 1 {
                let mut q = body;
                let mut take = |v: &mut u64| -> Result<()> {
                    if *v == 0xFFFF_FFFF {
                        if q + 8 > body + len {
                            return Err(bad("ZIP64 extra field"));
                        }
                        *v = rd_u64(b, q).unwrap_or(0);
                        q += 8;
                    }
                    Ok(())
                };
                take(&mut usize_)?;
                take(&mut csize)?;
                take(&mut local)?;
            }
            x = body + len;
        }
        out.insert(
            name,
            Entry {
                local,
                size: if method == 0 {
                    csize.max(usize_)
                } else {
                    csize
                },
                method,
                flags,
            },
        );
        p = next;
    }
    Ok(out)
}

/// The bytes of a STORED entry.
fn entry_data<'b>(path: &Path, b: &'b [u8], e: &Entry, name: &str) -> Result<&'b [u8]> {
    if e.flags & 1 != 0 {
        return Err(err(path, format!("zip entry `{name}` is encrypted")));
    }
    if e.method != 0 {
        return Err(err(
            path,
            format!(
                "zip entry `{name}` is compressed (method {}): torch.save writes uncompressed \
                 entries; re-save the checkpoint with torch.save",
                e.method
            ),
        ));
    }
    let bad = || {
        err(
            path,
            format!("truncated or corrupt zip archive: entry `{name}` lies outside the file"),
        )
    };
    let l = usize::try_from(e.local).map_err(|_| bad())?;
    if rd_u32(b, l) != Some(0x0403_4b50) {
        return Err(bad());
    }
    let nlen = rd_u16(b, l + 26).ok_or_else(bad)? as usize;
    let xlen = rd_u16(b, l + 28).ok_or_else(bad)? as usize;
    let start = l + 30 + nlen + xlen;
    let end = usize::try_from(e.size)
        .ok()
        .and_then(|s| start.checked_add(s))
        .filter(|&end| end <= b.len())
        .ok_or_else(bad)?;
    Ok(&b[start..end])
}

// ---------------------------------------------------------------------------------------------
// Pickle

#[derive(Debug)]
struct StorageRef {
    key: String,
    dtype: DType,
    numel: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

type Dict = Rc<RefCell<Vec<(Value, Value)>>>;

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(usize),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Dict),
    /// A `module.name` global.
    Global(String),
    /// The result of calling a global we do not model (kept opaque; an error only if the state
    /// dict needs it).
    Object(String),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(_) => "an int".into(),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(_) => "a string".into(),
            Value::Bytes(n) => format!("{n} bytes"),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the global `{g}`"),
            Value::Object(g) => format!("a `{g}` object (unsupported pickle global `{g}`)"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }
}

struct Vm<'a> {
    path: &'a Path,
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Vm<'a> {
    fn new(path: &'a Path, code: &'a [u8]) -> Self {
        Vm {
            path,
            code,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        err(
            self.path,
            format!("data.pkl at byte {}: {}", self.pos, msg.into()),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let code = self.code;
        let s = self
            .pos
            .checked_add(n)
            .and_then(|e| code.get(self.pos..e))
            .ok_or_else(|| self.err("pickle truncated"))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.code[self.pos.min(self.code.len())..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("pickle truncated in a GLOBAL"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: u64) -> Result<String> {
        let n = usize::try_from(n).map_err(|_| self.err("string length overflows"))?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("stack underflow (pop past a MARK)"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        self.stack.last_mut().ok_or_else(|| {
            err(
                self.path,
                format!("data.pkl at byte {pos}: stack underflow"),
            )
        })
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK past the stack"));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&self, i: u32) -> Result<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {i} is not set")))
    }
    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.err("stack underflow"))?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!("unsupported pickle protocol {v}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a size hint
                }
                b'}' => self.stack.push(Value::Dict(Default::default())),
                b']' => self.stack.push(Value::List(Default::default())),
                b')' => self.stack.push(Value::Tuple(Default::default())),
                b'(' => self.marks.push(self.stack.len()),
                b'X' => {
                    let n = self.u32()? as u64;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'C' | b'B' | 0x8e => {
                    // SHORT_BINBYTES / BINBYTES / BINBYTES8: kept as a length only.
                    let n = match op {
                        b'C' => self.u8()? as u64,
                        b'B' => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = usize::try_from(n).map_err(|_| self.err("bytes length overflows"))?;
                    self.take(n)?;
                    self.stack.push(Value::Bytes(n));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.err(format!("LONG1 of {n} bytes is too large")));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xFF; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}")));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args), only for objects we keep opaque.
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match cls {
                        Value::Global(g) => Value::Object(g),
                        other => {
                            return Err(
                                self.err(format!("NEWOBJ on {}, expected a class", other.kind()))
                            )
                        }
                    };
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: set state. Dict attributes (OrderedDict `_metadata`) and opaque
                    // objects' state are not needed.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Object(_) => {}
                        other => {
                            let k = other.kind();
                            return Err(self.err(format!("BUILD on {k}")));
                        }
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                _ => {
                    self.pos = at;
                    return Err(self.err(format!(
                        "unsupported pickle opcode 0x{op:02x} ({:?}): not a torch.save state dict",
                        op as char
                    )));
                }
            }
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let d = match self.top()? {
            Value::Dict(d) => d.clone(),
            Value::Object(_) => return Ok(()), // a dict subclass we keep opaque
            other => {
                let k = other.kind();
                return Err(self.err(format!("SETITEM on {k}")));
            }
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let existing = match &k {
                Value::Str(s) => d
                    .iter()
                    .position(|(x, _)| matches!(x, Value::Str(y) if y == s)),
                _ => None,
            };
            match existing {
                Some(i) => d[i].1 = v,
                None => d.push((k, v)),
            }
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => {
                let k = other.kind();
                Err(self.err(format!("APPEND on {k}")))
            }
        }
    }

    fn call(&self, f: Value, args: Value) -> Result<Value> {
        let g = match f {
            Value::Global(g) => g,
            Value::Object(g) => return Ok(Value::Object(g)),
            other => return Err(self.err(format!("REDUCE on {}", other.kind()))),
        };
        let args = match args {
            Value::Tuple(t) => t,
            other => {
                return Err(self.err(format!(
                    "REDUCE `{g}` with {} arguments, expected a tuple",
                    other.kind()
                )))
            }
        };
        match g.as_str() {
            "collections.OrderedDict" | "builtins.dict" | "__builtin__.dict" => {
                let d: Dict = Default::default();
                if let Some(Value::List(items)) = args.first() {
                    for it in items.borrow().iter() {
                        if let Value::Tuple(kv) = it {
                            if kv.len() == 2 {
                                d.borrow_mut().push((kv[0].clone(), kv[1].clone()));
                            }
                        }
                    }
                }
                Ok(Value::Dict(d))
            }
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                if args.len() < 4 {
                    return Err(self.err(format!("`{g}` with {} arguments", args.len())));
                }
                let storage = match &args[0] {
                    Value::Storage(s) => s.clone(),
                    other => {
                        return Err(
                            self.err(format!("`{g}`: expected a storage, found {}", other.kind()))
                        )
                    }
                };
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage,
                    offset: self.index(&args[1], "storage offset")?,
                    size: self.indices(&args[2], "size")?,
                    stride: self.indices(&args[3], "stride")?,
                })))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args.first() {
                    Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                    _ => Err(self.err(format!("`{g}` without a tensor"))),
                }
            }
            _ => Ok(Value::Object(g)),
        }
    }

    fn index(&self, v: &Value, what: &str) -> Result<usize> {
        match v {
            Value::Int(i) => {
                usize::try_from(*i).map_err(|_| self.err(format!("tensor {what} {i} is negative")))
            }
            other => Err(self.err(format!(
                "tensor {what} is {}, expected an int",
                other.kind()
            ))),
        }
    }

    fn indices(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        match v {
            Value::Tuple(t) => t.iter().map(|x| self.index(x, what)).collect(),
            other => Err(self.err(format!(
                "tensor {what} is {}, expected a tuple",
                other.kind()
            ))),
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let t = match &pid {
            Value::Tuple(t) => t,
            other => {
                return Err(self.err(format!(
                    "persistent id is {}, expected a tuple",
                    other.kind()
                )))
            }
        };
        match t.as_slice() {
            [Value::Str(tag), Value::Global(ty), Value::Str(key), _location, Value::Int(numel)]
                if tag == "storage" =>
            {
                let dtype = ty
                    .strip_prefix("torch.")
                    .and_then(DType::from_storage)
                    .ok_or_else(|| self.err(format!("unsupported storage type `{ty}`")))?;
                let numel = usize::try_from(*numel)
                    .map_err(|_| self.err(format!("storage `{key}` has {numel} elements")))?;
                Ok(Value::Storage(Rc::new(StorageRef {
                    key: key.clone(),
                    dtype,
                    numel,
                })))
            }
            _ => Err(self.err(format!(
                "unsupported persistent id ({} items), expected ('storage', type, key, location, numel)",
                t.len()
            ))),
        }
    }
}
