//! The `bench` subcommand: timing of the image encoder (`bench`) or of full training steps
//! (`bench --train`) on a random-weight model, printed as one JSON line, with the
//! `MEDSA_PROFILE=1` kernel table and peak-memory helpers they share.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use medsa::backend::Backend;
use medsa::sam::random::{random_checkpoint, Rng};
use medsa::sam::{MaskOutput, Prompts, Sam, SamConfig, Trace};
use medsa::weights::WeightStore;
use medsa::Tensor;

use crate::device::Dev;

#[allow(clippy::too_many_arguments)]
pub(super) fn bench<B: Backend>(
    be: &B,
    dev: &Dev,
    variant: &str,
    checkpoint: Option<&std::path::Path>,
    size: usize,
    batch: usize,
    repeats: usize,
    warmup: usize,
    adapters: bool,
) -> Result<()> {
    let (model, variant) = match checkpoint {
        Some(p) => {
            let m = Sam::load(be, p).with_context(|| format!("loading {}", p.display()))?;
            let v = m.config.variant().to_string();
            (m, v)
        }
        None => {
            let cfg = SamConfig::published(variant, adapters, false)
                .ok_or_else(|| anyhow!("--variant {variant}: expected vit_b, vit_l or vit_h"))?;
            let mut ws = WeightStore::from_tensors("random", random_checkpoint(&cfg, 0));
            let m = Sam::from_store(be, &mut ws).context("building the random model")?;
            (m, variant.to_string())
        }
    };
    let cfg = model.config.clone();
    if size == 0 || !size.is_multiple_of(cfg.patch) {
        bail!(
            "--size {size}: expected a positive multiple of {}",
            cfg.patch
        );
    }
    let mut rng = Rng::new(1);
    let x = be.upload(&rng.tensor(&[batch, 3, size, size], 2.0))?;
    for _ in 0..warmup {
        let _y = model.encode(be, &x, None, &mut Trace::off())?;
        be.synchronize()?;
    }
    dev.reset_peak();
    dev.take_profile();
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        // Embeddings stay on the device, as in the PyTorch baseline: time the work, not the copy.
        let _y = model.encode(be, &x, None, &mut Trace::off())?;
        be.synchronize()?;
        runs.push(t.elapsed().as_secs_f64());
    }
    print_profile(&dev.take_profile(), repeats, "run");
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let peak = dev
        .peak_bytes()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "null".into());
    let [q128, rel_mma, trim, exp2, prefetch] =
        dev.attention_options(cfg.embed_dim / cfg.heads, size / cfg.patch);
    let (gelu_tanh, ln_rows) = dev.kernel_options();
    println!(
        "{{\"impl\":\"medsa\",\"device\":\"{}\",\"variant\":\"{variant}\",\"adapters\":{adapters},\"fused\":{},\"gelu_tanh_epilogue\":{gelu_tanh},\"layernorm_rows\":{ln_rows},\"attn_q128\":{q128},\"attn_rel_mma\":{rel_mma},\"attn_trim\":{trim},\"attn_exp2\":{exp2},\"attn_prefetch\":{prefetch},\"size\":{size},\"batch\":{batch},\"peak_bytes\":{peak},\"median_s\":{median:.4},\"min_s\":{:.4},\"images_per_s\":{:.4},\"runs\":{:?}}}",
        be.name(),
        be.fused(),
        sorted[0],
        batch as f64 / median,
        runs.iter().map(|r| (r * 1e4).round() / 1e4).collect::<Vec<_>>()
    );
    Ok(())
}

