#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/.

Standard library only (the fuzzing machine has no numpy, torch or PIL). Seeds are the repo's own
small fixtures plus hand-built files that reach branches the fixtures do not: other dtypes,
byte orders, gzip, training-checkpoint layouts, strided views, ZIP64-free and aligned zips.
Run from the repository root:  python3 fuzz/make_seeds.py
Re-running overwrites the generated seeds and leaves any other file in the folders alone.
"""

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def out(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fixture(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read()


# ---------------------------------------------------------------- safetensors


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes), stored in order."""
    header, blobs, off = {}, [], 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def seeds_safetensors():
    # The smallest fixtures whole; a large one truncated right after its header, which keeps a
    # realistic many-key header for the JSON side while staying small.
    for rel in [
        "tests/fixtures/pth/medsa_style.safetensors",
        "tests/fixtures/pth/small.safetensors",
        "tests/fixtures/nifti/expected.safetensors",
        "tests/fixtures/train/golden.safetensors",
    ]:
        out("safetensors", os.path.basename(rel), fixture(rel))
    big = fixture("tests/fixtures/tiny/weights.safetensors")
    (n,) = struct.unpack("<Q", big[:8])
    out("safetensors", "tiny_weights_header_only.safetensors", big[: 8 + n])
    # Every dtype the converters handle, plus ones they must refuse (F64, BOOL), scalars and
    # empty shapes.
    t = [
        ("f32", "F32", [2, 2], struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)),
        ("f16", "F16", [3], struct.pack("<3H", 0x3C00, 0xC000, 0x7C00)),
        ("bf16", "BF16", [2], struct.pack("<2H", 0x3F80, 0xFF80)),
        ("i8", "I8", [2], struct.pack("<2b", -1, 7)),
        ("u8", "U8", [3], bytes([0, 1, 255])),
        ("i16", "I16", [1, 2], struct.pack("<2h", -300, 300)),
        ("u16", "U16", [2], struct.pack("<2H", 1, 65535)),
        ("i32", "I32", [2], struct.pack("<2i", -5, 1 << 30)),
        ("u32", "U32", [1], struct.pack("<I", 1 << 31)),
        ("i64", "I64", [2], struct.pack("<2q", -1, 1 << 40)),
        ("f64", "F64", [1], struct.pack("<d", 1.5)),
        ("bool", "BOOL", [2], bytes([0, 1])),
        ("scalar", "F32", [], struct.pack("<f", 7.0)),
        ("empty", "F32", [0, 4], b""),
    ]
    out("safetensors", "dtypes.safetensors", safetensors(t, {"format": "pt", "medsa": "seed"}))
    # Key names the weight store counts by part (encoder, adapters, decoder, prompt encoder).
    t = [
        ("image_encoder.blocks.0.MLP_Adapter.fc1.weight", "F32", [2, 2], bytes(16)),
        ("image_encoder.patch_embed.proj.weight", "F16", [2], bytes(4)),
        ("mask_decoder.Hyper_Adapter.weight", "BF16", [1], bytes(2)),
        ("prompt_encoder.point_embeddings.0.weight", "F32", [1, 1], bytes(4)),
    ]
    out("safetensors", "sam_keys.safetensors", safetensors(t))


# ---------------------------------------------------------------- torch.save checkpoints


class Call:
    """Pickles as a REDUCE of the global `module.name` on `args`."""

    def __init__(self, module, name, args):
        self.module, self.name, self.args = module, name, args


class Storage:
    """A storage persistent id, as torch.save emits it."""

    def __init__(self, kind, key, numel):
        self.kind, self.key, self.numel = kind, key, numel


# pickle resolves the global string against the module, so make the names importable.
import sys  # noqa: E402
import types  # noqa: E402

for mod, names in {
    "torch": ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
              "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage"],
    "torch._utils": ["_rebuild_tensor_v2", "_rebuild_parameter"],
    "torch.optim": ["SGD"],
}.items():
    m = sys.modules.get(mod) or types.ModuleType(mod)
    sys.modules[mod] = m
    if "." in mod:
        parent = sys.modules[mod.rsplit(".", 1)[0]]
        setattr(parent, mod.rsplit(".", 1)[1], m)
    for n in names:
        # A class whose qualified name is exactly module.name, so pickle's lookup succeeds.
        c = type(n, (), {})
        c.__module__, c.__qualname__ = mod, n
        setattr(m, n, c)


def resolve(g):
    mod, name = g.rsplit(".", 1)
    return getattr(sys.modules[mod], name)


class TorchPickler(pickle.Pickler):
    """Emits the opcodes torch.save does without needing torch: globals by name (stand-in
    classes registered above), storages as persistent ids ('storage', torch.XStorage, key,
    location, numel)."""

    def reducer_override(self, obj):
        if isinstance(obj, Call):
            return (resolve(obj.module + "." + obj.name), obj.args)
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", resolve("torch." + obj.kind), obj.key, "cpu", obj.numel)
        return None


