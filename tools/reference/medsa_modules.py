"""The Med-SA model pieces of the PyTorch oracle (shared/SPEC.md sections 2-4 and 7), written
for this project on top of the official `segment_anything.modeling` modules: Med-SA encoder
blocks with their adapters and the SD-Trans depth branch, the decoder adapters, and the public
Med-SA code's own two-way block. `write_fixtures.py` builds its models from them and
`write_grad_fixtures.py` reuses them through it.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment_anything.modeling.image_encoder import (
    Block,
    ImageEncoderViT,
    window_partition,
    window_unpartition,
)
from segment_anything.modeling.transformer import TwoWayAttentionBlock

# Number of output tokens that the mask decoder puts in front of the sparse
# prompt tokens: 1 IoU token + (3 multimask + 1) mask tokens.
N_OUTPUT_TOKENS = 1 + 4

ENC_EPS = 1e-6


# --------------------------------------------------------------------------
# Med-SA building blocks
# --------------------------------------------------------------------------


class Adapter(nn.Module):
    """Bottleneck adapter: D -> D/4 -> D with exact GELU, optional residual."""

    def __init__(self, dim: int, skip: bool):
        super().__init__()
        hidden = dim // 4
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.skip = skip

    def forward(self, x):
        y = self.D_fc2(F.gelu(self.D_fc1(x)))
        return x + y if self.skip else y


class HyperAdapter(nn.Module):
    """HyP-Adpt (SPEC section 4): a bottleneck whose middle layers are
    generated, one per sparse prompt token, by a small hyper-network."""

    def __init__(self, dim: int):
        super().__init__()
        r = dim // 4
        self.r = r
        self.D_fc1 = nn.Linear(dim, r)
        self.D_fc2 = nn.Linear(r, dim)
        self.hyper = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, r * r))
        self.norm = nn.LayerNorm(r)

    def forward(self, x, prompts):
        # x: (B, L, dim); prompts: (B, N, dim) -- each sample its own prompts
        h = self.D_fc1(x)
        bsz, n_prompts, _ = prompts.shape
        if n_prompts > 0:
            gen = self.hyper(prompts).reshape(bsz, n_prompts, self.r, self.r)
            for i in range(n_prompts):
                h = F.relu(self.norm(torch.matmul(h, gen[:, i])))
        return x + self.D_fc2(h)


def depth_grid(d: int):
    """Factorisation of the slice count used by the reference (SPEC 3)."""
    if d == 1:
        return 1, 1
    a = int(math.isqrt(d))
    b = a + 1
    while True:
        if a * b == d:
            return a, b
        if a * b < d:
            b += 1
        else:
            a -= 1


def _slices_to_tokens(x, depth):
    """(b*d, H, W, C) with slice index fastest -> (b*H*W, d, C)."""
    n, h, w, c = x.shape
    b = n // depth
    return x.reshape(b, depth, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, depth, c)


def _tokens_to_slices(x, depth, h, w):
    """Inverse of _slices_to_tokens: (b*H*W, ..., C) -> (b*d, H, W, C)."""
    c = x.shape[-1]
    b = x.shape[0] // (h * w)
    return x.reshape(b, h, w, depth, c).permute(0, 3, 1, 2, 4).reshape(b * depth, h, w, c)


class MedSABlock(Block):
    """Encoder block with Med-SA adapters (SPEC sections 2 and 3).

    Differs from the official Block in the order of norm1 and the window
    partition (Med-SA partitions, i.e. zero-pads, first and normalises the
    padded tokens), and in the adapters."""

    def __init__(self, dim, num_heads, window_size, input_size,
                 space=True, mlp=True, depth_adapter=False):
        super().__init__(
            dim=dim,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=ENC_EPS),
            act_layer=nn.GELU,
            use_rel_pos=True,
            rel_pos_zero_init=False,
            window_size=window_size,
            input_size=input_size,
        )
        self.Space_Adapter = Adapter(dim, skip=True) if space else None
        self.MLP_Adapter = Adapter(dim, skip=False) if mlp else None
        self.Depth_Adapter = Adapter(dim, skip=False) if depth_adapter else None

    def _depth_branch(self, x):
        # x: (n, d, C) tokens over slices -> attention over the (dh, dw) grid
        n, d, c = x.shape
        dh, dw = depth_grid(d)
        y = self.norm1(x).reshape(n, dh, dw, c)
        y = self.attn(y)
        return self.Depth_Adapter(y)

    def forward(self, x, depth: int = 0, mode: str = "per_token"):
        if mode not in ("per_token", "compat"):
            raise ValueError(mode)
        ws = self.window_size
        H, W = x.shape[1], x.shape[2]
        use_depth = depth > 0 and self.Depth_Adapter is not None
        compat_windowed = use_depth and mode == "compat" and ws > 0

        shortcut = x
        if ws > 0:
            xw, pad_hw = window_partition(x, ws)
        else:
            xw = x
        s = self.attn(self.norm1(xw))
        if self.Space_Adapter is not None:
            s = self.Space_Adapter(s)
        if compat_windowed:
            # Reference regrouping: the partitioned (padded, un-normed) windows
            # are read as '(b d) h w c', which mixes windows with slices.
            nwin = xw.shape[0]
            xd = self._depth_branch(_slices_to_tokens(xw, depth))
            dh, dw = depth_grid(depth)
            c = xd.shape[-1]
            # '(b n) dh dw c -> (b dh dw) n c', n = ws*ws, then n -> (ws, ws)
            xd = xd.reshape(nwin // depth, ws * ws, dh, dw, c).permute(0, 2, 3, 1, 4)
            xd = xd.reshape(nwin, ws, ws, c)
            s = s + xd
        if ws > 0:
            s = window_unpartition(s, ws, pad_hw, (H, W))
        x = shortcut + s
        if use_depth and not compat_windowed:
            xd = self._depth_branch(_slices_to_tokens(shortcut, depth))
            x = x + _tokens_to_slices(xd, depth, H, W)

        xn = self.norm2(x)
        if self.MLP_Adapter is not None:
            x = x + self.mlp(xn) + 0.5 * self.MLP_Adapter(xn)
        else:
            x = x + self.mlp(xn)
        return x


class MedSAEncoder(ImageEncoderViT):
    """Official ImageEncoderViT with (optionally) Med-SA blocks swapped in and
    a forward that resizes the absolute position embedding to the token grid
    and records the per-stage activations."""

    def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads,
                 out_chans, window_size, global_attn_indexes, adapter_blocks=(),
                 depth_adapters=False):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=3,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=ENC_EPS),
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=True,
            rel_pos_zero_init=False,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        grid = img_size // patch_size
        for i in adapter_blocks:
            ws = 0 if i in global_attn_indexes else window_size
            self.blocks[i] = MedSABlock(
                embed_dim, num_heads, ws,
                (grid, grid) if ws == 0 else (ws, ws),
                space=True, mlp=True, depth_adapter=depth_adapters,
            )

    def forward_stages(self, x, depth=0, mode="per_token", stages=None):
        x = self.patch_embed(x)
        hg, wg = x.shape[1], x.shape[2]
        pos = self.pos_embed
        if tuple(pos.shape[1:3]) != (hg, wg):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(hg, wg), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        x = x + pos
        if stages is not None:
            stages["enc.patch_embed"] = x
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, MedSABlock):
                x = blk(x, depth, mode)
            else:
                x = blk(x)
            if stages is not None:
                stages[f"enc.blocks.{i}"] = x
        return self.neck(x.permute(0, 3, 1, 2))


class AdaptedTwoWayBlock(TwoWayAttentionBlock):
    """Two-way transformer block with the decoder adapters of SPEC 4."""

    def __init__(self, embedding_dim, num_heads, mlp_dim, skip_first_layer_pe):
        super().__init__(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            activation=nn.ReLU,
            attention_downsample_rate=2,
            skip_first_layer_pe=skip_first_layer_pe,
        )
        self.Hyper_Adapter = HyperAdapter(embedding_dim)
        self.MLP_Adapter = Adapter(embedding_dim, skip=False)
        self.Cross_Adapter = Adapter(embedding_dim, skip=True)

    def forward(self, queries, keys, query_pe, key_pe):
        # The transformer passes the initial tokens as query_pe; the sparse
        # prompt embeddings are the tokens after the output tokens.
        prompts = query_pe[:, N_OUTPUT_TOKENS:, :]

        # 1. self-attention over the tokens
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            qp = queries + query_pe
            queries = queries + self.self_attn(q=qp, k=qp, v=queries)
        queries = self.norm1(queries)

        # 2. tokens -> image cross attention, then HyP-Adpt
        qp = queries + query_pe
        kp = keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q=qp, k=kp, v=keys)
        queries = self.Hyper_Adapter(queries, prompts)
        queries = self.norm2(queries)

        # 3. MLP with the parallel adapter
        queries = queries + self.mlp(queries) + 0.5 * self.MLP_Adapter(queries)
        queries = self.norm3(queries)

        # 4. image -> tokens cross attention, then the Cross adapter on keys
        qp = queries + query_pe
        kp = keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=kp, k=qp, v=queries)
        keys = self.Cross_Adapter(keys)
        keys = self.norm4(keys)
        return queries, keys


class ReferenceMLP(nn.Module):
    """The block MLP of the public Med-SA decoder, in its key layout (SPEC 7):
    `layers.0.0` = SAM's lin1 (C -> mlp_dim, ReLU after it), `fc` = SAM's lin2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())])
        self.fc = nn.Linear(hidden, dim)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)


