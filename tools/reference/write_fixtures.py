#!/usr/bin/env python3
"""Write the numerical fixtures that the medsa Rust tests compare against.

The oracle is the official `segment_anything.modeling` package (SAM) plus a
small PyTorch implementation, written for this project, of the Med-SA parts
described in shared/SPEC.md sections 2-4 and 7:

  * Med-SA encoder blocks (Space / MLP adapters, section 2),
  * the SD-Trans depth branch (Depth adapter, section 3), in two flavours:
    `per_token` (our semantics) and `compat` (the public reference code),
  * decoder adapters (HyP-Adpt / MLP / Cross, section 4),
  * the two-way block of the decoder that the public Med-SA code builds, in
    its key layout (section 7), for checkpoints saved by that code.

Every case builds a small model with random (but non-trivial) weights, runs
it on CPU in float32, and writes

  tests/fixtures/<case>/weights.safetensors   the state dict
  tests/fixtures/<case>/<run>.safetensors     inputs + intermediate stages

See tools/reference/README.md for the list of cases, runs and keys.

Usage:  .venv-ref/bin/python tools/reference/write_fixtures.py [--out DIR] [--only CASE ...]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import (
    Block,
    ImageEncoderViT,
    window_partition,
    window_unpartition,
)
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.modeling.sam import Sam
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "fixtures"))

from medsa_modules import (  # the project's Med-SA modules, next to this file
    HyperAdapter,
    depth_grid,
    MedSABlock,
    MedSAEncoder,
    AdaptedTwoWayBlock,
    ReferenceTwoWayBlock,
    reference_block_key,
    set_reference_self_attn,
)


def build_model(cfg):
    torch.manual_seed(cfg["weights_seed"])
    grid = cfg["img"] // 16
    C = cfg["C"]
    nblocks = cfg["depth"]
    enc = MedSAEncoder(
        img_size=cfg["img"],
        patch_size=16,
        embed_dim=cfg["embed"],
        depth=nblocks,
        num_heads=cfg["heads"],
        out_chans=C,
        window_size=cfg["window"],
        global_attn_indexes=cfg["global"],
        adapter_blocks=range(nblocks) if cfg["enc_adapters"] else (),
        depth_adapters=cfg.get("depth_adapters", False),
    )
    if cfg.get("pos_grid"):
        # The reference stores pos_embed at its fixed 1024 // 16 grid whatever the
        # training size (the rel-pos tables keep the size of `img`); the forward
        # resizes it to the token grid.
        pg = cfg["pos_grid"]
        enc.pos_embed = nn.Parameter(torch.zeros(1, pg, pg, cfg["embed"]))
    pe = PromptEncoder(embed_dim=C, image_embedding_size=(grid, grid),
                       input_image_size=(cfg["img"], cfg["img"]), mask_in_chans=16)
    transformer = TwoWayTransformer(depth=2, embedding_dim=C, mlp_dim=cfg["mlp"], num_heads=8)
    if cfg.get("reference_decoder"):
        for i in range(len(transformer.layers)):
            transformer.layers[i] = ReferenceTwoWayBlock(C, 8, cfg["mlp"], skip_first_layer_pe=(i == 0),
                                                         adapters=cfg["dec_adapters"])
    elif cfg["dec_adapters"]:
        for i in range(len(transformer.layers)):
            transformer.layers[i] = AdaptedTwoWayBlock(C, 8, cfg["mlp"], skip_first_layer_pe=(i == 0))
    dec = MaskDecoder(transformer_dim=C, transformer=transformer, num_multimask_outputs=3,
                      iou_head_depth=3, iou_head_hidden_dim=C)
    sam = Sam(enc, pe, dec).eval()
    randomize(sam)
    boost_decoder_outputs(dec)
    # Round to the storage dtype first: the stored weights are exactly those
    # the fp32 reference ran with.
    dtype = cfg["dtype"]
    with torch.no_grad():
        for t in sam.state_dict().values():
            t.copy_(t.to(dtype).to(torch.float32))
    return sam


def randomize(model):
    """Make every parameter that SAM initialises trivially non-trivial."""
    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, (nn.LayerNorm, LayerNorm2d)):
                mod.weight.copy_(1.0 + 0.1 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
        for name, p in model.named_parameters():
            if name.endswith("rel_pos_h") or name.endswith("rel_pos_w"):
                p.copy_(0.05 * torch.randn_like(p))
            elif name.endswith("pos_embed"):
                p.copy_(0.1 * torch.randn_like(p))


# With default init the mask logits of these narrow decoders are ~0.05; scale
# the last layers so that logits are O(1-10) and the GELUs of the upscaling
# path leave their linear regime.
UPSCALE_GAIN = 6.0
HYPER_GAIN = 10.0
IOU_GAIN = 10.0


def boost_decoder_outputs(dec):
    with torch.no_grad():
        last_up = dec.output_upscaling[3]
        last_up.weight.mul_(UPSCALE_GAIN)
        last_up.bias.mul_(UPSCALE_GAIN)
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(HYPER_GAIN)
            mlp.layers[-1].bias.mul_(HYPER_GAIN)
        dec.iou_prediction_head.layers[-1].weight.mul_(IOU_GAIN)
        dec.iou_prediction_head.layers[-1].bias.mul_(IOU_GAIN)


def export_state_dict(sam, cfg):
    out = {}
    for k, v in sam.state_dict().items():
        if cfg["medsa_names"]:
            k = k.replace("attn.rel_pos_h", "attn.rel_h").replace("attn.rel_pos_w", "attn.rel_w")
        out[k] = v.detach().to(cfg["dtype"]).contiguous().clone()
    return out


# --------------------------------------------------------------------------
# byte-reproducible safetensors writer
# --------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int32: "I32", torch.int64: "I64"}


def save_file(tensors, path, metadata):
    """Write a safetensors file with sorted header keys, so that re-running the
    script reproduces the files byte for byte (the library writer orders the
    metadata map arbitrarily).  Read back with the library as a check."""
    header = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for raw in blobs:
            f.write(raw)
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


# --------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------


def postprocess(low_res, model_hw, input_size, original_size):
    m = F.interpolate(low_res, size=model_hw, mode="bilinear", align_corners=False)
    m = m[..., : input_size[0], : input_size[1]]
    return F.interpolate(m, size=original_size, mode="bilinear", align_corners=False)


def run_case(sam, cfg, run):
    """Returns the dict of tensors for one run (inputs + stages)."""
    enc, pe, dec = sam.image_encoder, sam.prompt_encoder, sam.mask_decoder
    images = run["images"]
    H, W = images.shape[-2:]
    hg, wg = H // 16, W // 16
    pe.image_embedding_size = (hg, wg)
    pe.input_image_size = (H, W)
    depth, mode = run.get("depth", 0), run.get("mode", "per_token")

    stages = {}
    img32 = images.to(torch.float32)
    if cfg["official"]:
        # Plain SAM: the official encoder forward, stages via hooks.
        hooks = [enc.patch_embed.register_forward_hook(
            lambda m, i, o: stages.__setitem__("enc.patch_embed", o + enc.pos_embed))]
        for bi, blk in enumerate(enc.blocks):
            hooks.append(blk.register_forward_hook(
                lambda m, i, o, bi=bi: stages.__setitem__(f"enc.blocks.{bi}", o)))
        emb = ImageEncoderViT.forward(enc, img32)
        for h in hooks:
            h.remove()
        # Our generic path must agree with the official one.
        mine = enc.forward_stages(img32, stages={})
        assert torch.allclose(mine, emb, atol=1e-5, rtol=1e-5), "encoder self-check failed"
    else:
        emb = enc.forward_stages(img32, depth=depth, mode=mode, stages=stages)

    points = None
    if "point_coords" in run:
        points = (run["point_coords"], run["point_labels"])
    sparse, dense = pe(points=points, boxes=run.get("boxes"), masks=run.get("mask_inputs"))
    dense_pe = pe.get_dense_pe()
    B = images.shape[0]
    assert sparse.shape[0] == B, (sparse.shape, B)

    classes = run.get("classes", 0)
    lows, ious = [], []
    for b in range(B):  # sample b uses image embedding b
        args = dict(image_embeddings=emb[b:b + 1], image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse[b:b + 1],
                    dense_prompt_embeddings=dense[b:b + 1])
        if classes > 0:
            # Med-SA multi-class output (SPEC 5): mask tokens 0..classes-1.
            low, iou = dec.predict_masks(**args)
            assert classes <= low.shape[1], (classes, low.shape)
            low, iou = low[:, :classes], iou[:, :classes]
        else:
            low, iou = dec(**args, multimask_output=run["multimask"])
        lows.append(low)
        ious.append(iou)
    low = torch.cat(lows, 0)
    iou = torch.cat(ious, 0)
    masks = postprocess(low, (H, W), run["input_size"], run["original_size"])
    if cfg["official"] and (H, W) == (enc.img_size, enc.img_size):
        ref = sam.postprocess_masks(low, run["input_size"], run["original_size"])
        assert torch.equal(ref, masks), "postprocess self-check failed"

    out = {"images": images}
    for k in ("point_coords", "point_labels", "boxes", "mask_inputs"):
        if k in run:
            out[k] = run[k]
    out.update(stages)
    out["image_embeddings"] = emb
    out["sparse_embeddings"] = sparse
    out["dense_embeddings"] = dense
    out["dense_pe"] = dense_pe
    out["low_res_masks"] = low
    out["iou_predictions"] = iou
    out["masks"] = masks
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), f"non-finite values in {k}"
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------
# case definitions
# --------------------------------------------------------------------------


def make_images(B, H, W, input_size, dtype=torch.float32):
    x = torch.randn(B, 3, H, W)
    # zero the bottom/right padding, as the SAM preprocessing does
    x[..., input_size[0]:, :] = 0
    x[..., :, input_size[1]:] = 0
    return x.to(dtype)


def tiny_runs():
    runs = []

    def add(name, seed, fn):
        torch.manual_seed(seed)
        r = fn()
        r["name"], r["seed"] = name, seed
        runs.append(r)

    add("points", 101, lambda: dict(
        images=make_images(2, 96, 96, (72, 96)),
        point_coords=torch.tensor([[[20.0, 30.0], [60.5, 50.25], [10.0, 70.0]],
                                   [[80.0, 12.0], [33.0, 44.0], [5.5, 5.5]]]),
        point_labels=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
        multimask=True, input_size=(72, 96), original_size=(150, 200)))
    add("box", 102, lambda: dict(
        images=make_images(1, 96, 96, (96, 72)),
        boxes=torch.tensor([[10.0, 15.0, 60.0, 80.0]]),
        multimask=False, input_size=(96, 72), original_size=(64, 48)))
    add("points_box", 103, lambda: dict(
        images=make_images(1, 96, 96, (96, 96)),
        point_coords=torch.tensor([[[40.0, 40.0], [70.0, 20.0]]]),
        point_labels=torch.tensor([[1.0, 0.0]]),
        boxes=torch.tensor([[20.0, 10.0, 90.0, 85.0]]),
        multimask=True, input_size=(96, 96), original_size=(100, 100)))
    add("mask_input", 104, lambda: dict(
        images=make_images(1, 96, 96, (43, 96)),
        point_coords=torch.tensor([[[48.0, 20.0]]]),
        point_labels=torch.tensor([[1.0]]),
        mask_inputs=2.0 * torch.randn(1, 1, 24, 24),
        multimask=False, input_size=(43, 96), original_size=(40, 90)))
    add("none", 105, lambda: dict(
        images=make_images(1, 96, 96, (96, 96)),
        multimask=True, input_size=(96, 96), original_size=(96, 96)))
    add("nonsquare", 106, lambda: dict(
        images=make_images(1, 80, 112, (78, 112)),
        point_coords=torch.tensor([[[50.0, 30.0]]]),
        point_labels=torch.tensor([[1.0]]),
        multimask=False, input_size=(78, 112), original_size=(39, 56)))
    return runs


def sam_geom_runs():
    torch.manual_seed(201)
    return [dict(
        name="points", seed=201,
        images=make_images(1, 1024, 1024, (768, 1024), dtype=torch.float16),
        point_coords=torch.tensor([[[300.0, 200.0], [700.0, 500.0], [512.0, 700.0]]]),
        point_labels=torch.tensor([[1.0, 1.0, 0.0]]),
        multimask=True, input_size=(768, 1024), original_size=(300, 400))]


def volume_runs():
    d = 6
    runs = []
    for name, seed in (("per_token", 301), ("compat", 302)):
        # identical inputs for both modes (same seed for the data)
        torch.manual_seed(301)
        images = make_images(d, 64, 64, (64, 64))
        coords = torch.tensor([[[8.0 + 6 * s, 50.0 - 5 * s]] for s in range(d)])
        runs.append(dict(
            name=name, seed=301, images=images,
            point_coords=coords, point_labels=torch.ones(d, 1),
            multimask=False, input_size=(64, 64), original_size=(100, 100),
            depth=d, mode=name))
    return runs


def tiny_plain_runs():
    torch.manual_seed(401)
    return [dict(
        name="points", seed=401,
        images=make_images(1, 64, 64, (64, 48)),
        point_coords=torch.tensor([[[20.0, 30.0], [40.0, 10.0]]]),
        point_labels=torch.tensor([[1.0, 0.0]]),
        multimask=True, input_size=(64, 48), original_size=(120, 90))]


def reference_runs():
    runs = []
    torch.manual_seed(511)
    runs.append(dict(
        name="points_box", seed=511,
        images=make_images(2, 96, 96, (96, 96)),
        point_coords=torch.tensor([[[30.0, 24.0], [70.0, 64.0]], [[48.0, 50.0], [15.0, 80.0]]]),
        # integer labels, as SAM's predictor passes them (torch.int)
        point_labels=torch.tensor([[1, 0], [1, 1]], dtype=torch.int32),
        boxes=torch.tensor([[12.0, 8.0, 84.0, 88.0], [20.0, 30.0, 76.0, 70.0]]),
        multimask=False, input_size=(96, 96), original_size=(100, 100)))
    torch.manual_seed(512)
    runs.append(dict(
        name="classes", seed=512,
        images=make_images(1, 96, 96, (96, 96)),
        point_coords=torch.tensor([[[40.0, 52.0], [60.0, 30.0]]]),
        point_labels=torch.tensor([[1.0, 0.0]]),
        multimask=False, classes=2, input_size=(96, 96), original_size=(64, 64)))
    d = 6
    torch.manual_seed(513)
    runs.append(dict(
        name="volume_compat", seed=513,
        images=make_images(d, 96, 96, (96, 96)),
        point_coords=torch.tensor([[[10.0 + 13 * s, 80.0 - 11 * s]] for s in range(d)]),
        point_labels=torch.ones(d, 1),
        multimask=False, input_size=(96, 96), original_size=(48, 48),
        depth=d, mode="compat"))
    return runs


CASES = {
    "tiny": dict(
        weights_seed=1, img=96, embed=32, depth=2, heads=2, window=4, global_=[1],
        C=32, mlp=64, enc_adapters=True, dec_adapters=True, medsa_names=True,
        dtype=torch.float32, official=False, runs=tiny_runs),
    "sam_geom": dict(
        weights_seed=2, img=1024, embed=128, depth=2, heads=2, window=14, global_=[1],
        C=32, mlp=64, enc_adapters=False, dec_adapters=False, medsa_names=False,
        dtype=torch.float16, official=True, runs=sam_geom_runs),
    "volume": dict(
        weights_seed=3, img=64, embed=32, depth=2, heads=2, window=2, global_=[1],
        C=32, mlp=64, enc_adapters=True, depth_adapters=True, dec_adapters=False,
        medsa_names=True, dtype=torch.bfloat16, official=False, runs=volume_runs),
    "tiny_plain": dict(
        weights_seed=4, img=64, embed=32, depth=2, heads=4, window=3, global_=[1],
        C=32, mlp=64, enc_adapters=False, dec_adapters=False, medsa_names=False,
        dtype=torch.float32, official=True, runs=tiny_plain_runs),
    # A checkpoint as the public Med-SA training code saves it (SPEC 7): reference
    # decoder blocks (mlp.layers.0.0 / mlp.fc), pos_embed at the fixed 64x64 grid,
    # rel-pos tables sized for the 96x96 training input (global: 2*6-1 = 11 rows).
    "reference": dict(
        weights_seed=5, img=96, embed=32, depth=2, heads=2, window=4, global_=[1],
        C=32, mlp=64, enc_adapters=True, depth_adapters=True, dec_adapters=True,
        reference_decoder=True, pos_grid=1024 // 16, medsa_names=True,
        dtype=torch.float32, official=False, runs=reference_runs),
}
for _c in CASES.values():
    _c["global"] = _c.pop("global_")


# --------------------------------------------------------------------------
# self checks of the Med-SA code against the official modules
# --------------------------------------------------------------------------


def self_checks():
    torch.manual_seed(1234)
    dim, heads = 32, 2
    # (a) A Med-SA block whose adapters are neutral equals the official Block
    #     when the window divides the grid (no padding, so the norm1/partition
    #     order does not matter).
    for ws in (0, 2):
        blk = MedSABlock(dim, heads, ws, (4, 4) if ws == 0 else (ws, ws))
        randomize(blk)
        with torch.no_grad():
            blk.Space_Adapter.D_fc2.weight.zero_()
            blk.Space_Adapter.D_fc2.bias.zero_()
            blk.MLP_Adapter.D_fc2.weight.zero_()
            blk.MLP_Adapter.D_fc2.bias.zero_()
        x = torch.randn(2, 4, 4, dim)
        assert torch.allclose(blk(x), Block.forward(blk, x), atol=1e-5), "block check"
    # (b) per_token == compat when each slice is a single window.
    blk = MedSABlock(dim, heads, 4, (4, 4), depth_adapter=True)
    randomize(blk)
    x = torch.randn(6, 4, 4, dim)
    assert torch.allclose(blk(x, 6, "per_token"), blk(x, 6, "compat"), atol=1e-5), "depth check"
    # (c) per_token depth branch against a token-by-token loop.
    blk = MedSABlock(dim, heads, 2, (2, 2), depth_adapter=True)
    randomize(blk)
    d, hh, ww = 6, 3, 5
    x = torch.randn(2 * d, hh, ww, dim)
    spatial = blk(x, 0)
    full = blk(x, d, "per_token")
    # rebuild the expected output: spatial part + depth part, then MLP
    ws_x, pad_hw = window_partition(x, 2)
    s = window_unpartition(blk.Space_Adapter(blk.attn(blk.norm1(ws_x))), 2, pad_hw, (hh, ww))
    xd = torch.zeros_like(x)
    dh, dw = depth_grid(d)
    for b in range(2):
        for i in range(hh):
            for j in range(ww):
                seq = x[b * d:(b + 1) * d, i, j, :]
                y = blk.Depth_Adapter(blk.attn(blk.norm1(seq).reshape(1, dh, dw, dim)))
                xd[b * d:(b + 1) * d, i, j, :] = y.reshape(d, dim)
    y = x + s + xd
    yn = blk.norm2(y)
    y = y + blk.mlp(yn) + 0.5 * blk.MLP_Adapter(yn)
    assert torch.allclose(full, y, atol=1e-5), "per_token loop check"
    assert not torch.allclose(full, spatial, atol=1e-3)
    # (d) decoder block with neutral adapters equals the official block.
    for first in (True, False):
        tb = AdaptedTwoWayBlock(dim, 8, 64, skip_first_layer_pe=first)
        randomize(tb)
        with torch.no_grad():
            for a in (tb.Hyper_Adapter, tb.MLP_Adapter, tb.Cross_Adapter):
                a.D_fc2.weight.zero_()
                a.D_fc2.bias.zero_()
        q, k = torch.randn(2, 7, dim), torch.randn(2, 20, dim)
        qpe, kpe = torch.randn(2, 7, dim), torch.randn(2, 20, dim)
        got = tb(q, k, qpe, kpe)
        ref = TwoWayAttentionBlock.forward(tb, q, k, qpe, kpe)
        assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(got, ref)), "decoder check"
    # (e) HyP-Adpt against the per-sample formula of SPEC 4.
    ha = HyperAdapter(dim)
    randomize(ha)
    xq, pr = torch.randn(2, 7, dim), torch.randn(2, 3, dim)
    got = ha(xq, pr)
    for b in range(2):
        h = xq[b] @ ha.D_fc1.weight.T + ha.D_fc1.bias
        for i in range(3):
            Wi = ha.hyper(pr[b, i]).reshape(ha.r, ha.r)
            h = torch.relu(F.layer_norm(h @ Wi, (ha.r,), ha.norm.weight, ha.norm.bias, 1e-5))
        assert torch.allclose(got[b], xq[b] + h @ ha.D_fc2.weight.T + ha.D_fc2.bias, atol=1e-5)
    assert torch.allclose(ha(xq, pr[:, :0]), xq + ha.D_fc2(ha.D_fc1(xq)), atol=1e-6)
    # (g) The reference decoder block (SPEC 7).  Loaded with the weights of an
    #     official block (no adapters) or of an AdaptedTwoWayBlock (non-neutral
    #     adapters), key-mapped to the reference layout, it must equal that block
    #     once its two self-attention changes are undone, and differ from it with
    #     them (so the fixture can tell the flavours apart).
    for first in (True, False):
        for adapters in (False, True):
            if adapters:
                src = AdaptedTwoWayBlock(dim, 8, 64, skip_first_layer_pe=first)
            else:
                src = TwoWayAttentionBlock(dim, 8, 64, activation=nn.ReLU,
                                           attention_downsample_rate=2,
                                           skip_first_layer_pe=first)
            randomize(src)
            rb = ReferenceTwoWayBlock(dim, 8, 64, skip_first_layer_pe=first, adapters=adapters)
            sd = {reference_block_key(k): v for k, v in src.state_dict().items()}
            assert set(sd) == set(rb.state_dict()), sorted(set(sd) ^ set(rb.state_dict()))
            assert "mlp.layers.0.0.weight" in sd and "mlp.fc.bias" in sd
            rb.load_state_dict(sd, strict=True)
            q, k = torch.randn(2, 7, dim), torch.randn(2, 20, dim)
            qpe, kpe = torch.randn(2, 7, dim), torch.randn(2, 20, dim)
            want = src(q, k, qpe, kpe)
            rb.reference_self_attn = False
            got = rb(q, k, qpe, kpe)
            assert all(torch.allclose(g, w, atol=1e-6, rtol=1e-6) for g, w in zip(got, want)), \
                ("reference block, changes undone", first, adapters)
            rb.reference_self_attn = True
            got = rb(q, k, qpe, kpe)
            diff = min((g - w).abs().max().item() for g, w in zip(got, want))
            assert diff > 1e-2, ("reference block does not differ from SAM's", first, adapters, diff)
    # (f) depth_grid reproduces the documented factorisations.
    want = {96: (8, 12), 4: (1, 4), 9: (1, 9), 16: (2, 8), 64: (4, 16), 6: (2, 3), 7: (1, 7),
            1: (1, 1)}
    for d, g in want.items():
        assert depth_grid(d) == g, (d, depth_grid(d), g)


# --------------------------------------------------------------------------


CAP_BYTES = 26e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)write")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as e:  # pragma: no cover
        print("warning: deterministic algorithms unavailable:", e, file=sys.stderr)

    with torch.no_grad():
        self_checks()

    summary, flavour_diffs = [], []
    for case, cfg in CASES.items():
        if args.only and case not in args.only:
            continue
        with torch.no_grad():
            sam = build_model(cfg)
            cdir = os.path.join(args.out, case)
            os.makedirs(cdir, exist_ok=True)
            wpath = os.path.join(cdir, "weights.safetensors")
            save_file(export_state_dict(sam, cfg), wpath,
                      metadata={"case": case, "seed": str(cfg["weights_seed"])})
            summary.append((case, "weights", os.path.getsize(wpath), ""))
            for run in cfg["runs"]():
                tensors = run_case(sam, cfg, run)
                meta = {
                    "multimask_output": "true" if run["multimask"] else "false",
                    "depth": str(run.get("depth", 0)),
                    "depth_mode": run.get("mode", "per_token"),
                    "input_size": "%d,%d" % tuple(run["input_size"]),
                    "original_size": "%d,%d" % tuple(run["original_size"]),
                    "case": case,
                    "run": run["name"],
                    "seed": str(run["seed"]),
                }
                if run.get("classes"):
                    meta["classes"] = str(run["classes"])
                rpath = os.path.join(cdir, run["name"] + ".safetensors")
                save_file(tensors, rpath, metadata=meta)
                m = tensors["masks"]
                info = "masks %s range [%.2f, %.2f] std %.2f; iou %s" % (
                    tuple(m.shape), m.min().item(), m.max().item(), m.std().item(),
                    [round(v, 3) for v in tensors["iou_predictions"].flatten()[:4].tolist()])
                if cfg.get("reference_decoder"):
                    # The same model and inputs with SAM's self-attention step: the
                    # fixture must tell the two decoder flavours apart.
                    set_reference_self_attn(sam, False)
                    other = run_case(sam, cfg, run)
                    set_reference_self_attn(sam, True)
                    dm = (other["masks"] - m).abs().max().item()
                    di = (other["iou_predictions"] - tensors["iou_predictions"]).abs().max().item()
                    assert torch.equal(other["image_embeddings"], tensors["image_embeddings"])
                    assert dm > 0.1, ("reference and SAM decoders agree", case, run["name"], dm)
                    info += "; max |ref - SAM decoder|: masks %.3f, iou %.3f" % (dm, di)
                    flavour_diffs.append((case, run["name"], dm, di))
                if run.get("mode") == "compat" and run.get("depth", 0) > 0:
                    other = run_case(sam, cfg, dict(run, mode="per_token"))
                    de = max((other[k] - tensors[k]).abs().max().item()
                             for k in tensors if k.startswith("enc.blocks."))
                    info += "; max |compat - per_token| enc.blocks %.3f" % de
                summary.append((case, run["name"], os.path.getsize(rpath), info))

    # The cap covers this script's case folders (every case, written now or
    # before), not the other scripts' folders under tests/fixtures.
    total_all = 0
    for case in CASES:
        for root, _, files in os.walk(os.path.join(args.out, case)):
            for f in files:
                total_all += os.path.getsize(os.path.join(root, f))
    print("%-11s %-13s %10s  %s" % ("case", "file", "bytes", "check"))
    for case, name, size, info in summary:
        print("%-11s %-13s %10d  %s" % (case, name, size, info))
    print("cases: %d, files: %d, written bytes: %d, case folders total: %d bytes (%.2f MB)" % (
        len({s[0] for s in summary}), len(summary), sum(s[2] for s in summary),
        total_all, total_all / 1e6))
    if total_all > CAP_BYTES:
        print("ERROR: fixtures exceed %.0f MB" % (CAP_BYTES / 1e6), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
