//! Random-weight models of any configuration, for benchmarks and tests that must not depend on
//! downloaded checkpoints. Values follow PyTorch's default scales (uniform in +-1/sqrt(fan_in)),
//! LayerNorm weights near 1, small non-zero position tables, so activations stay of order one.

use std::collections::BTreeMap;

use crate::sam::config::{BlockConfig, DecoderFlavour, DecoderLayerConfig, SamConfig};
use crate::tensor::Tensor;

/// A small deterministic generator (xorshift64*), enough for weights and test inputs.
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator (any seed, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-a, a).
    pub fn sym(&mut self, a: f32) -> f32 {
        (2.0 * self.uniform() - 1.0) * a
    }

    /// A tensor with entries uniform in [-a, a).
    pub fn tensor(&mut self, shape: &[usize], a: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| self.sym(a)).collect();
        Tensor::from_vec(v, shape).expect("sizes agree by construction")
    }
}

impl SamConfig {
    /// A published SAM encoder (`vit_b`, `vit_l`, `vit_h`) with SAM's prompt encoder and decoder,
    /// optionally with Med-SA encoder adapters (`adapters`) and depth adapters (`depth`).
    pub fn published(variant: &str, adapters: bool, depth: bool) -> Option<Self> {
        let (d, n, heads, global): (usize, usize, usize, &[usize]) = match variant {
            "vit_b" => (768, 12, 12, &[2, 5, 8, 11]),
            "vit_l" => (1024, 24, 16, &[5, 11, 17, 23]),
            "vit_h" => (1280, 32, 16, &[7, 15, 23, 31]),
            _ => return None,
        };
        let blocks = (0..n)
            .map(|i| BlockConfig {
                window: if global.contains(&i) { 0 } else { 14 },
                space_adapter: adapters,
                mlp_adapter: adapters,
                depth_adapter: adapters && depth,
                medsa_rel_names: false,
            })
            .collect();
        Some(SamConfig {
            patch: 16,
            embed_dim: d,
            heads,
            mlp_dim: 4 * d,
            pos_grid: (64, 64),
            pos_embed_grid: None,
            blocks,
            out_chans: 256,
            adapter_dim: adapters.then_some(d / 4),
            prompt_dim: 256,
            mask_in_chans: 16,
            decoder_mlp_dim: 2048,
            decoder_heads: 8,
            attention_downsample: 2,
            decoder_layers: vec![DecoderLayerConfig::default(); 2],
            num_mask_tokens: 4,
            iou_head: (256, 3),
            decoder_flavour: Default::default(),
            tiny_vit: None,
        })
    }
}

