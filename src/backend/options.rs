//! How a backend runs the model: one typed value ([`RunOptions`]) that the command line builds
//! once and every backend takes at creation, with the same defaults everywhere. No code path is
//! chosen by an environment variable; the few variables left are developer diagnostics
//! (`MEDSA_PROFILE`, the kernel emulator's), listed in the README.

use crate::error::{Error, Result};

/// Storage and product precision: on CUDA the element type of device storage; on the CPU the
/// operands of the products (storage stays f32 there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 storage and f32 products (no TF32 on CUDA): the reference.
    F32,
    /// bf16 operands, f32 accumulation: the fast mode (on CUDA bf16 storage as well).
    Bf16,
}

impl Precision {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    /// Kernel name suffix (CUDA).
    pub fn suffix(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::Input(format!(
                "precision \"{s}\": expected f32 or bf16"
            ))),
        }
    }
}

/// The opt-in options of the CUDA tensor-core attention kernels (bf16, head dim 64 or 80), each
/// off by default until a device run has verified and measured it (docs/PERF.md). The CPU
/// ignores them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttentionOptions {
    /// The 128-query kernel variant (head dim 64 only, and only where the card gives it the
    /// shared memory it needs: ~101 KB with the rel-pos terms of a 64x64 grid, so sm_86/sm_89
    /// keep the 64-query kernel).
    pub q128: bool,
    /// The rel-pos terms of shift-invariant tables on tensor cores instead of per-row dot
    /// products.
    pub rel_mma: bool,
    /// No mma work for query and key groups wholly past the sequence ends (outputs
    /// bit-identical either way).
    pub trim: bool,
    /// The softmax in log2 units: log2(e) folded into the score scale and the rel-pos terms,
    /// each probability one `ex2` of score minus offset, and on the global blocks' whole-tile
    /// path the row's height term folded into that offset (two instructions less per score).
    /// Separate kernel entries (`attention_exp2`, `attention_q128_exp2`).
    pub exp2: bool,
    /// Second K and V buffers: each K and V tile is fetched during the whole previous key tile,
    /// and each key tile takes one block barrier instead of two. The second K buffer (and in the
    /// 128-query kernel the second V buffer) is the Q tile's shared memory, dead once Q is in
    /// registers; the 64-query kernel needs 2 x 64 x (d + 8) bytes more for its second V
    /// buffer. Outputs bit-identical either way.
    pub prefetch: bool,
}

/// The names [`AttentionOptions::parse`] reads, in field order.
pub const ATTENTION_OPTION_NAMES: [&str; 5] = ["q128", "rel-mma", "trim", "exp2", "prefetch"];

impl AttentionOptions {
    /// Parses a comma-separated list of [`ATTENTION_OPTION_NAMES`] (`all`: every one, `none` or
    /// empty: none).
    pub fn parse(s: &str) -> Result<Self> {
        let mut o = AttentionOptions::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "q128" => o.q128 = true,
                "rel-mma" => o.rel_mma = true,
                "trim" => o.trim = true,
                "exp2" => o.exp2 = true,
                "prefetch" => o.prefetch = true,
                "none" => {}
                "all" => {
                    o = AttentionOptions {
                        q128: true,
                        rel_mma: true,
                        trim: true,
                        exp2: true,
                        prefetch: true,
                    }
                }
                other => {
                    return Err(Error::Input(format!(
                        "attention option \"{other}\": expected a comma-separated list of {}, all or none",
                        ATTENTION_OPTION_NAMES.join(", ")
                    )))
                }
            }
        }
        Ok(o)
    }

    /// The options that are on, as [`AttentionOptions::parse`] reads them back (`none`).
    pub fn names(&self) -> String {
        let on = [self.q128, self.rel_mma, self.trim, self.exp2, self.prefetch];
        let v: Vec<&str> = ATTENTION_OPTION_NAMES
            .iter()
            .zip(on)
            .filter(|(_, b)| *b)
            .map(|(n, _)| *n)
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(",")
        }
    }
}

/// Everything that selects how the model is computed, besides the device and precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// The encoder's fused inference path (`sam::encoder_fused`: one op where the plain
    /// sequence takes several passes over memory; the same math). On by default.
    pub fused: bool,
    /// GELU linears with cuBLASLt's GELU epilogue, which is GELU's tanh form (at most 4.8e-4
    /// from the exact erf form SAM uses), in bf16 on CUDA, at inference only: training forwards
    /// always compute the exact GELU they differentiate. Off by default.
    pub gelu_tanh_epilogue: bool,
    /// The warp-per-row LayerNorm kernel with 16-byte loads on CUDA (where the width allows).
    /// Off by default until a device run has measured it.
    pub layernorm_rows: bool,
    /// The CUDA attention kernel options.
    pub attention: AttentionOptions,
    /// Cap of the CPU's pool of freed large buffers, in MiB (0: no pool).
    pub host_pool_mb: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            fused: true,
            gelu_tanh_epilogue: false,
            layernorm_rows: false,
            attention: AttentionOptions::default(),
            host_pool_mb: crate::host_pool::DEFAULT_CAP_MB,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_option_lists_read_back() {
        for s in ["none", "q128", "rel-mma,trim", "exp2,prefetch", "all"] {
            let o = AttentionOptions::parse(s).unwrap();
            assert_eq!(AttentionOptions::parse(&o.names()).unwrap(), o, "{s}");
        }
        assert_eq!(
            AttentionOptions::parse("all").unwrap().names(),
            "q128,rel-mma,trim,exp2,prefetch"
        );
        let e = AttentionOptions::parse("q128,fast")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"fast\"") && e.contains("rel-mma"), "{e}");
    }
}
