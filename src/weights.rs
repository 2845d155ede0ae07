//! Safetensors I/O: memory-mapped reading (F32, F16 and BF16 converted to f32), atomic writing,
//! and [`WeightStore`], which hands tensors to the model builder by key, checks shapes, accepts
//! key aliases (official SAM vs Med-SA names) and reports any tensor left unused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    infos: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header. Fails with the file name on I/O or format errors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; a file truncated under us while mapped is the one case
        // memmap cannot protect against, as with every mmap-based loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let (n, meta): (usize, Metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let infos = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile {
            path,
            mmap,
            header_len: n + 8,
            infos,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.infos.keys().map(|s| s.as_str())
    }

    /// Whether `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.infos.contains_key(key)
    }

    /// The shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.infos.get(key).map(|i| i.shape.as_slice())
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Reads `key` as an f32 tensor (F32, F16 and BF16 are accepted).
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.read(key, false)
    }

    /// Reads `key` as an f32 tensor from a floating-point or integer dtype (F32, F16, BF16,
    /// I8, I16, I32, I64, U8, U16, U32): model inputs as PyTorch code writes them, e.g. point
    /// labels as `torch.int`. Integers convert exactly up to 2^24 in magnitude, far beyond any
    /// label, depth or coordinate.
    pub fn tensor_numeric(&self, key: &str) -> Result<Tensor> {
        self.read(key, true)
    }

    fn read(&self, key: &str, integers: bool) -> Result<Tensor> {
        let info = self.infos.get(key).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            expected: None,
        })?;
        let (a, b) = info.data_offsets;
        let bytes = &self.mmap[self.header_len + a..self.header_len + b];
        fn conv<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunk of N bytes")))
                .collect()
        }
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => conv(bytes, f32::from_le_bytes),
            Dtype::F16 => conv(bytes, |c| half::f16::from_le_bytes(c).to_f32()),
            Dtype::BF16 => conv(bytes, |c| half::bf16::from_le_bytes(c).to_f32()),
            Dtype::I8 if integers => conv(bytes, |c| i8::from_le_bytes(c) as f32),
            Dtype::I16 if integers => conv(bytes, |c| i16::from_le_bytes(c) as f32),
            Dtype::I32 if integers => conv(bytes, |c| i32::from_le_bytes(c) as f32),
            Dtype::I64 if integers => conv(bytes, |c| i64::from_le_bytes(c) as f32),
            Dtype::U8 if integers => conv(bytes, |c: [u8; 1]| c[0] as f32),
            Dtype::U16 if integers => conv(bytes, |c| u16::from_le_bytes(c) as f32),
            Dtype::U32 if integers => conv(bytes, |c| u32::from_le_bytes(c) as f32),
            other => {
                return Err(Error::DType {
                    path: self.path.clone(),
                    key: key.to_string(),
                    found: format!("{other:?}"),
                    expected: if integers {
                        "F32, F16, BF16, I8, I16, I32, I64, U8, U16, U32"
                    } else {
                        "F32, F16, BF16"
                    },
                })
            }
        };
        Tensor::from_vec(data, &info.shape).map_err(|_| Error::Safetensors {
            path: self.path.clone(),
            msg: format!(
                "tensor `{key}`: data length does not match shape {:?}",
                info.shape
            ),
        })
    }
}

/// Writes `tensors` as an F32 safetensors file, atomically (temporary file + rename), so a
/// reader never sees a half-written file.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    save_safetensors_as(path, tensors, metadata, Dtype::F32)
}