/// Random weights for every tensor `cfg` needs, under official SAM key names.
pub fn random_checkpoint(cfg: &SamConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut m = BTreeMap::new();
    let lin = |m: &mut BTreeMap<String, Tensor>,
               rng: &mut Rng,
               p: &str,
               i: usize,
               o: usize,
               bias: bool| {
        let a = 1.0 / (i as f32).sqrt();
        m.insert(format!("{p}.weight"), rng.tensor(&[o, i], a));
        if bias {
            m.insert(format!("{p}.bias"), rng.tensor(&[o], a));
        }
    };
    let ln = |m: &mut BTreeMap<String, Tensor>, rng: &mut Rng, p: &str, c: usize| {
        let w: Vec<f32> = (0..c).map(|_| 1.0 + rng.sym(0.1)).collect();
        m.insert(format!("{p}.weight"), Tensor::from_vec(w, &[c]).unwrap());
        m.insert(format!("{p}.bias"), rng.tensor(&[c], 0.1));
    };
    let conv = |m: &mut BTreeMap<String, Tensor>,
                rng: &mut Rng,
                p: &str,
                i: usize,
                o: usize,
                k: usize,
                bias: bool| {
        let a = 1.0 / ((i * k * k) as f32).sqrt();
        m.insert(format!("{p}.weight"), rng.tensor(&[o, i, k, k], a));
        if bias {
            m.insert(format!("{p}.bias"), rng.tensor(&[o], a));
        }
    };
    let d = cfg.embed_dim;
    let hd = d / cfg.heads;
    conv(
        &mut m,
        &mut rng,
        "image_encoder.patch_embed.proj",
        3,
        d,
        cfg.patch,
        true,
    );
    m.insert("image_encoder.pos_embed".into(), {
        let g = cfg.pos_embed_grid();
        rng.tensor(&[1, g.0, g.1, d], 0.1)
    });
    for (i, b) in cfg.blocks.iter().enumerate() {
        let p = format!("image_encoder.blocks.{i}");
        ln(&mut m, &mut rng, &format!("{p}.norm1"), d);
        ln(&mut m, &mut rng, &format!("{p}.norm2"), d);
        lin(&mut m, &mut rng, &format!("{p}.attn.qkv"), d, 3 * d, true);
        lin(&mut m, &mut rng, &format!("{p}.attn.proj"), d, d, true);
        let (sh, sw) = if b.window == 0 {
            cfg.pos_grid
        } else {
            (b.window, b.window)
        };
        let (nh, nw) = if b.medsa_rel_names {
            ("rel_h", "rel_w")
        } else {
            ("rel_pos_h", "rel_pos_w")
        };
        m.insert(
            format!("{p}.attn.{nh}"),
            rng.tensor(&[2 * sh - 1, hd], 0.05),
        );
        m.insert(
            format!("{p}.attn.{nw}"),
            rng.tensor(&[2 * sw - 1, hd], 0.05),
        );
        lin(
            &mut m,
            &mut rng,
            &format!("{p}.mlp.lin1"),
            d,
            cfg.mlp_dim,
            true,
        );
        lin(
            &mut m,
            &mut rng,
            &format!("{p}.mlp.lin2"),
            cfg.mlp_dim,
            d,
            true,
        );
        let r = cfg.adapter_dim.unwrap_or(d / 4);
        for (on, name) in [
            (b.space_adapter, "Space_Adapter"),
            (b.mlp_adapter, "MLP_Adapter"),
            (b.depth_adapter, "Depth_Adapter"),
        ] {
            if on {
                lin(&mut m, &mut rng, &format!("{p}.{name}.D_fc1"), d, r, true);
                lin(&mut m, &mut rng, &format!("{p}.{name}.D_fc2"), r, d, true);
            }
        }
    }
    let c = cfg.out_chans;
    conv(&mut m, &mut rng, "image_encoder.neck.0", d, c, 1, false);
    ln(&mut m, &mut rng, "image_encoder.neck.1", c);
    conv(&mut m, &mut rng, "image_encoder.neck.2", c, c, 3, false);
    ln(&mut m, &mut rng, "image_encoder.neck.3", c);

    let pd = cfg.prompt_dim;
    m.insert(
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix".into(),
        rng.tensor(&[2, pd / 2], 1.7),
    );
    for i in 0..4 {
        m.insert(
            format!("prompt_encoder.point_embeddings.{i}.weight"),
            rng.tensor(&[1, pd], 1.0),
        );
    }
    m.insert(
        "prompt_encoder.not_a_point_embed.weight".into(),
        rng.tensor(&[1, pd], 1.0),
    );
    m.insert(
        "prompt_encoder.no_mask_embed.weight".into(),
        rng.tensor(&[1, pd], 1.0),
    );
    let mc = cfg.mask_in_chans;
    conv(
        &mut m,
        &mut rng,
        "prompt_encoder.mask_downscaling.0",
        1,
        mc / 4,
        2,
        true,
    );
    ln(
        &mut m,
        &mut rng,
        "prompt_encoder.mask_downscaling.1",
        mc / 4,
    );
    conv(
        &mut m,
        &mut rng,
        "prompt_encoder.mask_downscaling.3",
        mc / 4,
        mc,
        2,
        true,
    );
    ln(&mut m, &mut rng, "prompt_encoder.mask_downscaling.4", mc);
    conv(
        &mut m,
        &mut rng,
        "prompt_encoder.mask_downscaling.6",
        mc,
        pd,
        1,
        true,
    );

    let t = cfg.num_mask_tokens;
    let internal = pd / cfg.attention_downsample;
    m.insert(
        "mask_decoder.iou_token.weight".into(),
        rng.tensor(&[1, pd], 1.0),
    );
    m.insert(
        "mask_decoder.mask_tokens.weight".into(),
        rng.tensor(&[t, pd], 1.0),
    );
    let attn = |m: &mut BTreeMap<String, Tensor>, rng: &mut Rng, p: &str, inner: usize| {
        for n in ["q_proj", "k_proj", "v_proj"] {
            lin(m, rng, &format!("{p}.{n}"), pd, inner, true);
        }
        lin(m, rng, &format!("{p}.out_proj"), inner, pd, true);
    };
    for (i, l) in cfg.decoder_layers.iter().enumerate() {
        let p = format!("mask_decoder.transformer.layers.{i}");
        attn(&mut m, &mut rng, &format!("{p}.self_attn"), pd);
        attn(
            &mut m,
            &mut rng,
            &format!("{p}.cross_attn_token_to_image"),
            internal,
        );
        attn(
            &mut m,
            &mut rng,
            &format!("{p}.cross_attn_image_to_token"),
            internal,
        );
        for n in 1..=4 {
            ln(&mut m, &mut rng, &format!("{p}.norm{n}"), pd);
        }
        // The reference flavour is stored under the reference code's names, as it saves them.
        let (lin1, lin2) = match cfg.decoder_flavour {
            DecoderFlavour::Sam => ("mlp.lin1", "mlp.lin2"),
            DecoderFlavour::Medsa => ("mlp.layers.0.0", "mlp.fc"),
        };
        lin(
            &mut m,
            &mut rng,
            &format!("{p}.{lin1}"),
            pd,
            cfg.decoder_mlp_dim,
            true,
        );
        lin(
            &mut m,
            &mut rng,
            &format!("{p}.{lin2}"),
            cfg.decoder_mlp_dim,
            pd,
            true,
        );
        let r = pd / 4;
        if l.hyper {
            let q = format!("{p}.Hyper_Adapter");
            lin(&mut m, &mut rng, &format!("{q}.D_fc1"), pd, r, true);
            lin(&mut m, &mut rng, &format!("{q}.D_fc2"), r, pd, true);
            lin(&mut m, &mut rng, &format!("{q}.hyper.0"), pd, pd, true);
            lin(&mut m, &mut rng, &format!("{q}.hyper.2"), pd, r * r, true);
            ln(&mut m, &mut rng, &format!("{q}.norm"), r);
        }
        for (on, name) in [(l.mlp, "MLP_Adapter"), (l.cross, "Cross_Adapter")] {
            if on {
                lin(&mut m, &mut rng, &format!("{p}.{name}.D_fc1"), pd, r, true);
                lin(&mut m, &mut rng, &format!("{p}.{name}.D_fc2"), r, pd, true);
            }
        }
    }
    attn(
        &mut m,
        &mut rng,
        "mask_decoder.transformer.final_attn_token_to_image",
        internal,
    );
    ln(
        &mut m,
        &mut rng,
        "mask_decoder.transformer.norm_final_attn",
        pd,
    );
    let w = |rng: &mut Rng, i: usize, o: usize| {
        rng.tensor(&[i, o, 2, 2], 1.0 / ((i * 4) as f32).sqrt())
    };
    m.insert(
        "mask_decoder.output_upscaling.0.weight".into(),
        w(&mut rng, pd, pd / 4),
    );
    m.insert(
        "mask_decoder.output_upscaling.0.bias".into(),
        rng.tensor(&[pd / 4], 0.1),
    );
    ln(&mut m, &mut rng, "mask_decoder.output_upscaling.1", pd / 4);
    m.insert(
        "mask_decoder.output_upscaling.3.weight".into(),
        w(&mut rng, pd / 4, pd / 8),
    );
    m.insert(
        "mask_decoder.output_upscaling.3.bias".into(),
        rng.tensor(&[pd / 8], 0.1),
    );
    for i in 0..t {
        let p = format!("mask_decoder.output_hypernetworks_mlps.{i}");
        lin(&mut m, &mut rng, &format!("{p}.layers.0"), pd, pd, true);
        lin(&mut m, &mut rng, &format!("{p}.layers.1"), pd, pd, true);
        lin(&mut m, &mut rng, &format!("{p}.layers.2"), pd, pd / 8, true);
    }
    let (ih, idepth) = cfg.iou_head;
    let mut dims = vec![pd];
    dims.extend(std::iter::repeat_n(ih, idepth.saturating_sub(1)));
    dims.push(t);
    for (j, w2) in dims.windows(2).enumerate() {
        lin(
            &mut m,
            &mut rng,
            &format!("mask_decoder.iou_prediction_head.layers.{j}"),
            w2[0],
            w2[1],
            true,
        );
    }
    m
}