def tensor(storage, offset, size, stride, param=False):
    from collections import OrderedDict

    t = Call("torch._utils", "_rebuild_tensor_v2", (storage, offset, size, stride, False, OrderedDict()))
    if param:
        t = Call("torch._utils", "_rebuild_parameter", (t, True, OrderedDict()))
    return t


def dumps(obj, protocol):
    b = io.BytesIO()
    TorchPickler(b, protocol=protocol).dump(obj)
    return b.getvalue()


def torch_zip(prefix, pkl, storages, align=64):
    """A torch.save-style archive: STORED entries, data aligned like torch>=2 does it."""
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        def add(name, data):
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            # Pad the local header's extra field so the data starts on an `align` boundary.
            if align:
                head = b.tell() + 30 + len(name.encode())
                pad = -(head + 4) % align
                zi.extra = struct.pack("<HH", 0xFE00, pad) + bytes(pad)
            z.writestr(zi, data)

        add(f"{prefix}/data.pkl", pkl)
        add(f"{prefix}/byteorder", b"little")
        for key, raw in storages.items():
            add(f"{prefix}/data/{key}", raw)
        add(f"{prefix}/version", b"3\n")
    return b.getvalue()


def seeds_pth_and_pickle():
    from collections import OrderedDict

    for rel in ["tests/fixtures/pth/small.pth", "tests/fixtures/pth/medsa_style.pth"]:
        raw = fixture(rel)
        out("pth_zip", os.path.basename(rel), raw)
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
            out("pickle", os.path.basename(rel)[:-4] + ".pkl", z.read(pkl))
    # tiny_plain.pth is 470 KB: only its pickle (a full SAM-shaped state dict) is a seed.
    with zipfile.ZipFile(os.path.join(ROOT, "tests/fixtures/pth/tiny_plain.pth")) as z:
        out("pickle", "tiny_plain.pkl", z.read("tiny_plain/data.pkl"))

    # A training checkpoint: state dict under "state_dict" with a DataParallel prefix, an
    # optimizer entry holding opaque objects, strided and offset views, every storage dtype.
    s_f = Storage("FloatStorage", "0", 12)
    s_h = Storage("HalfStorage", "1", 4)
    s_b = Storage("BFloat16Storage", "2", 2)
    s_d = Storage("DoubleStorage", "3", 2)
    s_l = Storage("LongStorage", "4", 1)
    s_u = Storage("ByteStorage", "5", 3)
    sd = OrderedDict()
    sd["module.conv.weight"] = tensor(s_f, 0, (2, 3), (3, 1), param=True)
    sd["module.conv.weight_t"] = tensor(s_f, 0, (3, 2), (1, 3))  # transposed view
    sd["module.conv.bias"] = tensor(s_f, 6, (2,), (2,))  # strided, offset
    sd["module.bcast"] = tensor(s_f, 11, (4,), (0,))  # expanded (stride 0)
    sd["module.half"] = tensor(s_h, 0, (2, 2), (2, 1))
    sd["module.bf16"] = tensor(s_b, 0, (2,), (1,))
    sd["module.f64"] = tensor(s_d, 0, (2,), (1,))
    sd["module.num_batches_tracked"] = tensor(s_l, 0, (), ())
    sd["module.mask"] = tensor(s_u, 0, (3,), (1,))
    ckpt = {
        "epoch": 7,
        "best_dice": 0.875,
        "arch": "medsa",
        "state_dict": sd,
        "optimizer": Call("torch.optim", "SGD", ((), {"lr": 1e-4})),
        "history": [1, 2.5, None, True, b"\x00\x01"],
    }
    storages = {
        "0": struct.pack("<12f", *[float(i) for i in range(12)]),
        "1": struct.pack("<4H", 0x3C00, 0x4000, 0xBC00, 0),
        "2": struct.pack("<2H", 0x3F80, 0x4000),
        "3": struct.pack("<2d", 1.0, -2.0),
        "4": struct.pack("<q", 100),
        "5": bytes([1, 0, 1]),
    }
    for proto in (2, 4):
        pkl = dumps(ckpt, proto)
        out("pickle", f"train_ckpt_p{proto}.pkl", pkl)
        out("pth_zip", f"train_ckpt_p{proto}.pth", torch_zip("archive", pkl, storages))
    # A plain state dict without alignment padding (older torch) and a "model" key variant.
    plain = OrderedDict()
    plain["w"] = tensor(s_f, 0, (12,), (1,))
    pkl = dumps({"model": plain, "iter": 3}, 2)
    out("pickle", "model_key.pkl", pkl)
    out("pth_zip", "model_key_unaligned.pth", torch_zip("ck", pkl, {"0": storages["0"]}, align=0))


