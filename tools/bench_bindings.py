"""Times the Python package's calls and the command line on the tiny fixture model (the `box`
inputs), for tools/bench_bindings.sh, which runs the Rust side (criterion, benches/runtime.rs)
in the same run. Prints one JSON object: median seconds per call over `rounds` rounds."""

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import medsa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))
from conftest import fixture, read_safetensors  # noqa: E402

engine, rounds, per_round, cli_runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t, _ = read_safetensors(fixture("tiny", "box"))
images, boxes = np.ascontiguousarray(t["images"]), np.ascontiguousarray(t["boxes"])
model = medsa.Model(fixture("tiny", "weights"))
emb = model.embed(images)


def per_call(f):
    for _ in range(per_round // 10):
        f()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_round):
            f()
        out.append((time.perf_counter() - t0) / per_round)
    return statistics.median(out)


decode = lambda: model.decode(emb, boxes=boxes, input_size=(96, 72), original_size=(64, 48))  # noqa: E731
full = lambda: model.decode(model.embed(images), boxes=boxes, input_size=(96, 72), original_size=(64, 48))  # noqa: E731
res = {"python_decode_s": per_call(decode), "python_embed_decode_s": per_call(full)}
with tempfile.TemporaryDirectory() as d:
    cmd = [engine, "forward", "--checkpoint", str(fixture("tiny", "weights")),
           "--inputs", str(fixture("tiny", "box")), "--out", f"{d}/out.safetensors"]
    subprocess.run(cmd, check=True, capture_output=True)
    runs = []
    for _ in range(cli_runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    res["cli_forward_s"] = statistics.median(runs)
    t0 = time.perf_counter()
    subprocess.run([engine, "--version"], check=True, capture_output=True)
    res["cli_start_s"] = time.perf_counter() - t0
print(json.dumps(res))
