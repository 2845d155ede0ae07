#!/usr/bin/env python3
"""PyTorch GPU baseline for the medsa image-encoder benchmark.

Times the official segment_anything ImageEncoderViT with the vit_b
hyper-parameters (embed 768, depth 12, 12 heads, global blocks 2/5/8/11,
window 14, img 1024, relative positions, qkv bias, LayerNorm eps 1e-6,
256 output channels, mlp_ratio 4) with random weights, in three modes:

  fp32                 plain fp32, TF32 off (matmul and cuDNN)
  bf16_autocast        torch.autocast("cuda", dtype=torch.bfloat16)
  bf16_autocast_sdpa   the same, with Attention.forward replaced by a version
                       that calls F.scaled_dot_product_attention and passes
                       the decomposed rel-pos bias as attn_mask

For each batch size and mode: `--warmup` untimed runs, then `--repeats`
timed runs (CUDA events), under torch.inference_mode(); the peak memory is
torch.cuda.max_memory_allocated() after reset_peak_memory_stats() (model
weights included). The autocast context spans warm-up and timed runs, so
autocast's weight-cast cache is warm (best case for PyTorch).

Also measures the card's bf16 GEMM rate (torch.matmul of two NxN bf16
matrices, N = 8192 by default: FLOP/s = 2 N^3 / median time) and checks once,
at batch 1 in fp32, that the SDPA variant matches the official forward.

Writes everything as JSON to --json and prints a short summary.

Usage (on the GPU machine, segment-anything importable):
  python3 tools/reference/bench_gpu.py --batch 1 8 --json out/torch.json
CPU smoke test (tiny, no CUDA needed):
  .venv-ref/bin/python tools/reference/bench_gpu.py --device cpu --size 256 --batch 1 2 \
      --repeats 2 --warmup 1 --gemm-n 512 --json /tmp/torch-smoke.json
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling import image_encoder as sam_image_encoder

VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
MODES = ("fp32", "bf16_autocast", "bf16_autocast_sdpa")


# ---------------------------------------------------------------------------
# SDPA attention (written for this project; same result as the official
# Attention.forward with use_rel_pos=True).


def _rel_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size, C) table R with R[i, j] = table[i - j + size - 1].

    Only the case the encoder uses (query and key grids of the same size, the
    table already of length 2*size-1) is handled; the official helper also
    interpolates the table for other sizes.
    """
    if table.shape[0] != 2 * size - 1:
        raise ValueError(
            f"rel-pos table of length {table.shape[0]} for a grid of {size}: "
            "resizing is not implemented in the SDPA variant")
    i = torch.arange(size, device=table.device)
    idx = i[:, None] - i[None, :] + (size - 1)
    return table[idx]


def rel_pos_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Decomposed relative-position bias for SDPA.

    q: (B, heads, h*w, C), NOT scaled. Returns (B, heads, h*w, h*w) with
    bias[b, n, (qy, qx), (ky, kx)] = <q[b, n, qy, qx], Rh[qy, ky]> + <q[b, n, qy, qx], Rw[qx, kx]>.
    """
    b, n, _, c = q.shape
    rh = _rel_table(rel_h, h).to(q.dtype)  # (h, h, C): [qy, ky]
    rw = _rel_table(rel_w, w).to(q.dtype)  # (w, w, C): [qx, kx]
    q5 = q.reshape(b, n, h, w, c)
    # bias along height: sum_c q[b,n,y,x,c] * rh[y,k,c] -> (b, n, y, x, k)
    bh = torch.einsum("bnyxc,ykc->bnyxk", q5, rh)
    # bias along width: sum_c q[b,n,y,x,c] * rw[x,k,c] -> (b, n, y, x, k)
    bw = torch.einsum("bnyxc,xkc->bnyxk", q5, rw)
    bias = bh[..., :, None] + bw[..., None, :]  # (b, n, y, x, ky, kx)
    return bias.reshape(b, n, h * w, h * w)


def sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in replacement for segment_anything's Attention.forward."""
    b, h, w, dim = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, C)
    mask = None
    if self.use_rel_pos:
        mask = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, h, w).to(q.dtype)
    # SDPA's default scale is 1/sqrt(C) == self.scale
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    y = y.permute(0, 2, 1, 3).reshape(b, h, w, dim)  # (B, N, heads, C) -> (B, h, w, dim)
    return self.proj(y)


@contextlib.contextmanager
def sdpa_patched():
    cls = sam_image_encoder.Attention
    orig = cls.forward
    cls.forward = sdpa_attention_forward
    try:
        yield
    finally:
        cls.forward = orig


# ---------------------------------------------------------------------------


def build_encoder(size: int, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=size,
        patch_size=16,
        in_chans=3,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=False,
        window_size=14,
        **VIT_B,
    )
    with torch.no_grad():
        # non-zero position tables, as in bench_cpu.py
        for name, p in enc.named_parameters():
            if name.endswith("rel_pos_h") or name.endswith("rel_pos_w"):
                p.normal_(0.0, 0.05)
            elif name.endswith("pos_embed"):
                p.normal_(0.0, 0.1)
    return enc.to(device).eval()


