"""The Python package against the engine's references: PyTorch fixtures, the command line, the
real LiteMedSAM model with the bundled adapter, and its error, leak and threading contracts."""

import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest

import medsa
from conftest import (
    FIXTURES,
    ROOT,
    assert_close,
    fixture,
    need,
    read_png_gray,
    read_safetensors,
)

TINY = fixture("tiny", "weights")
VOLUME = fixture("volume", "weights")


@pytest.fixture(scope="module")
def tiny():
    return medsa.Model(TINY)


def _pair(meta, key, default):
    v = meta.get(key)
    return tuple(int(x) for x in v.split(",")) if v else default


def _run_fixture(model, case, run):
    t, meta = read_safetensors(fixture(case, run))
    depth = int(meta.get("depth", "0")) or None
    emb = model.embed(t["images"], depth=depth, depth_mode=meta.get("depth_mode") if depth else None)
    hw = t["images"].shape[2:]
    masks, iou, low = model.decode(
        emb,
        points=t.get("point_coords"),
        labels=t.get("point_labels"),
        boxes=t.get("boxes"),
        mask_input=t.get("mask_inputs"),
        multimask=meta.get("multimask_output") == "true",
        input_size=_pair(meta, "input_size", hw),
        original_size=_pair(meta, "original_size", hw),
    )
    return t, model.embeddings_array(emb), masks, iou, low


@pytest.mark.parametrize(
    "case,run",
    [("tiny", r) for r in ["points", "box", "points_box", "mask_input", "none"]]
    + [("volume", "per_token"), ("volume", "compat")],
)
def test_embed_and_decode_match_the_pytorch_reference(case, run):
    model = medsa.Model(fixture(case, "weights"))
    t, emb, masks, iou, low = _run_fixture(model, case, run)
    assert_close(emb, t["image_embeddings"], f"{case}/{run} image_embeddings")
    assert_close(low, t["low_res_masks"], f"{case}/{run} low_res_masks")
    assert_close(iou, t["iou_predictions"], f"{case}/{run} iou_predictions")
    assert_close(masks, t["masks"], f"{case}/{run} masks")
    assert masks.dtype == np.float32 and masks.flags.c_contiguous


