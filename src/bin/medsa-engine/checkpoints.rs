//! Subcommands on checkpoint files: `convert` (PyTorch .pth to safetensors), `info` (inferred
//! configuration and parameter counts), `init` (a random checkpoint of a custom configuration)
//! and `merge` (base + adapter into one checkpoint).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use medsa::meta::ModelMeta;
use medsa::sam::random::random_checkpoint;
use medsa::sam::{DecoderFlavour, SamConfig};
use medsa::weights::{save_safetensors, save_safetensors_as, ParamCounts, WeightStore};
use medsa::Tensor;

use crate::cli::{DtypeArg, InitArgs};

pub(super) fn convert(input: &Path, output: &Path, dtype: DtypeArg) -> Result<()> {
    let t0 = Instant::now();
    let entries = medsa::pth::read_checkpoint(input)?;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    let mut by_dtype: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in entries {
        if !seen.insert(e.name.clone()) {
            bail!(
                "{}: two tensors are named `{}` after removing the `module.` prefix",
                input.display(),
                e.name
            );
        }
        match e.tensor {
            Some(t) => {
                *by_dtype.entry(e.dtype.name()).or_default() += 1;
                tensors.push((e.name, t));
            }
            None => println!(
                "note: skipping `{}` ({} {:?}): not a floating-point tensor",
                e.name, e.dtype, e.shape
            ),
        }
    }
    if tensors.is_empty() {
        bail!(
            "{}: the state dict has no floating-point tensors",
            input.display()
        );
    }
    let (st, name) = match dtype {
        DtypeArg::F32 => (safetensors::tensor::Dtype::F32, "F32"),
        DtypeArg::F16 => (safetensors::tensor::Dtype::F16, "F16"),
        DtypeArg::Bf16 => (safetensors::tensor::Dtype::BF16, "BF16"),
    };
    save_safetensors_as(output, &tensors, &HashMap::new(), st)?;
    let params: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    let read: Vec<String> = by_dtype.iter().map(|(d, n)| format!("{n} {d}")).collect();
    println!(
        "wrote {} ({} tensors, {} parameters, stored as {name}; read {}) in {:.2} s",
        output.display(),
        tensors.len(),
        params,
        read.join(", "),
        t0.elapsed().as_secs_f64()
    );
    let ws =
        WeightStore::from_tensors(&output.display().to_string(), tensors.into_iter().collect());
    match SamConfig::infer(&ws) {
        Ok(cfg) => println!(
            "SAM model: {} (embed {}, depth {}, image size {:?}{})",
            cfg.variant(),
            cfg.embed_dim,
            match &cfg.tiny_vit {
                Some(t) => t.stages.iter().map(|s| s.blocks.len()).sum(),
                None => cfg.blocks.len(),
            },
            cfg.img_size(),
            if cfg.adapter_dim.is_some() || cfg.has_decoder_adapters() {
                ", Med-SA adapters"
            } else {
                ""
            }
        ),
        Err(e) => println!("not loadable as a SAM model: {e}"),
    }
    Ok(())
}

pub(super) fn info(path: &Path, flavour: Option<DecoderFlavour>) -> Result<()> {
    let ws = WeightStore::open(path)?;
    let mut cfg = SamConfig::infer(&ws)?;
    let meta = ModelMeta::of_checkpoint(path)?;
    let flavour_from = match (flavour, meta.decoder_flavour) {
        (Some(_), _) => "forced by --decoder-flavour",
        (None, Some(_)) => "from the checkpoint's metadata",
        (None, None) if cfg.decoder_flavour == DecoderFlavour::Medsa => {
            "inferred: block MLPs named mlp.layers.0.0 / mlp.fc, as the public Med-SA code saves them"
        }
        (None, None) => "inferred: SAM's key names",
    };
    if let Some(f) = flavour.or(meta.decoder_flavour) {
        cfg.decoder_flavour = f;
    }
    let pc = ParamCounts::of(&ws)?;
    println!("checkpoint      {}", path.display());
    match &cfg.tiny_vit {
        Some(t) => print_tiny_vit(t, &cfg),
        None => print_vit(&cfg),
    }
    println!("neck / prompt   {} channels", cfg.out_chans);
    let dl = &cfg.decoder_layers;
    println!(
        "decoder         {} flavour ({flavour_from}), {} layers, {} heads, mlp {}, {} mask tokens; adapters hyper {} / mlp {} / cross {}",
        cfg.decoder_flavour,
        dl.len(),
        cfg.decoder_heads,
        cfg.decoder_mlp_dim,
        cfg.num_mask_tokens,
        dl.iter().filter(|l| l.hyper).count(),
        dl.iter().filter(|l| l.mlp).count(),
        dl.iter().filter(|l| l.cross).count()
    );
    let recorded = meta.to_metadata();
    if !recorded.is_empty() {
        let kv: Vec<String> = recorded.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("metadata        {}", kv.join(", "));
    }
    let m = |n: usize| format!("{:>12} ({:.2} M)", n, n as f64 / 1e6);
    println!("parameters");
    println!("  total           {}", m(pc.total));
    println!("  image encoder   {}", m(pc.image_encoder));
    println!("  prompt encoder  {}", m(pc.prompt_encoder));
    println!("  mask decoder    {}", m(pc.mask_decoder));
    println!("  adapters        {}", m(pc.encoder_adapters));
    println!("  decoder adapters{}", m(pc.decoder_adapters));
    let frac = |n: usize| 100.0 * n as f64 / pc.total.max(1) as f64;
    println!(
        "  trainable       {:.2}% (adapters) / {:.2}% (adapters + decoder)",
        frac(pc.encoder_adapters + pc.decoder_adapters),
        frac(pc.encoder_adapters + pc.mask_decoder)
    );
    let bad = ws.non_finite()?;
    if bad.is_empty() {
        println!("non-finite      none (every weight is a finite number)");
    } else {
        let total: usize = bad.iter().map(|b| b.1).sum();
        println!(
            "non-finite      {total} NaN/Inf values in {} tensors: the checkpoint will not load",
            bad.len()
        );
        for (k, n) in &bad {
            println!("  {k:<40} {n}");
        }
    }
    Ok(())
}

