//! Optimiser state for resuming a training run (the companion of an adapter checkpoint).
//!
//! [`save_state`] writes a second safetensors file (by convention [`state_path`] beside the
//! adapter): AdamW's `m` and `v` per parameter (`m.{key}`, `v.{key}`), and metadata with the
//! step, the per-parameter step counts, opaque RNG words (the data loader's state) and free JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::checkpoint::{meta_parse, meta_str, serialize_sorted, STATE_FORMAT};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::optim::AdamWState;
use crate::weights::{write_atomic, SafetensorsFile};

/// Optimiser state for resuming a training run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainState {
    /// Optimiser steps taken.
    pub step: u64,
    /// Opaque generator words (e.g. the data loader's `LoaderState::to_words`).
    pub rng: Vec<u64>,
    /// AdamW state per parameter key.
    pub optim: BTreeMap<String, AdamWState>,
    /// Anything else the trainer wants back (JSON; `null` when unused).
    pub extra: Value,
}

/// The conventional state file of an adapter checkpoint: `x.safetensors` -> `x.state.safetensors`.
pub fn state_path(adapter: &Path) -> PathBuf {
    let name = adapter
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    adapter.with_file_name(format!("{stem}.state.safetensors"))
}

/// Writes the optimiser state (atomically): `m.{key}` and `v.{key}` tensors (empty for a
/// parameter not stepped yet) and metadata `format`, `step`, `rng`, `optim_steps`, `extra`.
pub fn save_state(path: &Path, st: &TrainState) -> Result<()> {
    let mut owned: Vec<(String, Tensor)> = Vec::with_capacity(2 * st.optim.len());
    let mut steps = serde_json::Map::new();
    for (k, s) in &st.optim {
        if s.m.len() != s.v.len() {
            return Err(Error::Input(format!(
                "{}: optimiser state of `{k}` has {} first and {} second moments",
                path.display(),
                s.m.len(),
                s.v.len()
            )));
        }
        owned.push((
            format!("m.{k}"),
            Tensor::from_vec(s.m.clone(), &[s.m.len()])?,
        ));
        owned.push((
            format!("v.{k}"),
            Tensor::from_vec(s.v.clone(), &[s.v.len()])?,
        ));
        steps.insert(k.clone(), json!(s.step));
    }
    let mut m = BTreeMap::new();
    m.insert("format".to_string(), STATE_FORMAT.to_string());
    m.insert("step".to_string(), st.step.to_string());
    m.insert(
        "rng".to_string(),
        st.rng
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    m.insert("optim_steps".to_string(), Value::Object(steps).to_string());
    m.insert("extra".to_string(), st.extra.to_string());
    let list: Vec<(String, &Tensor)> = owned.iter().map(|(k, t)| (k.clone(), t)).collect();
    let bytes = serialize_sorted(path, &list, &m)?;
    write_atomic(path, &bytes)
}

/// Reads [`save_state`]'s file; errors name the file and the field or key.
pub fn load_state(path: &Path) -> Result<TrainState> {
    let f = SafetensorsFile::open(path)?;
    let m = f.metadata();
    let fmt_err = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let format = meta_str(path, m, "format")?;
    if format != STATE_FORMAT {
        return Err(fmt_err(format!(
            "metadata `format` = \"{format}\": expected \"{STATE_FORMAT}\""
        )));
    }
    let step = meta_parse(path, m, "step", "a non-negative integer")?;
    let rng_text = meta_str(path, m, "rng")?;
    let rng = if rng_text.is_empty() {
        Vec::new()
    } else {
        rng_text
            .split(',')
            .map(|w| w.trim().parse::<u64>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                fmt_err(format!(
                    "metadata `rng` = \"{rng_text}\": expected comma-separated non-negative integers"
                ))
            })?
    };
    let steps: Value = serde_json::from_str(meta_str(path, m, "optim_steps")?)
        .map_err(|e| fmt_err(format!("metadata `optim_steps` is not valid JSON: {e}")))?;
    let steps = steps
        .as_object()
        .ok_or_else(|| fmt_err("metadata `optim_steps`: expected a JSON object".into()))?;
    let extra: Value = serde_json::from_str(meta_str(path, m, "extra")?)
        .map_err(|e| fmt_err(format!("metadata `extra` is not valid JSON: {e}")))?;
    let mut optim = BTreeMap::new();
    for (k, s) in steps {
        let s = s.as_u64().ok_or_else(|| {
            fmt_err(format!(
                "metadata `optim_steps`.`{k}`: expected a non-negative integer"
            ))
        })?;
        let mv = f.tensor(&format!("m.{k}"))?.into_vec();
        let vv = f.tensor(&format!("v.{k}"))?.into_vec();
        if mv.len() != vv.len() {
            return Err(fmt_err(format!(
                "tensors `m.{k}` and `v.{k}` have {} and {} values",
                mv.len(),
                vv.len()
            )));
        }
        optim.insert(
            k.clone(),
            AdamWState {
                m: mv,
                v: vv,
                step: s,
            },
        );
    }
    if let Some(k) = f.keys().find(|k| {
        !k.strip_prefix("m.")
            .or(k.strip_prefix("v."))
            .is_some_and(|p| steps.contains_key(p))
    }) {
        return Err(fmt_err(format!(
            "tensor `{k}` belongs to no parameter listed in metadata `optim_steps`"
        )));
    }
    Ok(TrainState {
        step,
        rng,
        optim,
        extra,
    })
}