def test_outputs_equal_the_forward_command(tiny, engine, tmp_path):
    out = tmp_path / "out.safetensors"
    subprocess.run(
        [engine, "forward", "--checkpoint", TINY, "--inputs", fixture("tiny", "points"), "--out", out],
        check=True,
        capture_output=True,
    )
    cli, _ = read_safetensors(out)
    _, emb, masks, iou, low = _run_fixture(tiny, "tiny", "points")
    # One engine, two builds (the wheel's release profile, the test binary's): the same code,
    # so equal to rounding.
    for name, got in [("image_embeddings", emb), ("masks", masks), ("iou_predictions", iou), ("low_res_masks", low)]:
        want = cli[name]
        scale = float(np.sqrt(np.mean(want.astype(np.float64) ** 2)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def test_segment_volume_matches_the_command_line(engine, tmp_path):
    src = FIXTURES / "nifti" / "oblique_float32.nii"
    vol, header = medsa.read_nifti(src)
    assert vol.shape == header.dims == (7, 6, 5)
    assert vol.flags.f_contiguous
    model = medsa.Model(VOLUME)
    box = [1, 1, 1, 5, 4, 3]
    for extra, opts in [([], {}), (["--propagate"], {"propagate": True})]:
        mask = model.segment(vol, {"box": box}, intensity="mr", **opts)
        assert mask.shape == vol.shape and mask.dtype == np.uint8
        out = tmp_path / ("prop" if extra else "plain")
        subprocess.run(
            [engine, "segment", "--checkpoint", VOLUME, "-i", src, "-o", out, "--quiet",
             "--box", ",".join(map(str, box)), "--intensity", "mr", *extra],
            check=True,
            capture_output=True,
        )
        cli, cli_header = medsa.read_nifti(out / "oblique_float32.nii")
        np.testing.assert_array_equal(mask, cli.astype(np.uint8))
        assert cli_header.affine == header.affine
    # Slices outside the box stay background without propagation.
    plain = model.segment(vol, {"box": box}, intensity="mr")
    assert not plain[:, :, 0].any() and not plain[:, :, 4].any()
    # The channel-first MONAI layout gives the same mask, with its channel.
    np.testing.assert_array_equal(model.segment(vol[None], {"box": box}, intensity="mr")[0], plain)


def test_segment_image_matches_the_command_line(tiny, engine, tmp_path):
    png = ROOT / "examples" / "phantom.png"
    img = read_png_gray(png)
    out = tmp_path / "mask.png"
    subprocess.run(
        [engine, "segment", "--checkpoint", TINY, "--image", png, "--out", out, "--box", "40,30,150,120"],
        check=True,
        capture_output=True,
    )
    cli = read_png_gray(out) > 0
    mask = tiny.segment(img, {"box": [40, 30, 150, 120]})
    assert mask.shape == img.shape
    np.testing.assert_array_equal(mask > 0, cli)
    labels, prob = tiny.segment_image(np.stack([img] * 3, axis=2), [{"box": [40, 30, 150, 120]}], probabilities=True)
    np.testing.assert_array_equal(labels, mask)
    assert prob.shape == img.shape and 0.0 <= prob.min() and prob.max() <= 1.0


def test_litemedsam_with_the_bundled_adapter_segments_grey_matter(tmp_path):
    ck = need(ROOT / ".models" / "lite_medsam.safetensors", "MEDSA_LITEMEDSAM", "scripts/fetch-litemedsam.sh")
    val = need(ROOT / "examples" / "data" / "mni152_val", "MEDSA_EXAMPLE_DATA", "scripts/prepare-mni152.py")
    adapter = ROOT / "examples" / "models" / "litemedsam_gm_adapter.safetensors"
    model = medsa.Model(ck, adapter=adapter)
    info = model.info
    assert info["variant"].startswith("tiny_vit") and info["image_size"] == [256, 256]
    assert info["volume_preset"] == "litemedsam" and info["label_id"] == 2
    vol, header = medsa.read_nifti(val / "images" / "mni152.nii.gz")
    lab, _ = medsa.read_nifti(val / "labels" / "mni152.nii.gz")
    gm = lab == info["label_id"]
    # The evaluation protocol of the README: the label's bounding box on every slice.
    objects = []
    for z in range(gm.shape[2]):
        xs, ys = np.nonzero(gm[:, :, z])
        if xs.size:
            objects.append({"box": [int(xs.min()), int(ys.min()), z, int(xs.max()), int(ys.max()), z]})
    calls = []
    mask = model.segment(vol, objects, progress=lambda d, n: calls.append((d, n)))
    s = medsa.metrics.scores(mask > 0, gm, spacing=header.spacing)
    # The command line scores 0.941 here (README); the same engine must not do worse.
    assert s["dice"] >= 0.935, s
    # Slices encoded so far out of nz, rising, and (nz, nz) at the end.
    assert calls[-1] == (gm.shape[2], gm.shape[2]), calls
    assert all(a[0] <= b[0] and a[1] == b[1] for a, b in zip(calls, calls[1:])), calls
    out = tmp_path / "gm.nii.gz"
    medsa.write_nifti(out, (mask > 0).astype(np.uint8), like=header)
    back, h2 = medsa.read_nifti(out)
    np.testing.assert_array_equal(back, (mask > 0))
    assert h2.affine == header.affine and h2.spacing == header.spacing


def test_engine_errors_are_exceptions_with_the_engine_message(tiny, tmp_path):
    with pytest.raises(medsa.MedsaError, match="/nonexistent/model.safetensors"):
        medsa.Model("/nonexistent/model.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(medsa.MedsaError, match="junk.safetensors"):
        medsa.Model(junk)
    with pytest.raises(medsa.MedsaError, match="tpu"):
        medsa.Model(TINY, device="tpu")
    with pytest.raises(medsa.MedsaError, match="precision"):
        medsa.Model(TINY, precision="fp8")
    with pytest.raises(medsa.MedsaError, match=r"\(B, 3, H, W\)"):
        tiny.embed(np.zeros((2, 96, 96), np.float32)[None, None])
    with pytest.raises(medsa.MedsaError, match="not finite"):
        tiny.embed(np.full((1, 3, 96, 96), np.nan, np.float32))
    emb = tiny.embed(np.zeros((1, 3, 96, 96), np.float32))
    with pytest.raises(medsa.MedsaError, match="another model"):
        medsa.Model(TINY).decode(emb, boxes=[[1, 1, 50, 50]])
    with pytest.raises(medsa.MedsaError, match="points and labels"):
        tiny.decode(emb, points=[[[1, 1]]])
    vol = np.zeros((20, 20, 4), np.float32)
    with pytest.raises(medsa.MedsaError, match="box"):
        tiny.segment(vol, {"box": [0, 0, 0, 50, 10, 1]})
    with pytest.raises(medsa.MedsaError, match="unknown field `bx`"):
        tiny.segment(vol, {"bx": [0, 0, 0, 5, 5, 1]})
    with pytest.raises(medsa.MedsaError, match="intensity"):
        tiny.segment(vol, {"box": [0, 0, 0, 5, 5, 1]}, intensity="hu")
    with pytest.raises(medsa.MedsaError, match="NaN or infinite"):
        tiny.segment(np.full((20, 20, 4), np.inf, np.float32), {"box": [0, 0, 0, 5, 5, 1]})
    with pytest.raises(medsa.MedsaError, match="interactions refine a propagated"):
        tiny.segment(vol, {"box": [0, 0, 0, 5, 5, 1], "interactions": [{"points": [[1, 1, 0, 1]]}]})
    _, header = medsa.read_nifti(FIXTURES / "nifti" / "dtype_float32.nii")
    with pytest.raises(medsa.MedsaError, match="grid"):
        medsa.write_nifti(tmp_path / "x.nii", np.zeros((3, 3, 3), np.uint8), like=header)
    assert not (tmp_path / "x.nii").exists()


def test_a_raising_progress_callback_is_raised_after_the_run(tiny):
    def boom(done, total):
        raise KeyError("stop")

    with pytest.raises(KeyError, match="stop"):
        tiny.segment(np.zeros((20, 20, 3), np.float32), {"box": [0, 0, 0, 5, 5, 2]}, progress=boom)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_over_1000_calls(tiny):
    t, _ = read_safetensors(fixture("tiny", "points"))
    img = t["images"][:1]
    pts, lab = t["point_coords"][:1], t["point_labels"][:1]

    def call(i):
        emb = tiny.embed(img)
        masks, iou, low = tiny.decode(emb, points=pts, labels=lab, multimask=True, original_size=(150, 200))
        assert masks.shape == (1, 3, 150, 200)

    for i in range(100):
        call(i)
    before = _rss_bytes()
    for i in range(1000):
        call(i)
    grown = _rss_bytes() - before
    # Each call allocates ~0.5 MB of outputs; a leak of any of them would be ~500 MB here.
    assert grown < 32 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 1,000 calls"


def test_compute_releases_the_gil():
    model = medsa.Model(VOLUME)
    # One call long enough to see (about 0.2 s on two cores).
    images = np.random.default_rng(0).standard_normal((1024, 3, 64, 64)).astype(np.float32)
    done = threading.Event()
    ticks = []

    def work():
        model.embed(images)
        done.set()

    th = threading.Thread(target=work)
    start = time.perf_counter()
    th.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    th.join()
    took = time.perf_counter() - start
    # With the GIL held for the whole embed this loop could not run during it.
    assert took > 0.05, f"the work took only {took:.3f} s: too short to tell"
    assert len(ticks) >= 10, f"the main thread ran {len(ticks)} times in {took:.2f} s"


def test_info_describes_the_model(tiny):
    info = tiny.info
    assert info["image_size"] == [96, 96] and tiny.image_size == (96, 96)
    assert info["device"].startswith("cpu") and info["precision"] == "f32"
    assert info["embedding_shape"] == [32, 6, 6]
    assert json.loads(json.dumps(info)) == info
    bf16 = medsa.Model(TINY, precision="bf16")
    assert bf16.info["precision"] == "bf16" and "bf16" in bf16.info["device"]
    t, _ = read_safetensors(fixture("tiny", "box"))
    masks, _, _ = bf16.decode(bf16.embed(t["images"]), boxes=t["boxes"])
    assert masks.shape == (1, 1, 96, 96) and np.isfinite(masks).all()
    assert "medsa.Model" in repr(tiny)


def test_nifti_roundtrip_keeps_values_and_geometry(tmp_path):
    for name in ["dtype_int16.nii", "scaled_int16.nii", "oblique_float32.nii", "gzip_float32.nii.gz"]:
        vol, header = medsa.read_nifti(FIXTURES / "nifti" / name)
        assert vol.dtype == np.float32 and vol.shape == header.dims
        out = tmp_path / ("copy_" + name)
        medsa.write_nifti(out, vol, like=header)
        back, h2 = medsa.read_nifti(out)
        np.testing.assert_array_equal(back, vol)
        assert (h2.dims, h2.spacing, h2.affine, h2.codes) == (header.dims, header.spacing, header.affine, header.codes)
    want, _ = read_safetensors(FIXTURES / "nifti" / "expected.safetensors")
    vol, header = medsa.read_nifti(FIXTURES / "nifti" / "dtype_float32.nii")
    # nibabel's reading of the same file (tools/reference): values x fastest, zooms, affine.
    np.testing.assert_array_equal(vol.ravel(order="F"), want["dtype_float32.data"])
    np.testing.assert_allclose(header.spacing, want["dtype_float32.zooms"], rtol=1e-6)
    np.testing.assert_allclose(header.affine, want["dtype_float32.affine"], rtol=1e-6, atol=1e-6)


def test_metrics_of_shifted_squares():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[2:12, 2:12] = True
    b[4:14, 2:12] = True
    s = medsa.metrics.scores(a, b)
    assert s["dice"] == pytest.approx(2 * 80 / 200)
    assert s["iou"] == pytest.approx(80 / 120)
    assert medsa.metrics.dice(a, b) == s["dice"] and medsa.metrics.iou(a, b) == s["iou"]
    assert medsa.metrics.hd95(a, b, spacing=(0.5, 0.5)) == pytest.approx(s["hd95"] * 0.5)
    assert medsa.metrics.scores(np.zeros(5), np.zeros(5)) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    z = np.zeros(5)
    assert (medsa.metrics.dice(z, z), medsa.metrics.iou(z, z)) == (1.0, 1.0)
    none = np.zeros_like(b)
    assert (medsa.metrics.dice(a, none), medsa.metrics.iou(a, none)) == (0.0, 0.0)
    # F-ordered inputs (nibabel's arrays) give the same counts as C-ordered copies.
    fa, fb = np.asfortranarray(a[:, :15]), np.asfortranarray(b[:, :15])
    assert medsa.metrics.dice(fa, fb) == medsa.metrics.scores(fa.copy(), fb.copy())["dice"]
    with pytest.raises(medsa.MedsaError, match="differs"):
        medsa.metrics.dice(a, b[:10])
    with pytest.raises(medsa.MedsaError, match="spacing"):
        medsa.metrics.hd95(a, b, spacing=(1.0,))


def test_the_installed_package_carries_its_stubs():
    here = os.path.dirname(medsa.__file__)
    if os.environ.get("MEDSA_WHEEL_TEST") == "1":
        assert ".venv-wheel" in here, f"medsa was imported from {here}, not the installed wheel"
    for name in ["_medsa.pyi", "py.typed", "metrics.py"]:
        assert os.path.exists(os.path.join(here, name)), name
    assert medsa.__version__ == "0.1.0"


def test_the_cuda_backend_on_the_kernel_emulator(monkeypatch):
    """The CUDA arm of the package (device="cuda": upload, embed, decode, download) on the CPU
    emulator of kernels/*.cu that cargo test builds (MEDSA_TEST_KEMU names it)."""
    lib = os.environ.get("MEDSA_TEST_KEMU")
    if not lib or not os.path.exists(lib):
        if os.environ.get("MEDSA_TEST_KEMU_REQUIRED") == "1":
            pytest.fail(f"MEDSA_TEST_KEMU_REQUIRED=1 but MEDSA_TEST_KEMU={lib!r} does not exist")
        pytest.skip("no kernel emulator library (MEDSA_TEST_KEMU): cargo test builds it")
    monkeypatch.setenv("MEDSA_CUDA_EMULATOR", lib)
    for case, run in [("tiny", "points"), ("volume", "per_token")]:
        model = medsa.Model(fixture(case, "weights"), device="cuda")
        assert model.info["device"].startswith("emulated CUDA device"), model.info["device"]
        t, emb, masks, iou, low = _run_fixture(model, case, run)
        assert_close(emb, t["image_embeddings"], f"emulated cuda {case}/{run} image_embeddings")
        assert_close(low, t["low_res_masks"], f"emulated cuda {case}/{run} low_res_masks")
        assert_close(iou, t["iou_predictions"], f"emulated cuda {case}/{run} iou_predictions")
        assert_close(masks, t["masks"], f"emulated cuda {case}/{run} masks")
