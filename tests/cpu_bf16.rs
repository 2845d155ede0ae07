//! The CPU's bf16 mode (`--precision bf16` on the CPU): every op and the whole model on the
//! golden fixtures against the f32 reference, with the tolerances the CUDA bf16 path is held
//! to; the kernels against each other bit for bit (the dispatch runs on every machine: the
//! portable kernel everywhere, AVX512-BF16 where the CPU has it, saying so where it has not);
//! and the command line's handling of the mode.

mod common;

use medsa::backend::cpu::{Bf16Kernel, Cpu};
use medsa::backend::{Act, Backend, Precision, RelPos};
use medsa::sam::random::Rng;
use medsa::sam::{Sam, Trace};
use medsa::selftest::{self, Tolerance};

fn bf16() -> Cpu {
    Cpu::new().with_precision(Precision::Bf16)
}

#[test]
fn cpu_bf16_matches_the_f32_reference_like_cuda_bf16() {
    let be = bf16();
    println!("{}", be.name());
    let mut checks = selftest::ops(&be, Tolerance::BF16);
    checks.extend(selftest::model(
        &be,
        &common::fixtures_dir(),
        Tolerance::BF16_MODEL,
    ));
    let failed = selftest::report(&checks);
    assert_eq!(failed, 0, "{failed} CPU bf16 checks failed (table above)");
    // Not silently f32: the products do round (the whole-model outputs differ from f32).
    let f32_cpu = Cpu::new();
    let x = Rng::new(5).tensor(&[64, 256], 1.0);
    let w = Rng::new(6).tensor(&[128, 256], 0.1);
    let a = be.linear(&x, &w, None, Act::None).unwrap();
    let b = f32_cpu.linear(&x, &w, None, Act::None).unwrap();
    assert_ne!(a.data(), b.data(), "bf16 products gave the f32 result");
}

#[test]
fn dispatch_picks_the_cpus_kernel_and_refuses_one_it_lacks() {
    let be = bf16();
    assert_eq!(be.precision(), Precision::Bf16);
    assert_eq!(be.bf16_kernel(), Some(Bf16Kernel::detect()));
    assert_eq!(Cpu::new().bf16_kernel(), None);
    assert!(Cpu::new().with_bf16_kernel(Bf16Kernel::Portable).is_ok());
    let avx = Cpu::new().with_bf16_kernel(Bf16Kernel::Avx512Bf16);
    if Bf16Kernel::Avx512Bf16.available() {
        assert!(avx.is_ok());
    } else {
        let e = avx.unwrap_err().to_string();
        assert!(e.contains("does not run on this CPU"), "{e}");
    }
}

/// Every product-taking op and two whole encoders (ViT with rel-pos and the depth branch,
/// TinyViT with its bias tables and convolutions) on the portable kernel and on AVX512-BF16:
/// the same bits.
#[test]
fn portable_and_avx512_kernels_give_the_same_bits() {
    if !Bf16Kernel::Avx512Bf16.available() {
        println!("skip: this CPU has no AVX512-BF16, so only the portable kernel runs here");
        return;
    }
    let portable = Cpu::new().with_bf16_kernel(Bf16Kernel::Portable).unwrap();
    let avx = Cpu::new().with_bf16_kernel(Bf16Kernel::Avx512Bf16).unwrap();
    let mut rng = Rng::new(17);
    let x = rng.tensor(&[77, 300], 1.0);
    let w = rng.tensor(&[45, 300], 0.1);
    let bias = rng.tensor(&[45], 0.1);
    let same = |name: &str, a: medsa::tensor::Tensor, b: medsa::tensor::Tensor| {
        assert_eq!(a.shape(), b.shape(), "{name}");
        let bits =
            |t: &medsa::tensor::Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(&a) == bits(&b), "{name}: the kernels differ");
    };
    let run = |be: &Cpu| be.linear(&x, &w, Some(&bias), Act::Gelu).unwrap();
    same("linear", run(&portable), run(&avx));
    let (q, k, v) = (
        rng.tensor(&[2, 49, 96], 1.0),
        rng.tensor(&[2, 49, 96], 1.0),
        rng.tensor(&[2, 49, 96], 1.0),
    );
    let (rh, rw) = (rng.tensor(&[7, 7, 32], 0.1), rng.tensor(&[7, 7, 32], 0.1));
    let run = |be: &Cpu| {
        be.attention(&q, &k, &v, 3, 0.17, Some(RelPos::within(&rh, &rw, (7, 7))))
            .unwrap()
    };
    same("attention", run(&portable), run(&avx));
    let img = rng.tensor(&[1, 9, 11, 5], 1.0);
    let cw = rng.tensor(&[6, 5, 3, 3], 0.2);
    let run = |be: &Cpu| be.conv2d(&img, &cw, None, 2, 1).unwrap();
    same("conv2d", run(&portable), run(&avx));
    for case in ["volume", "tinyvit_lite"] {
        let path = common::fixture(case, "weights");
        let f = common::open(case, if case == "volume" { "per_token" } else { "box" });
        let images = f.tensor("images").unwrap();
        let run = |be: &Cpu| {
            let model = Sam::load(be, &path).unwrap();
            let depth = f
                .metadata()
                .get("depth")
                .and_then(|d| d.parse::<usize>().ok())
                .filter(|&d| d > 0)
                .map(|d| medsa::sam::DepthSpec {
                    d,
                    mode: medsa::medsa::depth_branch::DepthMode::PerToken,
                });
            model.encode(be, &images, depth, &mut Trace::off()).unwrap()
        };
        same(case, run(&portable), run(&avx));
    }
}

#[test]
fn training_in_bf16_on_the_cpu_is_refused() {
    let bin = env!("CARGO_BIN_EXE_medsa-engine");
    let dir = std::env::temp_dir().join(format!("medsa-cpu-bf16-{}", std::process::id()));
    let out = std::process::Command::new(bin)
        .args(["train", "--data", "nowhere", "-o"])
        .arg(&dir)
        .args(["--checkpoint", "nothing.safetensors", "--precision", "bf16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--precision bf16 on the CPU is for inference"),
        "{err}"
    );
    assert!(!dir.exists(), "nothing is written for a refused run");
    let out = std::process::Command::new(bin)
        .args(["bench", "--train", "--precision", "bf16", "--size", "64"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("for inference"));
}
