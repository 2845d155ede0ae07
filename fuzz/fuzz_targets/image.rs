//! 2D images through the pipeline's loader and the label-image loader. The first byte picks
//! the file name (`.png` or `.jpg`); both readers sniff the content, so a PNG under a `.jpg`
//! name is also a case worth reaching.
#![no_main]

use std::sync::Once;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static BUDGET: Once = Once::new();
    // A pixel budget of 2^22 (4 Mpx, the size of a large radiograph at 2048 x 2048) instead of
    // the default 2^28: a header of a few bytes can declare any size and a zero-filled decode of
    // hundreds of megapixels takes longer than the 10 s timeout under ASan, so every campaign
    // would stop on the same known slow case (tests/fuzz_regressions/image-1.bin) instead of
    // looking further. Above the budget the reader must refuse from the header, which is itself
    // exercised here.
    BUDGET.call_once(|| {
        medsa::limits::set_default(medsa::limits::Limits {
            max_pixels: 1 << 22,
            ..medsa::limits::Limits::DEFAULT
        })
    });
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let ext = if mode & 1 == 0 { "png" } else { "jpg" };
    let path = medsa_fuzz::scratch_file("image", ext, rest);
    medsa_fuzz::debug("load_image", &medsa::pipeline::load_image(&path));
    medsa_fuzz::debug("load_label_png", &medsa::batch::load_label_png(&path));
});
