//! The model configuration as JSON, as adapter checkpoints store it in their `config` metadata:
//! field names as in [`SamConfig`]; fields added later are optional when read, so older files
//! keep loading.

use serde_json::{json, Value};

use crate::error::Error;
use crate::sam::config::{
    BlockConfig, DecoderFlavour, DecoderLayerConfig, PatchEmbedKind, SamConfig, TinyBlockConfig,
    TinyStageConfig, TinyVitConfig,
};

/// A [`SamConfig`] as JSON (field names as in the struct).
pub fn config_to_json(cfg: &SamConfig) -> Value {
    json!({
        "patch": cfg.patch,
        "embed_dim": cfg.embed_dim,
        "heads": cfg.heads,
        "mlp_dim": cfg.mlp_dim,
        "pos_grid": [cfg.pos_grid.0, cfg.pos_grid.1],
        "pos_embed_grid": cfg.pos_embed_grid.map(|g| [g.0, g.1]),
        "blocks": cfg.blocks.iter().map(|b| json!({
            "window": b.window,
            "space_adapter": b.space_adapter,
            "mlp_adapter": b.mlp_adapter,
            "depth_adapter": b.depth_adapter,
            "medsa_rel_names": b.medsa_rel_names,
        })).collect::<Vec<_>>(),
        "out_chans": cfg.out_chans,
        "adapter_dim": cfg.adapter_dim,
        "prompt_dim": cfg.prompt_dim,
        "mask_in_chans": cfg.mask_in_chans,
        "decoder_mlp_dim": cfg.decoder_mlp_dim,
        "decoder_heads": cfg.decoder_heads,
        "attention_downsample": cfg.attention_downsample,
        "decoder_layers": cfg.decoder_layers.iter().map(|l| json!({
            "hyper": l.hyper,
            "mlp": l.mlp,
            "cross": l.cross,
        })).collect::<Vec<_>>(),
        "num_mask_tokens": cfg.num_mask_tokens,
        "iou_head": [cfg.iou_head.0, cfg.iou_head.1],
        "decoder_flavour": cfg.decoder_flavour.name(),
        "tiny_vit": cfg.tiny_vit.as_ref().map(tiny_vit_to_json),
    })
}

