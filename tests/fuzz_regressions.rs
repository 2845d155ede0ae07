//! Inputs found while fuzzing the readers (see docs/FUZZ.md), kept as ordinary tests so a
//! regression shows up in `cargo test` without a nightly toolchain or sanitizers. Each
//! reproducer lives in `tests/fuzz_regressions/<target>-<n>.bin`; every one must now be a clean
//! `Err` naming the file and what was wrong.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

/// Counts the bytes each thread has allocated and not freed, so a test can see a leak (the
/// sanitizer that found it does not run in the normal suite). Per thread, because tests run
/// in parallel.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|c| c.set(c.get() + l.size() as isize));
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get() - l.size() as isize));
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.with(|c| c.get())
}

/// Writes a reproducer to a fresh temporary file with the extension the reader expects.
fn write(name: &str, ext: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medsa-fuzz-regress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.{ext}"));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Reads a checkpoint reproducer through the real path and returns the error text.
fn pth_err(name: &str, bytes: &[u8]) -> String {
    let p = write(name, "pth", bytes);
    let e = medsa::pth::read_checkpoint(&p)
        .map(|t| t.len())
        .expect_err("a malformed checkpoint must be an Err");
    let msg = e.to_string();
    assert!(
        msg.contains(&p.display().to_string()),
        "error does not name the file: {msg}"
    );
    msg
}

/// The leak check: the same input read many times must not grow the live heap (a leak of a
/// few hundred bytes per read shows up as tens of kilobytes).
fn assert_no_leak(read: impl Fn()) {
    read(); // first use may set up lazily allocated state
    let before = live_bytes();
    for _ in 0..200 {
        read();
    }
    let grown = live_bytes() - before;
    assert!(grown < 4096, "200 reads left {grown} bytes allocated");
}

/// pth_zip-1: from the fuzzer (a one-byte mutation of `medsa_style.pth`, hand-minimised:
/// `cargo fuzz tmin` does not minimise leaks). `data.pkl` is `{}` memoised, fetched back and
/// used as its own key (`}q\0h\0K\1s.`). The dict held itself, an `Rc` cycle, and leaked on
/// every read of such a file.
#[test]
fn pth_zip_1_dict_that_contains_itself_does_not_leak() {
    let bytes = include_bytes!("fuzz_regressions/pth_zip-1.bin");
    let msg = pth_err("pth_zip-1", bytes);
    assert!(msg.contains("no state dict"), "{msg}");
    assert_no_leak(|| {
        let _ = pth_err("pth_zip-1", bytes);
    });
}

/// pth_zip-2: a 803-byte checkpoint whose one tensor is a stride-0 view of 2^40 elements over a
/// one-element storage. The view fits its storage, so it was materialised: a 4 TiB allocation
/// and an abort instead of an error.
#[test]
fn pth_zip_2_expanded_view_is_refused_before_allocating() {
    let msg = pth_err(
        "pth_zip-2",
        include_bytes!("fuzz_regressions/pth_zip-2.bin"),
    );
    assert!(msg.contains("tensor `w`"), "{msg}");
    assert!(msg.contains("more than its storage"), "{msg}");
}

/// pickle-1: EMPTY_LIST, DUP, APPEND: a list appended to itself (the list form of pth_zip-1).
#[test]
fn pickle_1_list_appended_to_itself_does_not_leak() {
    let bytes = include_bytes!("fuzz_regressions/pickle-1.bin");
    let e = medsa::pth::fuzz_pickle(bytes).expect_err("a list is not a state dict");
    assert!(e.to_string().contains("expected a state dict"), "{e}");
    assert_no_leak(|| {
        let _ = medsa::pth::fuzz_pickle(bytes);
    });
}

/// pickle-2: 300 000 TUPLE1 opcodes nest one tuple in the next. Dropping that value used to
/// recurse once per level and overflow the stack (a crash of the whole process). Run on a
/// small stack, so a recursive drop would fail here whatever the platform's default.
#[test]
fn pickle_2_deeply_nested_tuples_do_not_overflow_the_stack() {
    let r = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let e = medsa::pth::fuzz_pickle(include_bytes!("fuzz_regressions/pickle-2.bin"))
                .expect_err("a tuple is not a state dict");
            e.to_string()
        })
        .unwrap()
        .join()
        .expect("reading the nested pickle crashed its thread");
    assert!(r.contains("expected a state dict"), "{r}");
}

/// pickle-3: the pickle of pth_zip-2 alone (a stride-0 view of 2^40 elements).
#[test]
fn pickle_3_expanded_view_is_refused() {
    let e = medsa::pth::fuzz_pickle(include_bytes!("fuzz_regressions/pickle-3.bin"))
        .expect_err("a 2^40-element view must be refused");
    assert!(
        e.to_string().contains("overlapping (expanded) views"),
        "{e}"
    );
}

/// The same nested pickle through the whole checkpoint reader, so the fix holds for files
/// and not only for the fuzzing entry point.
#[test]
fn pickle_2_nested_tuples_through_a_checkpoint_file() {
    // A STORED zip around the pickle, built here rather than committed (300 kB of 0x85).
    let pkl = include_bytes!("fuzz_regressions/pickle-2.bin");
    let zip = stored_zip(&[("archive/data.pkl", pkl)]);
    let r = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || pth_err("pickle-2-zip", &zip))
        .unwrap()
        .join()
        .expect("reading the nested checkpoint crashed its thread");
    assert!(r.contains("expected a state dict"), "{r}");
}

/// A minimal zip of STORED entries (no CRCs checked by the reader, so none computed).
fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let off = out.len() as u32;
        let header = |sig: u32, central: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes()); // version made by
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&[0; 4]); // flags, method (STORED)
            h.extend_from_slice(&[0; 4]); // time, date
            h.extend_from_slice(&[0; 4]); // crc
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // extra length
            if central {
                h.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
                h.extend_from_slice(&[0; 4]); // external attributes
                h.extend_from_slice(&off.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// image-1 (the image target, a timeout): a 309-byte JPEG whose header claims 65521x248 pixels
/// decoded as 16 M zero-filled pixels, in full, through both image readers. Refused now from the
/// header and the file size, before decoding.
#[test]
fn image_1_jpeg_claiming_far_more_pixels_than_its_bytes_is_refused() {
    // The target's first byte picks the extension (odd: .jpg); the file is the rest.
    let bytes = &include_bytes!("fuzz_regressions/image-1.bin")[1..];
    let p = write("image-1", "jpg", bytes);
    let t0 = std::time::Instant::now();
    for e in [
        medsa::pipeline::load_image(&p).map(|_| ()).unwrap_err(),
        medsa::batch::load_label_png(&p).map(|_| ()).unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string())
                && msg.contains("65521x248")
                && msg.contains("truncated or corrupt"),
            "{msg}"
        );
    }
    assert!(t0.elapsed().as_secs_f64() < 1.0, "took {:?}", t0.elapsed());
}