class ReferenceTwoWayBlock(TwoWayAttentionBlock):
    """Two-way block of the decoder that the public Med-SA code builds (SPEC 7),
    optionally with our decoder adapters (SPEC 4) where AdaptedTwoWayBlock has
    them.  Only the self-attention step differs from SAM's:

      first block:  queries = queries + self_attn(queries, queries, queries)
      later blocks: queries = queries + pe
                    queries = queries + self_attn(queries, queries, queries)

    then norm1; the rest is SAM's block.  `reference_self_attn = False` switches
    back to SAM's self-attention step (used by the self-checks and to measure
    how far the two flavours are apart)."""

    def __init__(self, embedding_dim, num_heads, mlp_dim, skip_first_layer_pe, adapters):
        super().__init__(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            activation=nn.ReLU,
            attention_downsample_rate=2,
            skip_first_layer_pe=skip_first_layer_pe,
        )
        # Replaces SAM's MLPBlock in place (same position in the state dict).
        self.mlp = ReferenceMLP(embedding_dim, mlp_dim)
        if adapters:
            self.Hyper_Adapter = HyperAdapter(embedding_dim)
            self.MLP_Adapter = Adapter(embedding_dim, skip=False)
            self.Cross_Adapter = Adapter(embedding_dim, skip=True)
        else:
            self.Hyper_Adapter = self.MLP_Adapter = self.Cross_Adapter = None
        self.reference_self_attn = True

    def forward(self, queries, keys, query_pe, key_pe):
        prompts = query_pe[:, N_OUTPUT_TOKENS:, :]

        # 1. self-attention over the tokens
        if self.reference_self_attn:
            if not self.skip_first_layer_pe:
                queries = queries + query_pe
            queries = queries + self.self_attn(q=queries, k=queries, v=queries)
        elif self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            qp = queries + query_pe
            queries = queries + self.self_attn(q=qp, k=qp, v=queries)
        queries = self.norm1(queries)

        # 2. tokens -> image cross attention (then HyP-Adpt)
        qp = queries + query_pe
        kp = keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q=qp, k=kp, v=keys)
        if self.Hyper_Adapter is not None:
            queries = self.Hyper_Adapter(queries, prompts)
        queries = self.norm2(queries)

        # 3. MLP (with the parallel adapter)
        if self.MLP_Adapter is not None:
            queries = queries + self.mlp(queries) + 0.5 * self.MLP_Adapter(queries)
        else:
            queries = queries + self.mlp(queries)
        queries = self.norm3(queries)

        # 4. image -> tokens cross attention (then the Cross adapter on keys)
        qp = queries + query_pe
        kp = keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=kp, k=qp, v=queries)
        if self.Cross_Adapter is not None:
            keys = self.Cross_Adapter(keys)
        keys = self.norm4(keys)
        return queries, keys


def reference_block_key(official_key):
    """Key of a SAM (or AdaptedTwoWayBlock) two-way block parameter in the
    reference layout: mlp.lin1 -> mlp.layers.0.0, mlp.lin2 -> mlp.fc."""
    return official_key.replace("mlp.lin1.", "mlp.layers.0.0.").replace("mlp.lin2.", "mlp.fc.")


def set_reference_self_attn(sam, on):
    for layer in sam.mask_decoder.transformer.layers:
        if isinstance(layer, ReferenceTwoWayBlock):
            layer.reference_self_attn = on


# --------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------