# ---------------------------------------------------------------- NIfTI


def nifti(dims, datatype, bitpix, data, big=False, slope=0.0, inter=0.0, qform=0, sform=0,
          magic=b"n+1\0", vox_offset=352.0, pixdim=(1.0, 1.0, 1.0)):
    e = ">" if big else "<"
    h = bytearray(348)
    struct.pack_into(e + "i", h, 0, 348)
    struct.pack_into(e + "8h", h, 40, len(dims), *(list(dims) + [1] * (7 - len(dims))))
    struct.pack_into(e + "hh", h, 70, datatype, bitpix)
    struct.pack_into(e + "8f", h, 76, 1.0, *(list(pixdim) + [1.0] * (7 - len(pixdim))))
    struct.pack_into(e + "f", h, 108, vox_offset)
    struct.pack_into(e + "ff", h, 112, slope, inter)
    h[123] = 2 | 8  # mm, s
    struct.pack_into(e + "hh", h, 252, qform, sform)
    if qform:
        struct.pack_into(e + "6f", h, 256, 0.0, 0.0, 0.38268343, -10.0, 5.0, 2.5)
    if sform:
        struct.pack_into(e + "12f", h, 280, 2.0, 0, 0, -90, 0, 2.0, 0, -126, 0, 0, 2.0, -72)
    h[148:148 + 12] = b"medsa seed\0\0"
    h[344:348] = magic
    ext = b"\0\0\0\0" if magic == b"n+1\0" else b""
    return bytes(h) + ext + data


def seeds_nifti():
    # The fuzz target's first byte chooses the container: 0 plain .nii, 1 gzip the rest,
    # 2 raw rest under a .nii.gz name. Fixtures are plain or gzip files as they are.
    fixdir = os.path.join(ROOT, "tests/fixtures/nifti")
    for name in sorted(os.listdir(fixdir)):
        raw = fixture(os.path.join("tests/fixtures/nifti", name))
        if name.endswith(".nii"):
            out("nifti", "plain_" + name, b"\x00" + raw)
        elif name.endswith(".nii.gz"):
            out("nifti", "rawgz_" + name, b"\x02" + raw)
            out("nifti", "gz_" + name[:-3], b"\x01" + gzip.decompress(raw))
    u8 = bytes(range(24))
    out("nifti", "synth_u8_2x3x4.nii", b"\x00" + nifti([2, 3, 4], 2, 8, u8))
    out("nifti", "synth_i16_be_scaled.nii", b"\x00" + nifti(
        [2, 2, 1], 4, 16, struct.pack(">4h", -300, -1, 0, 32767), big=True, slope=2.0,
        inter=-3.0, qform=1))
    out("nifti", "synth_f32_sform_4d.nii", b"\x01" + nifti(
        [2, 2, 1, 1], 16, 32, struct.pack("<4f", 0.5, -1.0, 1e30, float("nan")), sform=4,
        pixdim=(0.5, 0.7, 3.0)))
    out("nifti", "synth_f64.nii", b"\x00" + nifti([1, 1, 2], 64, 64, struct.pack("<2d", 1, 2)))
    out("nifti", "synth_u16_gz.nii", b"\x01" + nifti([2, 2], 512, 16, struct.pack("<4H", 1, 2, 3, 4)))
    # A detached-header magic (ni1) and a later vox_offset after an extension block.
    out("nifti", "synth_ni1.nii", b"\x00" + nifti([1, 1, 1], 2, 8, b"\x07", magic=b"ni1\0"))
    ext = struct.pack("<4B", 1, 0, 0, 0) + struct.pack("<ii", 16, 6) + b"medsa\0\0\0"
    h = nifti([1, 1, 1], 2, 8, b"", vox_offset=368.0)
    out("nifti", "synth_extension.nii", b"\x00" + h[:348] + ext + b"\x09")


# ---------------------------------------------------------------- images