/// Like [`save_safetensors`], storing every tensor as `dtype`: F32, F16 or BF16 (rounded to
/// nearest even).
pub fn save_safetensors_as(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
    dtype: Dtype,
) -> Result<()> {
    let path = path.as_ref();
    let narrow: Vec<Vec<u8>> = match dtype {
        Dtype::F32 => Vec::new(),
        Dtype::F16 => tensors
            .iter()
            .map(|(_, t)| {
                t.data()
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect()
            })
            .collect(),
        Dtype::BF16 => tensors
            .iter()
            .map(|(_, t)| {
                t.data()
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect()
            })
            .collect(),
        other => {
            return Err(Error::Input(format!(
                "cannot write {other:?} tensors: expected F32, F16 or BF16"
            )))
        }
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (k, t))| {
            let bytes: &[u8] = match narrow.get(i) {
                Some(b) => b,
                None => bytemuck::cast_slice(t.data()),
            };
            safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Safetensors {
                    path: path.to_path_buf(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let bytes = safetensors::tensor::serialize(views, meta).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    // A stale temp file (or a link planted under its name) is removed, not written through:
    // `create_new` refuses to follow a symlink, so the bytes land only in this folder.
    if std::fs::symlink_metadata(&tmp).is_ok() {
        std::fs::remove_file(&tmp).map_err(io)?;
    }
    let written = std::fs::File::create_new(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(bytes)?;
        f.sync_data()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Where a [`WeightStore`] reads from.
enum Source {
    File(SafetensorsFile),
    Memory {
        name: PathBuf,
        tensors: BTreeMap<String, Tensor>,
    },
}

/// Refuses a weight with NaN or infinite values: it would load silently and turn every mask into
/// background.
fn check_finite(path: &Path, key: &str, t: &Tensor) -> Result<()> {
    let bad = t.data().iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!(
                "tensor `{key}` has {bad} non-finite values (NaN or Inf) of {}: the checkpoint is \
                 corrupt (`medsa-engine info` lists every such tensor)",
                t.numel()
            ),
        });
    }
    Ok(())
}

/// Hands out a checkpoint's tensors to the model builder and remembers which were used.
pub struct WeightStore {
    source: Source,
    used: BTreeSet<String>,
    /// Tensors laid over the source (an adapter checkpoint on its base model, see
    /// [`WeightStore::overlay`]): they win over same-named source tensors. Kept apart so that
    /// a memory-mapped base is never read into memory just to replace a few tensors.
    overlay: BTreeMap<String, Tensor>,
}

impl WeightStore {
    /// Opens a checkpoint.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Ok(WeightStore {
            source: Source::File(SafetensorsFile::open(path)?),
            used: BTreeSet::new(),
            overlay: BTreeMap::new(),
        })
    }

    /// A store over tensors already in memory (random models for benchmarks and tests); `name`
    /// stands in for the file name in errors.
    pub fn from_tensors(name: &str, tensors: BTreeMap<String, Tensor>) -> Self {
        WeightStore {
            source: Source::Memory {
                name: PathBuf::from(name),
                tensors,
            },
            used: BTreeSet::new(),
            overlay: BTreeMap::new(),
        }
    }

    /// The checkpoint path (or the in-memory store's name).
    pub fn path(&self) -> &Path {
        match &self.source {
            Source::File(f) => f.path(),
            Source::Memory { name, .. } => name,
        }
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let base: Vec<String> = match &self.source {
            Source::File(f) => f.keys().map(String::from).collect(),
            Source::Memory { tensors, .. } => tensors.keys().cloned().collect(),
        };
        if self.overlay.is_empty() {
            return base;
        }
        let all: BTreeSet<String> = base
            .into_iter()
            .chain(self.overlay.keys().cloned())
            .collect();
        all.into_iter().collect()
    }

    /// The `__metadata__` map of a file store (empty for memory stores).
    pub fn metadata(&self) -> HashMap<String, String> {
        match &self.source {
            Source::File(f) => f.metadata().clone(),
            Source::Memory { .. } => HashMap::new(),
        }
    }

    fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        if let Some(t) = self.overlay.get(key) {
            return Some(t.shape().to_vec());
        }
        match &self.source {
            Source::File(f) => f.shape(key).map(|s| s.to_vec()),
            Source::Memory { tensors, .. } => tensors.get(key).map(|t| t.shape().to_vec()),
        }
    }

    /// Whether the checkpoint has `key`.
    pub fn has(&self, key: &str) -> bool {
        self.shape_of(key).is_some()
    }

    /// The shape of `key`, or a missing-key error.
    pub fn shape(&self, key: &str) -> Result<Vec<usize>> {
        self.shape_of(key).ok_or_else(|| Error::MissingKey {
            path: self.path().to_path_buf(),
            key: key.to_string(),
            expected: None,
        })
    }

    /// The first of `keys` present in the checkpoint (aliases, e.g. `rel_pos_h` / `rel_h`).
    pub fn find(&self, keys: &[&str]) -> Option<String> {
        keys.iter().find(|k| self.has(k)).map(|k| k.to_string())
    }

    /// Takes `key`, checking its shape against `expected`.
    pub fn take(&mut self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let found = self.shape_of(key).ok_or_else(|| Error::MissingKey {
            path: self.path().to_path_buf(),
            key: key.to_string(),
            expected: Some(expected.to_vec()),
        })?;
        if found != expected {
            return Err(Error::ShapeMismatch {
                path: self.path().to_path_buf(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found,
            });
        }
        self.used.insert(key.to_string());
        if let Some(t) = self.overlay.get(key) {
            // Checked by `overlay`.
            return Ok(t.clone());
        }
        let t = match &self.source {
            Source::File(f) => f.tensor(key)?,
            Source::Memory { tensors, .. } => tensors[key].clone(),
        };
        check_finite(self.path(), key, &t)?;
        Ok(t)
    }

    /// Every tensor with NaN or infinite values, with how many: what `info` reports. Reads the
    /// whole checkpoint.
    pub fn non_finite(&self) -> Result<Vec<(String, usize)>> {
        let mut bad = Vec::new();
        for k in self.keys() {
            let t = match (self.overlay.get(&k), &self.source) {
                (Some(t), _) => t.clone(),
                (None, Source::File(f)) => f.tensor_numeric(&k)?,
                (None, Source::Memory { tensors, .. }) => tensors[&k].clone(),
            };
            let n = t.data().iter().filter(|v| !v.is_finite()).count();
            if n > 0 {
                bad.push((k, n));
            }
        }
        Ok(bad)
    }

    /// Lays `tensors` over the store (an adapter checkpoint on its base model): each replaces
    /// the same-named tensor, whose shape it must keep, or adds a new key (adapters trained onto
    /// a plain SAM). `source` names the tensors' file in errors. Checks every shape before
    /// changing anything, so a failed overlay leaves the store as it was.
    pub fn overlay(&mut self, source: &Path, tensors: BTreeMap<String, Tensor>) -> Result<()> {
        for (k, t) in &tensors {
            check_finite(source, k, t)?;
            if let Some(base) = self.shape_of(k) {
                if base != t.shape() {
                    return Err(Error::ShapeMismatch {
                        path: source.to_path_buf(),
                        key: k.clone(),
                        expected: base,
                        found: t.shape().to_vec(),
                    });
                }
            }
        }
        self.overlay.extend(tensors);
        Ok(())
    }

    /// Takes the first present key among `aliases` (error names the first alias).
    pub fn take_alias(&mut self, aliases: &[&str], expected: &[usize]) -> Result<Tensor> {
        let key = self.find(aliases).unwrap_or_else(|| aliases[0].to_string());
        self.take(&key, expected)
    }

    /// Marks keys matching `pred` as used without loading them (parts of a checkpoint a caller
    /// deliberately ignores, e.g. the decoder when only the encoder is benchmarked).
    pub fn skip(&mut self, pred: impl Fn(&str) -> bool) {
        for k in self.keys() {
            if pred(&k) {
                self.used.insert(k);
            }
        }
    }

    /// Fails when any tensor of the checkpoint was not taken (an unknown or misnamed key).
    pub fn finish(&self) -> Result<()> {
        let unused: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| !self.used.contains(k))
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(Error::UnexpectedKeys {
                path: self.path().to_path_buf(),
                keys: unused.into_iter().take(10).collect(),
            })
        }
    }
}

