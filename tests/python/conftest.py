"""Shared helpers of the Python suite: fixture paths and a reader for the committed safetensors
fixtures (numpy only, so the suite needs nothing beyond the wheel, numpy and pytest)."""

import json
import os
import pathlib
import struct

import numpy as np
import pytest

ROOT = pathlib.Path(os.environ.get("MEDSA_ROOT", pathlib.Path(__file__).resolve().parents[2]))
FIXTURES = ROOT / "tests" / "fixtures"

_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def read_safetensors(path):
    """``(tensors, metadata)`` of a safetensors file."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=_DTYPES[v["dtype"]]).reshape(
            v["shape"]
        )
    return out, meta


def fixture(case, name):
    return FIXTURES / case / f"{name}.safetensors"


def assert_close(got, want, what):
    """``|got - want| <= 1e-4 |want| + 1e-4 rms(want)``: the tolerance (and reasons) of
    tests/cli.rs's `forward` parity test, f32 on both sides."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    rms = np.sqrt(np.mean(want**2)) if want.size else 0.0
    err = np.abs(got - want)
    bound = 1e-4 * np.abs(want) + 1e-4 * rms
    worst = np.argmax(err - bound) if err.size else 0
    assert np.all(err <= bound), (
        f"{what}: {np.sum(err > bound)} of {err.size} values off, worst at {worst}: "
        f"{got.flat[worst]} vs {want.flat[worst]}"
    )


def required(var):
    """Whether the test command promised this input (then its absence fails, not skips)."""
    return os.environ.get(var) == "1"


def need(path, var, what):
    if path.exists():
        return path
    if required(var):
        pytest.fail(f"{var}=1 but {path} is missing ({what})")
    pytest.skip(f"{path} is absent ({what})")


@pytest.fixture(scope="session")
def engine():
    """The medsa-engine binary the suite compares against (MEDSA_ENGINE)."""
    p = os.environ.get("MEDSA_ENGINE")
    if not p or not pathlib.Path(p).exists():
        if required("MEDSA_ENGINE_REQUIRED"):
            pytest.fail(f"MEDSA_ENGINE_REQUIRED=1 but MEDSA_ENGINE={p!r} does not exist")
        pytest.skip("MEDSA_ENGINE is not set: no command line to compare with")
    return p


def export_raw(case, run, out_dir):
    """Writes a fixture's tensors as raw float32 files plus shape.txt for tests/c/test_medsa.c."""
    t, meta = read_safetensors(fixture(case, run))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in ["images", "point_coords", "point_labels", "masks", "iou_predictions", "low_res_masks"]:
        np.ascontiguousarray(t[k], dtype="<f4").tofile(out_dir / f"{k}.f32")
    b, _, h, w = t["images"].shape
    n = t["point_coords"].shape[1]
    _, m, oh, ow = t["masks"].shape
    ih, iw = (int(v) for v in meta["input_size"].split(","))
    lh, lw = t["low_res_masks"].shape[2:]
    (out_dir / "shape.txt").write_text(f"{b} {h} {w} {n} {oh} {ow} {ih} {iw} {m} {lh} {lw}\n")


if __name__ == "__main__":
    import sys

    export_raw(sys.argv[1], sys.argv[2], sys.argv[3])


def read_png_gray(path):
    """An 8-bit greyscale, non-interlaced PNG (what the engine writes, and examples/phantom.png)
    as a uint8 array ``(H, W)``: enough of PNG for the suite, with numpy and zlib only."""
    import zlib

    raw = pathlib.Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, idat, w = 8, b"", None
    while pos < len(raw):
        (n,) = struct.unpack(">I", raw[pos : pos + 4])
        kind, body = raw[pos + 4 : pos + 8], raw[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, color, interlace) == (8, 0, 0), f"{path}: not 8-bit grey"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    data = zlib.decompress(idat)
    out = np.zeros((h, w), dtype=np.int32)
    prev = np.zeros(w, dtype=np.int32)
    for r in range(h):
        f = data[r * (w + 1)]
        line = np.frombuffer(data[r * (w + 1) + 1 : (r + 1) * (w + 1)], dtype=np.uint8).astype(np.int32)
        cur = np.zeros(w, dtype=np.int32)
        for x in range(w):
            a = cur[x - 1] if x else 0
            b = prev[x]
            c = prev[x - 1] if x else 0
            if f == 0:
                p = 0
            elif f == 1:
                p = a
            elif f == 2:
                p = b
            elif f == 3:
                p = (a + b) // 2
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[x] = (line[x] + p) & 255
        out[r] = cur
        prev = cur
    return out.astype(np.uint8)
