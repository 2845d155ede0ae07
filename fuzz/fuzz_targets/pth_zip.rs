//! PyTorch `torch.save` checkpoints end to end: the zip central directory (ZIP64 included),
//! `data.pkl` on the pickle VM, state-dict selection and the tensor views over storages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = medsa_fuzz::scratch_file("pth_zip", "pth", data);
    // Errors are the expected answer to a malformed checkpoint; only panics, hangs and
    // runaway allocations are findings.
    medsa_fuzz::debug("read_checkpoint", &medsa::pth::read_checkpoint(&path));
});
