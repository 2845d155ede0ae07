#!/usr/bin/env python3
"""PyTorch CPU baseline for the medsa image-encoder benchmark.

Times the official segment_anything ImageEncoderViT with the vit_b
hyper-parameters (embed 768, depth 12, 12 heads, global blocks 2/5/8/11,
window 14, relative positions, qkv bias, LayerNorm eps 1e-6, 256 output
channels) on one random 1024x1024 image, with random weights.

With --precision bf16 the forward runs under torch.autocast("cpu", dtype=torch.bfloat16)
(bf16 GEMMs and attention products through oneDNN, fp32 weights kept), PyTorch's own way to use
the CPU's bf16 instructions.

Prints a single JSON line:
  {"impl":"pytorch","torch":...,"threads":N,"precision":...,"batch":B,"median_s":...,"min_s":...,"runs":[...]}

Usage: .venv-ref/bin/python tools/reference/bench_cpu.py [--threads N] [--repeats 5] [--batch 1] [--precision fp32|bf16]
"""

import argparse
import json
import os
import statistics
import time
from functools import partial

import torch
import torch.nn as nn

from segment_anything.modeling.image_encoder import ImageEncoderViT


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads value (default: all cores)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--img-size", type=int, default=1024,
                    help="input side in pixels (1024 for the benchmark; smaller only for smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    enc = ImageEncoderViT(
        img_size=args.img_size,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=False,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
    ).eval()
    with torch.no_grad():
        # non-zero position tables so that nothing is skipped or trivially zero
        for name, p in enc.named_parameters():
            if name.endswith("rel_pos_h") or name.endswith("rel_pos_w"):
                p.normal_(0.0, 0.05)
            elif name.endswith("pos_embed"):
                p.normal_(0.0, 0.1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)

    runs = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.inference_mode(), autocast:
        out = enc(x)  # warm-up
        assert torch.isfinite(out).all()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            enc(x)
            runs.append(time.perf_counter() - t0)

    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "batch": args.batch,
        "median_s": statistics.median(runs),
        "min_s": min(runs),
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