fn tiny_vit_to_json(t: &TinyVitConfig) -> Value {
    json!({
        "patch_embed": match t.patch_embed {
            PatchEmbedKind::Pointwise => "pointwise",
            PatchEmbedKind::Strided3x3 => "strided3x3",
        },
        "stages": t.stages.iter().map(|s| json!({
            "width": s.width,
            "heads": s.heads,
            "window": s.window,
            "hidden": s.hidden,
            "local_conv": s.local_conv,
            "merge_stride": s.merge_stride,
            "blocks": s.blocks.iter().map(|b| json!({
                "space_adapter": b.space_adapter,
                "mlp_adapter": b.mlp_adapter,
                "depth_adapter": b.depth_adapter,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn tiny_vit_from_json(v: &Value) -> std::result::Result<TinyVitConfig, String> {
    let c = "config.tiny_vit";
    let patch_embed = match v.get("patch_embed").and_then(Value::as_str) {
        Some("pointwise") => PatchEmbedKind::Pointwise,
        Some("strided3x3") => PatchEmbedKind::Strided3x3,
        _ => {
            return Err(format!(
                "{c}.patch_embed: expected \"pointwise\" or \"strided3x3\""
            ))
        }
    };
    let stages = v
        .get("stages")
        .and_then(Value::as_array)
        .ok_or(format!("{c}.stages: expected an array"))?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ctx = format!("{c}.stages[{i}]");
            let blocks = s
                .get("blocks")
                .and_then(Value::as_array)
                .ok_or(format!("{ctx}.blocks: expected an array"))?
                .iter()
                .enumerate()
                .map(|(j, b)| {
                    let ctx = format!("{ctx}.blocks[{j}]");
                    Ok(TinyBlockConfig {
                        space_adapter: flag(b, &ctx, "space_adapter")?,
                        mlp_adapter: flag(b, &ctx, "mlp_adapter")?,
                        depth_adapter: flag(b, &ctx, "depth_adapter")?,
                    })
                })
                .collect::<std::result::Result<_, String>>()?;
            Ok(TinyStageConfig {
                width: num(s, &ctx, "width")?,
                heads: num(s, &ctx, "heads")?,
                window: num(s, &ctx, "window")?,
                hidden: num(s, &ctx, "hidden")?,
                local_conv: num(s, &ctx, "local_conv")?,
                merge_stride: match s.get("merge_stride") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(num(s, &ctx, "merge_stride")?),
                },
                blocks,
            })
        })
        .collect::<std::result::Result<_, String>>()?;
    Ok(TinyVitConfig {
        patch_embed,
        stages,
    })
}

/// Reads [`config_to_json`]'s output; the error names the field (`config.blocks[3].window`).
pub fn config_from_json(v: &Value) -> std::result::Result<SamConfig, String> {
    let c = "config";
    let blocks = list(v, c, "blocks")?
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let ctx = format!("config.blocks[{i}]");
            Ok(BlockConfig {
                window: num(b, &ctx, "window")?,
                space_adapter: flag(b, &ctx, "space_adapter")?,
                mlp_adapter: flag(b, &ctx, "mlp_adapter")?,
                depth_adapter: flag(b, &ctx, "depth_adapter")?,
                medsa_rel_names: flag(b, &ctx, "medsa_rel_names")?,
            })
        })
        .collect::<std::result::Result<_, String>>()?;
    let decoder_layers = list(v, c, "decoder_layers")?
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let ctx = format!("config.decoder_layers[{i}]");
            Ok(DecoderLayerConfig {
                hyper: flag(l, &ctx, "hyper")?,
                mlp: flag(l, &ctx, "mlp")?,
                cross: flag(l, &ctx, "cross")?,
            })
        })
        .collect::<std::result::Result<_, String>>()?;
    let adapter_dim = match field(v, c, "adapter_dim")? {
        Value::Null => None,
        x => Some(
            x.as_u64()
                .ok_or("config.adapter_dim: expected null or a non-negative integer")?
                as usize,
        ),
    };
    Ok(SamConfig {
        patch: num(v, c, "patch")?,
        embed_dim: num(v, c, "embed_dim")?,
        heads: num(v, c, "heads")?,
        mlp_dim: num(v, c, "mlp_dim")?,
        pos_grid: pair(v, c, "pos_grid")?,
        blocks,
        out_chans: num(v, c, "out_chans")?,
        adapter_dim,
        prompt_dim: num(v, c, "prompt_dim")?,
        mask_in_chans: num(v, c, "mask_in_chans")?,
        decoder_mlp_dim: num(v, c, "decoder_mlp_dim")?,
        decoder_heads: num(v, c, "decoder_heads")?,
        attention_downsample: num(v, c, "attention_downsample")?,
        decoder_layers,
        num_mask_tokens: num(v, c, "num_mask_tokens")?,
        iou_head: pair(v, c, "iou_head")?,
        // Both fields came with the reference decoder; older files are SAM-flavoured and store
        // the position embedding at the native grid.
        decoder_flavour: match v.get("decoder_flavour") {
            None => DecoderFlavour::Sam,
            Some(f) => f
                .as_str()
                .ok_or("config.decoder_flavour: expected \"sam\" or \"medsa\"")?
                .parse()
                .map_err(|e: Error| format!("config.decoder_flavour: {e}"))?,
        },
        pos_embed_grid: match v.get("pos_embed_grid") {
            None | Some(Value::Null) => None,
            Some(_) => Some(pair(v, c, "pos_embed_grid")?),
        },
        tiny_vit: match v.get("tiny_vit") {
            None | Some(Value::Null) => None,
            Some(t) => Some(tiny_vit_from_json(t)?),
        },
    })
}

fn field<'a>(v: &'a Value, ctx: &str, k: &str) -> std::result::Result<&'a Value, String> {
    v.get(k).ok_or_else(|| format!("{ctx}.{k} is missing"))
}
fn num(v: &Value, ctx: &str, k: &str) -> std::result::Result<usize, String> {
    field(v, ctx, k)?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| format!("{ctx}.{k}: expected a non-negative integer"))
}
fn flag(v: &Value, ctx: &str, k: &str) -> std::result::Result<bool, String> {
    field(v, ctx, k)?
        .as_bool()
        .ok_or_else(|| format!("{ctx}.{k}: expected true or false"))
}
fn pair(v: &Value, ctx: &str, k: &str) -> std::result::Result<(usize, usize), String> {
    match field(v, ctx, k)?.as_array().map(|a| a.as_slice()) {
        Some([a, b]) => match (a.as_u64(), b.as_u64()) {
            (Some(a), Some(b)) => Ok((a as usize, b as usize)),
            _ => Err(format!("{ctx}.{k}: expected two non-negative integers")),
        },
        _ => Err(format!("{ctx}.{k}: expected two non-negative integers")),
    }
}
fn list<'a>(v: &'a Value, ctx: &str, k: &str) -> std::result::Result<&'a [Value], String> {
    field(v, ctx, k)?
        .as_array()
        .map(|a| a.as_slice())
        .ok_or_else(|| format!("{ctx}.{k}: expected a list"))
}
