//! Training that goes wrong: a diverging run stops with a clear error and keeps its last good
//! checkpoint; a planted link in `-o` is not written through.

use super::*;

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let d = scratch("diverge");
    let base = d.join("base.safetensors");
    init_tiny(&base, 3);
    let data = d.join("data");
    png_dataset(&data, 4);
    let out = d.join("run");
    // AdamW moves every weight by about lr per step: at 1e30 the first update makes the
    // activations overflow, and the next loss (or its gradient) is not finite.
    let e = run_err(train(&base, &data, &out).args([
        "--trainable",
        "all",
        "--add-adapters",
        "none",
        "--steps",
        "6",
        "--lr",
        "1e30",
        "--save-every",
        "1",
        "--val-fraction",
        "0",
    ]));
    assert!(e.contains("training stopped at step"), "{e}");
    assert!(
        e.contains("the loss is") || e.contains("gradient norm"),
        "the error says what went non-finite: {e}"
    );
    let last = out.join("last.safetensors");
    assert!(
        e.contains(&*last.to_string_lossy()),
        "the error names the last good checkpoint: {e}"
    );
    // What is on disk is the last finite state: every tensor loads as finite numbers.
    let f = SafetensorsFile::open(&last).unwrap();
    for k in f.keys() {
        let t = f.tensor(k).unwrap();
        assert!(t.data().iter().all(|v| v.is_finite()), "{k} is not finite");
    }
}

#[cfg(unix)]
#[test]
fn a_log_link_in_the_output_folder_is_not_written_through() {
    let d = scratch("loglink");
    let base = d.join("base.safetensors");
    init_tiny(&base, 4);
    let data = d.join("data");
    png_dataset(&data, 3);
    let out = d.join("run");
    std::fs::create_dir_all(&out).unwrap();
    let victim = d.join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("log.jsonl")).unwrap();
    let e = run_err(train(&base, &data, &out).args(["--steps", "1", "--val-fraction", "0"]));
    assert!(
        e.contains("log.jsonl") && e.contains("symbolic link"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}