pub(super) fn init_cmd(a: &InitArgs) -> Result<()> {
    use medsa::sam::config::{BlockConfig, DecoderLayerConfig};
    if a.patch == 0
        || !a.size.is_multiple_of(a.patch)
        || a.heads == 0
        || !a.embed.is_multiple_of(a.heads)
    {
        bail!("--size must be a multiple of --patch and --embed a multiple of --heads");
    }
    if !a.prompt_dim.is_multiple_of(16) {
        bail!("--prompt-dim must be a multiple of 16 (8 decoder heads, downsample 2)");
    }
    let global: Vec<usize> = match &a.global {
        Some(g) => g
            .split(',')
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| anyhow!("--global {g}: expected block indices"))
            })
            .collect::<Result<_>>()?,
        None => (0..a.depth)
            .filter(|i| i % 2 == 1 || *i + 1 == a.depth)
            .collect(),
    };
    let grid = a.size / a.patch;
    let cfg = SamConfig {
        patch: a.patch,
        embed_dim: a.embed,
        heads: a.heads,
        mlp_dim: 4 * a.embed,
        pos_grid: (grid, grid),
        pos_embed_grid: None,
        blocks: (0..a.depth)
            .map(|i| BlockConfig {
                window: if global.contains(&i) { 0 } else { a.window },
                space_adapter: false,
                mlp_adapter: false,
                depth_adapter: false,
                medsa_rel_names: false,
            })
            .collect(),
        out_chans: a.prompt_dim,
        adapter_dim: None,
        prompt_dim: a.prompt_dim,
        mask_in_chans: 16,
        decoder_mlp_dim: a.decoder_mlp,
        decoder_heads: 8,
        attention_downsample: 2,
        decoder_layers: vec![DecoderLayerConfig::default(); 2],
        num_mask_tokens: 4,
        iou_head: (a.prompt_dim, 3),
        decoder_flavour: Default::default(),
        tiny_vit: None,
    };
    let tensors: Vec<(String, Tensor)> = random_checkpoint(&cfg, a.seed).into_iter().collect();
    let n: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    let mut meta = HashMap::new();
    meta.insert("medsa_init".to_string(), format!("seed {}", a.seed));
    save_safetensors(&a.out, &tensors, &meta)?;
    eprintln!(
        "init: {} ({} tensors, {:.2} M parameters, native input {}x{})",
        a.out.display(),
        tensors.len(),
        n as f64 / 1e6,
        a.size,
        a.size
    );
    Ok(())
}

pub(super) fn merge_cmd(
    checkpoint: &Path,
    adapter: &Path,
    out: &Path,
    allow: bool,
    flavour: Option<DecoderFlavour>,
) -> Result<()> {
    let (mut ws, meta) = medsa::train::checkpoint::apply_adapter(checkpoint, adapter, allow)?;
    let mut tensors = Vec::new();
    for k in ws.keys() {
        let shape = ws.shape(&k)?;
        let t = ws.take(&k, &shape)?;
        tensors.push((k, t));
    }
    // The merged model is run as its adapter was trained: its preprocessing, label, depth mode
    // and decoder flavour travel with it (`medsa::meta`); facts the base recorded and the
    // adapter does not are kept.
    let mut recorded = ModelMeta::of_checkpoint(checkpoint)?.to_metadata();
    let mut from_adapter = ModelMeta::of_adapter(adapter, &meta)?;
    if flavour.is_some() {
        from_adapter.decoder_flavour = flavour;
    }
    recorded.extend(from_adapter.to_metadata());
    let mut m: HashMap<String, String> = recorded.into_iter().collect();
    m.insert(
        "medsa_merged".to_string(),
        format!(
            "{} + {} ({} steps, {})",
            checkpoint.display(),
            adapter.display(),
            meta.step,
            meta.trainable
        ),
    );
    save_safetensors(out, &tensors, &m)?;
    eprintln!("merge: {} ({} tensors)", out.display(), tensors.len());
    Ok(())
}

