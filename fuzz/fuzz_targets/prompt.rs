//! Command-line prompt strings (`--box "10,20,110,140"`, `--point "x,y"`) through
//! `batch::parse_numbers`, with the counts the CLI uses and a few edge cases.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let counts: [&[usize]; 6] = [&[2, 3], &[4, 6], &[2], &[4], &[1], &[]];
    for c in counts {
        if let Ok(v) = medsa::batch::parse_numbers(&s, "--box", c) {
            // The documented contract: as many finite numbers as one of `counts`. A breach is
            // a finding even without a panic.
            assert!(
                c.contains(&v.len()),
                "{s:?} gave {} numbers, counts {c:?}",
                v.len()
            );
            assert!(v.iter().all(|x| x.is_finite()), "{s:?} gave {v:?}");
        }
    }
});