def png(width, height, color_type, bit_depth, rows, palette=None, interlace=0):
    """rows: the filtered scanlines without their filter byte (for Adam7, the passes' rows)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    raw = b"".join(b"\x00" + r for r in rows)  # filter type 0 on every row
    body = chunk(b"IHDR", ihdr)
    if palette:
        body += chunk(b"PLTE", palette)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def jpeg_dc_only(width, height, components):
    """A baseline JPEG whose blocks are all flat grey: every block codes DC diff 0 and an
    immediate EOB with the standard Huffman tables (the encoder below needs nothing else)."""
    seg = lambda m, body: b"\xff" + bytes([m]) + struct.pack(">H", len(body) + 2) + body  # noqa: E731
    dqt = seg(0xDB, b"\x00" + bytes([1] * 64))
    sof = bytes([8]) + struct.pack(">HH", height, width) + bytes([components])
    for c in range(components):
        # Luma 2x2 sampling when in colour (4:2:0), chroma 1x1.
        samp = 0x22 if (components == 3 and c == 0) else 0x11
        sof += bytes([c + 1, samp, 0])
    sof = seg(0xC0, sof)
    # Standard luminance DC and AC tables (ITU T.81 K.3), used for every component.
    dc_bits = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    dc_vals = list(range(12))
    ac_bits = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]
    ac_vals = bytes.fromhex(
        "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a"
        "25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a"
        "838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9ca"
        "d2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9fa")
    dht = seg(0xC4, b"\x00" + bytes(dc_bits) + bytes(dc_vals) + b"\x10" + bytes(ac_bits) + ac_vals)
    sos = bytes([components])
    for c in range(components):
        sos += bytes([c + 1, 0x00])
    sos = seg(0xDA, sos + b"\x00\x3f\x00")
    # DC category 0 is code `00`, EOB is `1010`: six bits per block.
    if components == 3:
        mcus = ((width + 15) // 16) * ((height + 15) // 16)
        blocks = mcus * 6
    else:
        blocks = ((width + 7) // 8) * ((height + 7) // 8)
    bits = "001010" * blocks
    bits += "1" * (-len(bits) % 8)
    data = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    return b"\xff\xd8" + dqt + sof + dht + sos + data + b"\xff\xd9"


def seeds_image():
    # First byte: even -> written as .png, odd -> .jpg (content is sniffed either way).
    out("image", "phantom_grey.png", b"\x00" + png(4, 3, 0, 8, [bytes([0, 64, 128, 255])] * 3))
    out("image", "labels16.png", b"\x00" + png(3, 2, 0, 16, [struct.pack(">3H", 0, 1, 300)] * 2))
    out("image", "rgb.png", b"\x00" + png(2, 2, 2, 8, [bytes([255, 0, 0, 0, 255, 0])] * 2))
    out("image", "rgba16_interlaced.png", b"\x00" + png(
        # Adam7 on 2x2: pass 1 and pass 6 one pixel each, pass 7 the second row (8 B/pixel).
        2, 2, 6, 16, [bytes(range(8)), bytes(range(8, 16)), bytes(range(16))], interlace=1))
    out("image", "palette.png", b"\x00" + png(
        4, 1, 3, 2, [bytes([0b00011011])], palette=bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])))
    out("image", "grey_alpha.png", b"\x00" + png(1, 1, 4, 8, [bytes([10, 200])]))
    out("image", "grey.jpg", b"\x01" + jpeg_dc_only(8, 8, 1))
    out("image", "colour420.jpg", b"\x01" + jpeg_dc_only(16, 16, 3))
    ph = fixture("examples/phantom.png")
    if len(ph) < 64 * 1024:
        out("image", "phantom.png", b"\x00" + ph)


# ---------------------------------------------------------------- manifests, prompts


def seeds_text():
    out("manifest", "mni152.json", fixture("examples/mni152.json"))
    manifests = {
        "list.json": [{"image": "a.png", "points": [[1, 2], [3, 4, 0]], "box": [0, 0, 5, 5]}],
        "cases.json": {"cases": [
            {"image": "/abs/b.nii.gz", "output": "b_mask.nii.gz", "label": "gt/b.nii.gz",
             "objects": [{"box": [1, 2, 3, 4, 5, 6]}, {"points": [[1, 2, 3, 1]]}]},
            {"image": "c.jpg", "from_label": {"path": "c_lab.png", "id": 3, "click": True}},
        ]},
        "bad_box.json": [{"image": "a.png", "box": [1, 2, 3]}],
        "empty.json": [],
    }
    for name, m in manifests.items():
        out("manifest", name, json.dumps(m).encode())
    for i, s in enumerate(["10,20,110,140", "5.5, 7", "1,2,3", "1e3,-0,inf,nan", " 4 , 5 ,6,7,8,9",
                           ",", "0x10,1", "1,2,3,4,5,6"]):
        out("prompt", f"p{i}.txt", s.encode())


if __name__ == "__main__":
    for sub in ["safetensors", "pth_zip", "pickle", "nifti", "image", "manifest", "prompt"]:
        os.makedirs(os.path.join(SEEDS, sub), exist_ok=True)
    seeds_safetensors()
    seeds_pth_and_pickle()
    seeds_nifti()
    seeds_image()
    seeds_text()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(SEEDS) for f in fs)
    print(f"seeds: {total} bytes under {os.path.relpath(SEEDS, ROOT)}")
    shutil.rmtree(os.path.join(ROOT, "fuzz", "__pycache__"), ignore_errors=True)
