"""Writes the torch.save fixtures for the native .pth reader (tests/convert.rs).

    /work/main/.venv-ref/bin/python tools/reference/write_pth_fixture.py

Outputs, in tests/fixtures/pth/:
- small.pth / small.safetensors: a state dict that exercises the reader (contiguous and strided
  views, shared storages with offsets, f16/bf16/f64, an int64 tensor, 0-d and empty tensors) and
  the expected values as contiguous F32 (non-float tensors are not in the expected file).
- medsa_style.pth / medsa_style.safetensors: a Med-SA style checkpoint (epoch, DataParallel
  `module.` keys under "state_dict", an Adam optimizer state) and the expected stripped state dict.
- tiny_plain.pth: tests/fixtures/tiny_plain/weights.safetensors re-saved with torch.save.
"""

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "pth"


def expected(sd):
    """The values the reader must produce: float tensors as contiguous f32."""
    return {
        k: v.to(torch.float32).contiguous().clone()
        for k, v in sd.items()
        if v.is_floating_point()
    }


def small():
    torch.manual_seed(7)
    base = torch.randn(10)
    sd = OrderedDict()
    sd["f32"] = torch.randn(3, 4)
    sd["f32_t"] = torch.randn(4, 5).t()  # stride (1, 5)
    sd["f32_perm"] = torch.randn(2, 3, 4).permute(2, 0, 1)
    sd["f16"] = torch.randn(2, 3).half()
    sd["f16_t"] = torch.randn(3, 2).half().t()
    sd["bf16"] = torch.randn(5).bfloat16()
    sd["f64"] = torch.randn(2, 2, dtype=torch.float64)
    sd["shared_a"] = base[2:8].view(2, 3)  # same storage, offset 2
    sd["shared_b"] = base[5:]  # same storage, offset 5
    sd["shared_c"] = base[1::3]  # offset 1, stride 3
    sd["i64"] = torch.arange(6, dtype=torch.int64).view(2, 3)
    sd["flag"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.empty(0, 3)
    assert not sd["f32_t"].is_contiguous() and not sd["shared_c"].is_contiguous()
    torch.save(sd, OUT / "small.pth")
    save_file(expected(sd), OUT / "small.safetensors")


def medsa_style():
    torch.manual_seed(8)
    net = torch.nn.Sequential(
        OrderedDict(
            [
                ("lin", torch.nn.Linear(4, 3)),
                ("norm", torch.nn.LayerNorm(3)),
            ]
        )
    )
    net = torch.nn.DataParallel(net)  # keys become module.*
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = net.state_dict()
    assert all(k.startswith("module.") for k in sd)
    ckpt = {
        "epoch": 3,
        "model": "sam",
        "state_dict": sd,
        "optimizer": opt.state_dict(),
        "best_tol": 0.25,
        "path_helper": {"prefix": "logs/x", "ckpt_path": "logs/x/Model"},
    }
    torch.save(ckpt, OUT / "medsa_style.pth")
    save_file(
        expected({k[len("module."):]: v for k, v in sd.items()}),
        OUT / "medsa_style.safetensors",
    )


def tiny_plain():
    sd = load_file(ROOT / "tests" / "fixtures" / "tiny_plain" / "weights.safetensors")
    torch.save(sd, OUT / "tiny_plain.pth")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    small()
    medsa_style()
    tiny_plain()
    for name in ("small.pth", "medsa_style.pth", "tiny_plain.pth"):
        torch.load(OUT / name, map_location="cpu", weights_only=True)  # round-trips
    total = 0
    for p in sorted(OUT.iterdir()):
        total += p.stat().st_size
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")
    print(f"total {total} bytes")
    assert total < 600_000, "pth fixtures grew past 600 KB"


if __name__ == "__main__":
    main()
