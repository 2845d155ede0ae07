"""Golden values for the training building blocks (losses, AdamW, gradient clipping), computed
with PyTorch autograd and MONAI's DiceCELoss, written to tests/fixtures/train/golden.safetensors.

    .venv-ref/bin/pip install monai==1.6.1   # once
    .venv-ref/bin/python tools/reference/write_train_fixtures.py

Seeds fixed; CPU, float64 for the references (the Rust side computes in f32/f64 and is compared
with a relative tolerance)."""
import os

import torch
from monai.losses import DiceCELoss
from safetensors.torch import save_file

torch.manual_seed(7)
out = {}

# BCE with logits, pos_weight 2 (the 2D reference), mean over all elements.
x = (torch.randn(2, 1, 16, 16, dtype=torch.float64) * 3).requires_grad_()
t = (torch.rand(2, 1, 16, 16, dtype=torch.float64) > 0.6).double()
loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0], dtype=torch.float64))(x, t)
loss.backward()
out.update({"bce.logits": x.detach(), "bce.target": t, "bce.loss": loss.detach().reshape(1), "bce.grad": x.grad})

# DiceCE (MONAI, sigmoid, squared prediction): single channel (Dice + BCE) and three channels
# (Dice over sigmoid per channel + softmax cross-entropy with one-hot targets, MONAI's rule).
for name, c in [("dicece1", 1), ("dicece3", 3)]:
    x = (torch.randn(2, c, 8, 12, dtype=torch.float64) * 2).requires_grad_()
    if c == 1:
        t = (torch.rand(2, 1, 8, 12, dtype=torch.float64) > 0.5).double()
    else:
        cls = torch.randint(0, c, (2, 8, 12))
        t = torch.nn.functional.one_hot(cls, c).permute(0, 3, 1, 2).double()
    loss = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")(x, t)
    loss.backward()
    out.update({f"{name}.logits": x.detach(), f"{name}.target": t, f"{name}.loss": loss.detach().reshape(1), f"{name}.grad": x.grad})

# AdamW: 10 steps on a parameter with a given gradient sequence, with and without weight decay.
g = torch.randn(10, 37, dtype=torch.float64)
p0 = torch.randn(37, dtype=torch.float64)
out["adamw.grads"] = g
out["adamw.p0"] = p0
for name, wd in [("wd0", 0.0), ("wd01", 0.1)]:
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    traj = []
    for s in range(10):
        p.grad = g[s].clone()
        opt.step()
        traj.append(p.detach().clone())
    out[f"adamw.{name}.traj"] = torch.stack(traj)

# Global gradient-norm clipping over two tensors.
a = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
b = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
a.grad = torch.randn(5, dtype=torch.float64) * 4
b.grad = torch.randn(3, 2, dtype=torch.float64) * 4
out["clip.a"] = a.grad.clone()
out["clip.b"] = b.grad.clone()
norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm=1.5)
out["clip.norm"] = norm.reshape(1)
out["clip.a_after"] = a.grad
out["clip.b_after"] = b.grad

os.makedirs("tests/fixtures/train", exist_ok=True)
save_file({k: v.contiguous().double() for k, v in out.items()}, "tests/fixtures/train/golden.safetensors",
          metadata={"torch": torch.__version__, "monai": "1.6.1", "seed": "7"})
print("wrote tests/fixtures/train/golden.safetensors", os.path.getsize("tests/fixtures/train/golden.safetensors"), "bytes")
