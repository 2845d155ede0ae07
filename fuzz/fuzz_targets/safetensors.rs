//! Safetensors checkpoints: the header parser (through the safetensors crate), medsa's own
//! offset arithmetic and dtype conversion, and the weight store the model builder uses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medsa::weights::{ParamCounts, SafetensorsFile, WeightStore};

fuzz_target!(|data: &[u8]| {
    let path = medsa_fuzz::scratch_file("safetensors", "safetensors", data);
    let f = SafetensorsFile::open(&path);
    medsa_fuzz::debug("open", &f);
    if let Ok(f) = f {
        let _ = f.metadata().len();
        let keys: Vec<String> = f.keys().map(String::from).collect();
        for k in &keys {
            let _ = f.shape(k);
            let _ = f.contains(k);
            // Both paths: the float-only one model weights use and the integer-accepting one
            // for model inputs; they differ in which dtypes reach the converters.
            let _ = f.tensor(k);
            medsa_fuzz::debug(k, &f.tensor_numeric(k));
        }
    }
    // The store the model builder sees: shapes, counts by part, taking every tensor at its own
    // shape, and the unused-key check.
    if let Ok(mut ws) = WeightStore::open(&path) {
        let _ = ws.metadata();
        let _ = ParamCounts::of(&ws);
        for k in ws.keys() {
            if let Ok(shape) = ws.shape(&k) {
                let _ = ws.take(&k, &shape);
            }
        }
        let _ = ws.finish();
    }
});