fn print_vit(cfg: &SamConfig) {
    let (ih, iw) = cfg.img_size();
    println!(
        "encoder         {} (embed {}, depth {}, heads {}, head dim {}, mlp {})",
        cfg.variant(),
        cfg.embed_dim,
        cfg.depth(),
        cfg.heads,
        cfg.embed_dim / cfg.heads,
        cfg.mlp_dim
    );
    println!(
        "input           {ih}x{iw} px (native), patch {}, token grid {}x{}",
        cfg.patch, cfg.pos_grid.0, cfg.pos_grid.1
    );
    if let Some((gh, gw)) = cfg.pos_embed_grid {
        println!(
            "pos embed       stored at {gh}x{gw} tokens (as the public Med-SA code saves it), resized to the token grid at run time"
        );
    }
    println!(
        "attention       window {}, global blocks {:?}",
        cfg.window(),
        cfg.global_blocks()
    );
    let windows: Vec<String> = cfg
        .blocks
        .iter()
        .map(|b| match b.window {
            0 => "global".to_string(),
            w => w.to_string(),
        })
        .collect();
    println!("  per block     [{}]", windows.join(", "));
    let count = |f: fn(&medsa::sam::config::BlockConfig) -> bool| {
        cfg.blocks.iter().filter(|b| f(b)).count()
    };
    println!(
        "adapters        space {} / mlp {} / depth {} of {} blocks (bottleneck {})",
        count(|b| b.space_adapter),
        count(|b| b.mlp_adapter),
        count(|b| b.depth_adapter),
        cfg.depth(),
        cfg.adapter_dim
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into())
    );
}

fn print_tiny_vit(t: &medsa::sam::config::TinyVitConfig, cfg: &SamConfig) {
    let (ih, iw) = cfg.img_size();
    let kind = match t.patch_embed {
        medsa::sam::config::PatchEmbedKind::Pointwise => "two 1x1 stride-1 convs (LiteMedSAM)",
        medsa::sam::config::PatchEmbedKind::Strided3x3 => "two 3x3 stride-2 convs (MobileSAM)",
    };
    println!(
        "encoder         {} (TinyViT, {} stages, total stride {})",
        cfg.variant(),
        t.stages.len(),
        t.stride()
    );
    println!(
        "input           {ih}x{iw} px (native: the reference fixes a {}x{} output grid), patch embed {kind}",
        cfg.pos_grid.0, cfg.pos_grid.1
    );
    let list = |f: &dyn Fn(&medsa::sam::config::TinyStageConfig) -> String| {
        t.stages.iter().map(f).collect::<Vec<_>>().join(", ")
    };
    println!("  widths        [{}]", list(&|s| s.width.to_string()));
    println!(
        "  depths        [{}]",
        list(&|s| s.blocks.len().to_string())
    );
    println!(
        "  heads         [{}] (key dim = head dim; per-head bias tables)",
        list(&|s| if s.is_conv() {
            "MBConv".into()
        } else {
            s.heads.to_string()
        })
    );
    println!(
        "  windows       [{}]",
        list(&|s| if s.is_conv() {
            "-".into()
        } else {
            s.window.to_string()
        })
    );
    println!(
        "  hidden        [{}] (MBConv expansion / MLP width)",
        list(&|s| s.hidden.to_string())
    );
    println!(
        "  merge strides [{}]",
        list(&|s| s
            .merge_stride
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into()))
    );
    let blocks: Vec<&medsa::sam::config::TinyBlockConfig> =
        t.stages.iter().flat_map(|s| &s.blocks).collect();
    let attn_blocks: usize = t
        .stages
        .iter()
        .filter(|s| !s.is_conv())
        .map(|s| s.blocks.len())
        .sum();
    println!(
        "adapters        space {} / mlp {} / depth {} of {} attention blocks (bottleneck {})",
        blocks.iter().filter(|b| b.space_adapter).count(),
        blocks.iter().filter(|b| b.mlp_adapter).count(),
        blocks.iter().filter(|b| b.depth_adapter).count(),
        attn_blocks,
        cfg.adapter_dim
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into())
    );
}
