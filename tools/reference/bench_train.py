#!/usr/bin/env python3
"""PyTorch baseline for the medsa training benchmark (`medsa-engine bench --train`).

The reference training step of the Medical SAM Adapter on a random-weight
vit_b (embed 768, depth 12, 12 heads, global blocks 2/5/8/11, window 14,
relative positions, LayerNorm eps 1e-6, 256 neck / decoder channels) with
Med-SA adapters in every encoder block (Space + MLP, SPEC section 2) and in
both decoder layers (Hyper / MLP / Cross, section 4). The model classes are
those of tools/reference/write_fixtures.py (official segment_anything modules
+ our PyTorch reading of SPEC.md), built by its `build_model` at the
benchmark size (position tables of that grid; at 1024 the published vit_b).

Trainable, as the reference trains 2D ("adapters+decoder"): every parameter
whose name contains "Adapter" and every mask_decoder parameter; everything
else has requires_grad False. One step, as Med-SA's train_sam does it:

    images (host tensor) -> device
    zero_grad
    image encoder -> prompt encoder (no grad, one positive click per image,
    no box: SAM adds its padding point) -> mask decoder (multimask False;
    batched as Med-SA's decoder does: sample b with embedding b)
    BCEWithLogitsLoss(pos_weight=2) of the low-resolution logits
    [B, 1, S/4, S/4] against a random 0/1 target
    backward; torch.optim.Adam(lr 1e-4) step

Modes: fp32 (as the official code runs; TF32 off) and bf16_autocast
(torch.autocast around forward + loss, backward outside it; bf16 needs no
GradScaler). Timing: `--warmup` untimed steps (Adam's state is created in
the first), then `--repeats` timed steps, each between device
synchronisations (perf_counter); median step time, images/s.
Peak memory: on CUDA torch.cuda.max_memory_allocated() over the timed steps
(reset after warm-up, so weights, gradients and Adam state are in it) and
max_memory_reserved(); on the CPU the process's peak RSS (ru_maxrss, whole
process, torch's own ~0.3-0.5 GB included; rss_after_import_bytes says how
much of it was there before the model was built).

Each (batch, mode) runs in a fresh subprocess, so the peaks are per
configuration and an out-of-memory error only costs that configuration.

Prints one JSON line per configuration as it finishes and, last, a summary;
--json writes everything:
  {"impl":"pytorch","mode":"train",...,"results":[{"precision":"fp32","batch":2,
   "median_ms":...,"images_per_s":...,"peak_bytes":...,...}, ...]}

Usage:
  CPU (small shapes):  .venv-ref/bin/python tools/reference/bench_train.py --device cpu \
                           --size 256 --batch 2 --modes fp32 --warmup 1 --repeats 2
  GPU:                 python3 tools/reference/bench_train.py --batch 2 8 --json out/train.json
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("fp32", "bf16_autocast")


def vit_b_cfg(size: int, seed: int) -> dict:
    """A write_fixtures.CASES-style configuration: vit_b with every Med-SA adapter."""
    return dict(
        weights_seed=seed, img=size, embed=768, depth=12, heads=12, window=14,
        **{"global": [2, 5, 8, 11]},
        C=256, mlp=2048, enc_adapters=True, depth_adapters=False, dec_adapters=True,
        medsa_names=False, official=False, dtype=None,  # dtype set after importing torch
    )


def is_trainable(name: str) -> bool:
    return "Adapter" in name or name.startswith("mask_decoder.")


def rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------
# child: one configuration


def run_child(args) -> dict:
    import torch  # noqa: E402  (after the parent has set the thread env)
    import torch.nn.functional as F

    rss_import = rss_bytes()
    sys.path.insert(0, HERE)
    import write_fixtures as wf

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train.py: CUDA is not available (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def predict_masks_batched(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                              dense_prompt_embeddings) -> Tuple[torch.Tensor, torch.Tensor]:
        """segment_anything's MaskDecoder.predict_masks with Med-SA's batching: when there is
        one prompt set per image, sample b uses embedding b (the official code repeats every
        embedding for every prompt set, B x B)."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        if image_embeddings.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        else:
            src = image_embeddings
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        hyper_in: List[torch.Tensor] = [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                        for i in range(self.num_mask_tokens)]
        hyper_in = torch.stack(hyper_in, dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)

    cfg = vit_b_cfg(args.size, args.seed)
    cfg["dtype"] = torch.float32
    sam = wf.build_model(cfg).to(device).train()
    dec = sam.mask_decoder
    dec.predict_masks = predict_masks_batched.__get__(dec)
    trainable = []
    for n, p in sam.named_parameters():
        p.requires_grad_(is_trainable(n))
        if p.requires_grad:
            trainable.append(p)
    n_trained = sum(p.numel() for p in trainable)
    opt = torch.optim.Adam(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    pos_weight = torch.ones([1], device=device) * 2
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    # one random batch on the host, reused every step (copied to the device in the step, as the
    # reference's loop does with its loader's batches)
    B, S = args.batch[0], args.size
    g = torch.Generator().manual_seed(args.seed + 1)
    images = torch.rand(B, 3, S, S, generator=g) * 4 - 2
    coords = torch.floor(torch.rand(B, 1, 2, generator=g) * S) + 0.5
    labels = torch.ones(B, 1, dtype=torch.int)
    target = (torch.rand(B, 1, S // 4, S // 4, generator=g) < 0.5).float()
    pe = sam.prompt_encoder
    pe.image_embedding_size = (S // 16, S // 16)
    pe.input_image_size = (S, S)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.modes[0] == "bf16_autocast"
           else contextlib.nullcontext())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        imgs = images.to(device)
        pt = (coords.to(device), labels.to(device))
        tgt = target.to(device)
        opt.zero_grad()
        with amp:
            emb = sam.image_encoder.forward_stages(imgs)
            with torch.no_grad():
                se, de = pe(points=pt, boxes=None, masks=None)
            pred, _ = dec(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                          sparse_prompt_embeddings=se, dense_prompt_embeddings=de,
                          multimask_output=False)
            loss = criterion(pred, tgt)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises

    t_build = time.perf_counter()
    losses = []
    for _ in range(args.warmup):
        losses.append(step())
    sync()
    peak = reserved = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        runs.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        peak = rss_bytes()
    med = statistics.median(runs)
    finite = all(l == l and abs(l) != float("inf") for l in losses)
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.modes[0],
        "batch": B,
        "median_ms": med * 1e3,
        "median_s": med,
        "min_ms": min(runs) * 1e3,
        "images_per_s": B / med,
        "peak_bytes": peak,
        "peak_mib": peak / 2**20,
        "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "reserved_bytes": reserved,
        "rss_after_import_bytes": rss_import,
        "trained_params": n_trained,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": finite,
        "warmup_and_timed_s": time.perf_counter() - t_build,
        "runs_ms": [round(r * 1e3, 3) for r in runs],
    }


# ---------------------------------------------------------------------------
# parent: one subprocess per configuration


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--size", type=int, default=1024, help="image side (1024 on the GPU)")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per configuration (its subprocess is killed after that)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size <= 0 or args.size % 16:
        ap.error("--size must be a positive multiple of 16")

    if args.child:
        try:
            r = run_child(args)
        except Exception as e:  # OOM or anything else: report it, the parent goes on
            msg = str(e).strip().splitlines()
            r = {"precision": args.modes[0], "batch": args.batch[0],
                 "error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:300],
                 "oom": "OutOfMemory" in type(e).__name__ or "out of memory" in str(e)}
        print("RESULT " + json.dumps(r), flush=True)
        return

    import torch  # version only: the parent does not touch the device
    info = {
        "impl": "pytorch",
        "mode": "train",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": args.device,
        "device_name": None,  # from the first configuration that ran
        "variant": "vit_b",
        "size": args.size,
        "trainable": "adapters+decoder",
        "optimizer": "Adam lr 1e-4",
        "loss": "BCEWithLogits pos_weight 2 on low-res masks",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "tf32": False,
        "timing": "perf_counter between device synchronisations, host->device copy included",
    }
    del torch
    print(f"bench_train.py: torch {info['torch']} on {args.device}, vit_b {args.size}x{args.size}, "
          f"adapters+decoder trained", flush=True)
    results = []
    for batch in args.batch:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--device", args.device,
                   "--size", str(args.size), "--batch", str(batch), "--modes", mode,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--seed", str(args.seed)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if lines:
                    r = json.loads(lines[-1][len("RESULT "):])
                else:
                    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                    r = {"precision": mode, "batch": batch,
                         "error": f"exit {p.returncode}: " + " | ".join(tail)[:300]}
            except subprocess.TimeoutExpired:
                r = {"precision": mode, "batch": batch, "error": f"timeout after {args.timeout:g} s"}
            r["wall_s"] = round(time.perf_counter() - t0, 2)
            info["device_name"] = info["device_name"] or r.pop("device_name", None)
            r.pop("device_name", None)
            results.append(r)
            print(json.dumps(r), flush=True)
    info["results"] = results
    print(f"{'precision':<14} {'B':>3} {'ms/step':>10} {'images/s':>9} {'peak MiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['precision']:<14} {r['batch']:>3} {'OUT OF MEMORY' if r.get('oom') else 'ERROR'} "
                  f"{r['error']}")
        else:
            print(f"{r['precision']:<14} {r['batch']:>3} {r['median_ms']:>10.1f} {r['images_per_s']:>9.3f} "
                  f"{r['peak_mib']:>9.0f}{'' if r['finite'] else '  NON-FINITE LOSS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.json}")
    # running out of device memory is a result (recorded as such), not a failure of the script
    bad = any(("error" in r and not r.get("oom")) or not r.get("finite", True) for r in results)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
