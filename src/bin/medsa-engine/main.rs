//! `medsa-engine`: run SAM / Med-SA checkpoints from the command line.
//!
//! This file parses the command line and dispatches each subcommand to the module that holds it.

mod bench;
mod checkpoints;
mod checks;
mod cli;
mod device;
mod forward;
mod segment;
mod train;

use anyhow::Result;
use clap::Parser;

use crate::bench::{bench, bench_train};
use crate::checkpoints::{convert, info, init_cmd, merge_cmd};
use crate::checks::{eval, selftest};
use crate::cli::{flavour_of, Cli, Cmd};
use crate::device::{on_device, open_device, ModelSource};
use crate::forward::forward;
use crate::segment::segment_cmd;
use crate::train::train_cmd;

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut limits = medsa::limits::Limits::from_env()?;
    if let Some(n) = cli.max_voxels {
        limits.max_voxels = n;
    }
    if let Some(n) = cli.max_pixels {
        limits.max_pixels = n;
    }
    medsa::limits::set_default(limits);
    match cli.cmd {
        Cmd::Info {
            checkpoint,
            decoder_flavour,
        } => info(&checkpoint, decoder_flavour.map(flavour_of)),
        Cmd::Convert {
            input,
            output,
            dtype,
        } => convert(&input, &output, dtype),
        Cmd::Forward {
            checkpoint,
            adapter,
            allow_base_mismatch,
            inputs,
            out,
            multimask,
            classes,
            depth,
            depth_mode,
            input_size,
            original_size,
            decoder_flavour,
            device,
            precision,
            run,
        } => {
            let dev = open_device(&device, &precision, &run.options()?)?;
            let src = ModelSource {
                checkpoint,
                adapter,
                allow_base_mismatch,
                decoder_flavour: decoder_flavour.map(flavour_of),
            };
            on_device!(&dev, be => forward(
                be,
                &src,
                &inputs,
                &out,
                multimask,
                classes,
                depth,
                depth_mode,
                input_size,
                original_size,
            ))
        }
        Cmd::Segment(a) => {
            let dev = open_device(&a.device, &a.precision, &a.run.options()?)?;
            on_device!(&dev, be => segment_cmd(be, &a))
        }
        Cmd::Eval {
            pred,
            gt,
            spacing,
            out,
        } => eval(&pred, &gt, &spacing, out.as_deref()),
        Cmd::Selftest {
            device,
            precision,
            fixtures,
        } => selftest(&device, &precision, &fixtures),
        Cmd::Train(a) => {
            refuse_cpu_bf16_training(&a.device, &a.precision)?;
            let dev = open_device(&a.device, &a.precision, &a.run.options()?)?;
            on_device!(&dev, be => train_cmd(be, &a))
        }
        Cmd::Init(a) => init_cmd(&a),
        Cmd::Merge {
            checkpoint,
            adapter,
            out,
            allow_base_mismatch,
            decoder_flavour,
        } => merge_cmd(
            &checkpoint,
            &adapter,
            &out,
            allow_base_mismatch,
            decoder_flavour.map(flavour_of),
        ),
        Cmd::Bench {
            variant,
            checkpoint,
            size,
            batch,
            repeats,
            warmup,
            adapters,
            device,
            precision,
            train,
            recompute,
            run,
        } => {
            if train {
                refuse_cpu_bf16_training(&device, &precision)?;
            }
            let dev = open_device(&device, &precision, &run.options()?)?;
            if train {
                on_device!(&dev, be => bench_train(be, &dev, &variant, size, batch, repeats, warmup, recompute))
            } else {
                on_device!(&dev, be => bench(be, &dev, &variant, checkpoint.as_deref(), size, batch, repeats, warmup, adapters))
            }
        }
    }
}

/// bf16 on the CPU rounds the forward products only; its backward products are f32, a mix no
/// test has validated for training, so training asks for f32 there.
fn refuse_cpu_bf16_training(device: &str, precision: &str) -> Result<()> {
    if device == "cpu" && precision == "bf16" {
        anyhow::bail!(
            "--precision bf16 on the CPU is for inference (segment, forward, bench, selftest); train on the CPU with --precision f32"
        );
    }
    Ok(())
}