/// Prints a `MEDSA_PROFILE=1` table (kernel, calls, seconds over `repeats` runs) per `unit`,
/// largest first; nothing when profiling is off.
fn print_profile(prof: &[(String, u64, f64)], repeats: usize, unit: &str) {
    if prof.is_empty() {
        return;
    }
    let total: f64 = prof
        .iter()
        .filter(|p| !p.0.starts_with("detail:"))
        .map(|p| p.2)
        .sum();
    let n = repeats.max(1) as f64;
    eprintln!("profile (MEDSA_PROFILE=1, synchronised per op), per {unit}:");
    for (name, calls, t) in prof.iter().take(40) {
        eprintln!(
            "  {:>8.3} ms {:>5.1}% {:>6} calls  {name}",
            t * 1e3 / n,
            100.0 * t / total,
            *calls as f64 / n
        );
    }
}

/// Peak resident set size of this process (VmHWM of /proc/self/status), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// `bench --train`: full training steps (forward, loss, backward, optimiser) of a random-weight
/// model with encoder and decoder adapters, `adapters+decoder` trained, as `train` runs them.
#[allow(clippy::too_many_arguments)]
pub(super) fn bench_train<B: Backend>(
    be: &B,
    dev: &Dev,
    variant: &str,
    size: usize,
    batch: usize,
    repeats: usize,
    warmup: usize,
    recompute: bool,
) -> Result<()> {
    use medsa::nn::{Grads, Param, Trainable};
    use medsa::train::checkpoint::{init_adapters, AdapterChoice};
    use medsa::train::optim::{AdamWConfig, Schedule};
    use medsa::train::step::{forward_backward, Batch, LossConfig, Optimizer};
    use std::sync::Arc;

    let mut cfg = SamConfig::published(variant, true, false)
        .ok_or_else(|| anyhow!("--variant {variant}: expected vit_b, vit_l or vit_h"))?;
    if size == 0 || !size.is_multiple_of(cfg.patch) || batch == 0 {
        bail!(
            "--size {size} --batch {batch}: expected a positive multiple of {} and a positive batch",
            cfg.patch
        );
    }
    // A model native to the benchmark size (position tables of that grid, as the PyTorch
    // reference builds it with img_size = size); at 1024 this is the published model.
    let window = cfg.blocks.iter().map(|b| b.window).max().unwrap_or(0);
    if size / cfg.patch < window {
        bail!(
            "--size {size}: --train needs a token grid of at least the window ({window}), i.e. \
             --size >= {}",
            window * cfg.patch
        );
    }
    cfg.pos_grid = (size / cfg.patch, size / cfg.patch);
    let mut tensors = random_checkpoint(&cfg, 0);
    init_adapters(
        &mut tensors,
        &cfg,
        AdapterChoice {
            encoder: false,
            depth: false,
            decoder: true,
        },
        0,
    )?;
    let mut ws = WeightStore::from_tensors("random", tensors);
    let mut model = Sam::from_store(be, &mut ws).context("building the random model")?;
    let trainable = Arc::new(Trainable::parse("adapters+decoder")?);
    let (mut n_tensors, mut n_params) = (0usize, 0usize);
    for (name, p) in model.params() {
        if trainable.contains(&name) {
            n_tensors += 1;
            n_params += match &p {
                Param::Dev(t) => be.dims(t).iter().product::<usize>(),
                Param::Host(t) => t.numel(),
            };
        }
    }

    // One random batch, reused every step: images, one positive click per image, 0/1 targets on
    // the low-resolution mask grid.
    let mut rng = Rng::new(1);
    let grid = 4 * (size / cfg.patch);
    let clicks: Vec<f32> = (0..2 * batch)
        .map(|_| (rng.uniform() * size as f32).floor() + 0.5)
        .collect();
    let target: Vec<f32> = (0..batch * grid * grid)
        .map(|_| if rng.uniform() < 0.5 { 1.0 } else { 0.0 })
        .collect();
    let data = Batch {
        images: rng.tensor(&[batch, 3, size, size], 2.0),
        prompts: Prompts {
            point_coords: Some(Tensor::from_vec(clicks, &[batch, 1, 2])?),
            point_labels: Some(Tensor::from_vec(vec![1.0; batch], &[batch, 1])?),
            ..Default::default()
        },
        target: Tensor::from_vec(target, &[batch, 1, grid, grid])?,
        depth: None,
    };
    let loss = LossConfig::default();
    let mut grads = Grads::new(trainable);
    let mut opt = Optimizer::new(AdamWConfig::default(), Schedule::Constant, None);
    eprintln!(
        "bench --train: {variant} {size}x{size}, batch {batch}, {n_tensors} trained tensors \
         ({n_params} parameters, adapters+decoder), recompute {recompute}, on {}",
        be.name()
    );

    // step = forward + loss + backward (timed as `fb`), then the optimiser (`opt`)
    let mut step = |model: &mut Sam<B>| -> Result<(f64, f64, f64)> {
        let t = Instant::now();
        let (parts, _) = forward_backward(
            be,
            model,
            &data,
            MaskOutput::Single,
            &loss,
            &mut grads,
            1.0,
            recompute,
        )?;
        be.synchronize()?;
        let fb = t.elapsed().as_secs_f64();
        opt.step(be, model, &mut grads)?;
        be.synchronize()?;
        Ok((fb, t.elapsed().as_secs_f64() - fb, parts.total))
    };
    for _ in 0..warmup {
        step(&mut model)?;
    }
    dev.reset_peak();
    dev.take_profile();
    let (mut runs, mut fbs, mut opts, mut losses) = (vec![], vec![], vec![], vec![]);
    for _ in 0..repeats.max(1) {
        let (fb, o, l) = step(&mut model)?;
        runs.push(fb + o);
        fbs.push(fb);
        opts.push(o);
        losses.push(l);
    }
    print_profile(&dev.take_profile(), repeats, "step");
    if let Some(l) = losses.iter().find(|l| !l.is_finite()) {
        bail!("bench --train: non-finite loss {l}");
    }
    let med = median(&runs);
    let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let rss = peak_rss_bytes();
    // the device's peak: the CUDA pool's, else (CPU) the process's peak RSS
    let (peak, peak_kind) = match dev.peak_bytes() {
        Some(p) => (Some(p as u64), "cuda_pool"),
        None => (rss, "rss"),
    };
    let opt_json = |v: Option<u64>| v.map_or_else(|| "null".to_string(), |x| x.to_string());
    eprintln!(
        "step median {:.1} ms (forward+loss+backward {:.1} ms, optimiser {:.1} ms), {:.3} images/s, \
         peak {} MiB ({peak_kind}), loss {:.4} -> {:.4}",
        med * 1e3,
        median(&fbs) * 1e3,
        median(&opts) * 1e3,
        batch as f64 / med,
        peak.map_or_else(|| "?".into(), |p| format!("{:.0}", p as f64 / 1048576.0)),
        losses[0],
        losses[losses.len() - 1]
    );
    let r4 = |v: &[f64]| {
        v.iter()
            .map(|r| (r * 1e4).round() / 1e4)
            .collect::<Vec<_>>()
    };
    println!(
        "{{\"impl\":\"medsa\",\"mode\":\"train\",\"device\":\"{}\",\"variant\":\"{variant}\",\"size\":{size},\"batch\":{batch},\"trainable\":\"adapters+decoder\",\"trained_params\":{n_params},\"recompute\":{recompute},\"warmup\":{warmup},\"median_s\":{med:.4},\"min_s\":{min:.4},\"median_ms\":{:.2},\"images_per_s\":{:.4},\"fb_median_s\":{:.4},\"opt_median_s\":{:.4},\"peak_bytes\":{},\"peak_kind\":\"{peak_kind}\",\"peak_rss_bytes\":{},\"loss_first\":{:.6},\"loss_last\":{:.6},\"runs\":{:?}}}",
        be.name(),
        med * 1e3,
        batch as f64 / med,
        median(&fbs),
        median(&opts),
        opt_json(peak),
        opt_json(rss),
        losses[0],
        losses[losses.len() - 1],
        r4(&runs)
    );
    Ok(())
}