/// Parameter counts of a checkpoint, by part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamCounts {
    /// Every tensor.
    pub total: usize,
    /// `image_encoder.*` (adapters included).
    pub image_encoder: usize,
    /// `prompt_encoder.*`.
    pub prompt_encoder: usize,
    /// `mask_decoder.*` (adapters included).
    pub mask_decoder: usize,
    /// Med-SA encoder adapters (Space, MLP, Depth).
    pub encoder_adapters: usize,
    /// Decoder adapters (Hyper, MLP, Cross).
    pub decoder_adapters: usize,
}

impl ParamCounts {
    /// Counts a store's parameters by key.
    pub fn of(ws: &WeightStore) -> Result<Self> {
        let mut c = ParamCounts::default();
        for k in ws.keys() {
            let n: usize = ws.shape(&k)?.iter().product();
            c.total += n;
            let adapter = k.contains("_Adapter.");
            if k.starts_with("image_encoder.") {
                c.image_encoder += n;
                if adapter {
                    c.encoder_adapters += n;
                }
            } else if k.starts_with("prompt_encoder.") {
                c.prompt_encoder += n;
            } else if k.starts_with("mask_decoder.") {
                c.mask_decoder += n;
                if adapter {
                    c.decoder_adapters += n;
                }
            }
        }
        Ok(c)
    }
}
