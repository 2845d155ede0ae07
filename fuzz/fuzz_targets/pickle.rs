//! The pickle VM alone: raw `data.pkl` bytes, no zip around them, so mutations spend their
//! effort on opcodes instead of on keeping a zip directory consistent. Storages resolve to a
//! stub inside the library entry point.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    medsa_fuzz::debug("fuzz_pickle", &medsa::pth::fuzz_pickle(data));
});