class Timer:
    """CUDA events on cuda, perf_counter elsewhere. Returns seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(device, mode):
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sdpa_check(enc, size, device, seed):
    """Batch 1, fp32: SDPA variant vs official forward."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(1, 3, size, size, generator=g).to(device)
    with torch.inference_mode():
        ref = enc(x).float()
        with sdpa_patched():
            got = enc(x).float()
    sync(device)
    max_abs = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    rel = max_abs / scale if scale > 0 else math.inf
    return {"max_abs_diff": max_abs, "ref_max_abs": scale, "rel_diff": rel, "tol": 1e-3,
            "ok": bool(rel <= 1e-3 and math.isfinite(rel))}


def bench_mode(enc, size, batch, mode, device, warmup, repeats, seed):
    g = torch.Generator(device="cpu").manual_seed(seed + 100 + batch)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    timer = Timer(device)
    patch = sdpa_patched() if mode == "bf16_autocast_sdpa" else contextlib.nullcontext()
    runs = []
    peak = None
    with torch.inference_mode(), patch, autocast_ctx(device, mode):
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            out = enc(x)
        sync(device)
        for _ in range(repeats):
            runs.append(timer.time(lambda: enc(x)))
        out = enc(x)
        finite = bool(torch.isfinite(out).all().item())
        sync(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    del out, x
    med = statistics.median(runs)
    return {
        "mode": mode,
        "batch": batch,
        "median_ms": med * 1e3,
        "median_s": med,
        "min_ms": min(runs) * 1e3,
        "images_per_s": batch / med,
        "peak_bytes": peak,
        "peak_mib": None if peak is None else peak / 2**20,
        "finite": finite,
        "runs_ms": [round(r * 1e3, 4) for r in runs],
    }


def gemm_rate(n, device, warmup, repeats):
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timer = Timer(device)
    with torch.inference_mode():
        for _ in range(warmup):
            torch.matmul(a, b)
        sync(device)
        runs = [timer.time(lambda: torch.matmul(a, b)) for _ in range(repeats)]
    med = statistics.median(runs)
    del a, b
    return {"n": n, "dtype": "bf16", "median_s": med, "flops_per_s": 2.0 * n**3 / med,
            "runs_s": [round(r, 7) for r in runs]}


def copy_rate(nbytes, device, warmup, repeats):
    """Device-to-device copy: reads + writes = 2 * nbytes per copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(warmup):
        dst.copy_(src)
    sync(device)
    runs = [timer.time(lambda: dst.copy_(src)) for _ in range(repeats)]
    med = statistics.median(runs)
    del src, dst
    return {"bytes": nbytes, "median_s": med, "bytes_per_s": 2.0 * nbytes / med}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--size", type=int, default=1024, help="image side (1024 for the benchmark)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--gemm-n", type=int, default=None, help="GEMM side (default 8192 on cuda, 512 on cpu)")
    ap.add_argument("--gemm-repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    if args.size <= 0 or args.size % 16:
        ap.error("--size must be a positive multiple of 16")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: CUDA is not available (use --device cpu for a smoke test)")
    gemm_n = args.gemm_n or (8192 if device.type == "cuda" else 512)

    # fp32 means true fp32: no TF32 anywhere (also harmless for the bf16 modes)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    info = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "variant": "vit_b",
        "size": args.size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tf32": False,
        "timing": "cuda events" if device.type == "cuda" else "perf_counter",
    }
    print(f"bench_gpu.py: torch {torch.__version__} (CUDA {torch.version.cuda}) on {info['device_name']}", flush=True)

    t0 = time.perf_counter()
    info["gemm"] = gemm_rate(gemm_n, device, warmup=5, repeats=args.gemm_repeats)
    print(f"  bf16 GEMM {gemm_n}^3: {info['gemm']['median_s'] * 1e3:.3f} ms -> "
          f"{info['gemm']['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    if device.type == "cuda":
        try:
            info["copy"] = copy_rate(1 << 30, device, warmup=3, repeats=10)
            print(f"  copy 1 GiB: {info['copy']['bytes_per_s'] / 1e12:.2f} TB/s (read + write)", flush=True)
        except RuntimeError as e:  # keep going: the copy rate is only informative
            info["copy"] = {"error": str(e)}

    enc = build_encoder(args.size, device, args.seed)
    info["params"] = sum(p.numel() for p in enc.parameters())

    info["sdpa_check"] = sdpa_check(enc, args.size, device, args.seed)
    c = info["sdpa_check"]
    print(f"  SDPA check (batch 1, fp32): rel diff {c['rel_diff']:.2e} (max abs {c['max_abs_diff']:.2e}) "
          f"-> {'OK' if c['ok'] else 'MISMATCH'} (tol {c['tol']:g})", flush=True)

    results = []
    for batch in args.batch:
        for mode in args.modes:
            try:
                r = bench_mode(enc, args.size, batch, mode, device, args.warmup, args.repeats, args.seed)
            except RuntimeError as e:  # OOM or a kernel failure: record it, keep going
                r = {"mode": mode, "batch": batch, "error": str(e).splitlines()[0]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(r)
            if "error" in r:
                print(f"  {mode:<20} B={batch:<3} ERROR {r['error']}", flush=True)
            else:
                peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
                print(f"  {mode:<20} B={batch:<3} {r['median_ms']:9.2f} ms  {r['images_per_s']:8.2f} img/s  "
                      f"peak {peak}{'' if r['finite'] else '  NON-FINITE OUTPUT'}", flush=True)
    info["results"] = results
    info["total_s"] = time.perf_counter() - t0

    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
        print(f"  wrote {args.json}")
    bad = (not c["ok"]) or any("error" in r or not r.get("finite", True) for r in results)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
