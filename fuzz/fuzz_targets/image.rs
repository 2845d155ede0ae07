//! 2D images through the pipeline's loader and the label-image loader. The first byte picks
//! the file name (`.png` or `.jpg`); both readers sniff the content, so a PNG under a `.jpg`
//! name is also a case worth reaching.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let ext = if mode & 1 == 0 { "png" } else { "jpg" };
    let path = medsa_fuzz::scratch_file("image", ext, rest);
    medsa_fuzz::debug("load_image", &medsa::pipeline::load_image(&path));
    medsa_fuzz::debug("load_label_png", &medsa::batch::load_label_png(&path));
});
