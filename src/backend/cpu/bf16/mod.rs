//! bf16 products with f32 accumulation: the CPU's `--precision bf16`.
//!
//! Every product the forward ops take through [`super::linalg::product`] (linears, batched
//! matmuls, convolutions as im2col products, and the two products inside each attention block)
//! rounds both operands to bf16 (round to nearest even) while packing them, multiplies pairs of
//! bf16 values and accumulates in f32. Everything else (softmax, LayerNorm statistics, GELU, the
//! relative-position terms, the residual stream) stays f32.
//!
//! The arithmetic is that of AVX512-BF16's `vdpbf16ps`, which both kernels implement: for each
//! output `acc += a[2p+1] * b[2p+1]; acc += a[2p] * b[2p]` over the pairs `p` of the reduction,
//! the odd element first, each step one rounding to f32 of the exact product added to `acc`
//! (the product of two bf16 values has 16 significant bits, so it is exact in f32 unless its
//! exponent leaves f32's range: the instruction keeps it exact even then, so two products of
//! 1e40 and -1e40 cancel after the first step overflowed to infinity instead of giving NaN).
//! bf16 subnormal inputs read as zero and subnormal results are flushed to zero; packing already
//! flushes bf16 subnormals, so the kernels only flush results. Measured on AMD Zen 4: the
//! instruction agrees with this definition bit for bit on 3.2 M random pair-steps, and the
//! tests hold both kernels to [`reference`] bit for bit, overflowing products included.
//!
//! Kernels, chosen once per backend ([`Bf16Kernel::detect`]):
//! * `Avx512Bf16`: a 12 x 32 register tile of `vdpbf16ps` (24 accumulators, two B vectors and a
//!   broadcast A pair per step);
//! * `Portable`: the same packed loop in plain Rust, for every other CPU (slower than the f32
//!   path there; it exists so that bf16 results are the same on every machine).
//!
//! AMX (`tdpbf16ps`) is detected and reported but has no kernel yet: no machine we can test on
//! has it, so an AMX CPU runs the AVX512-BF16 kernel.

mod avx512;
mod portable;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};

use gemm::Parallelism;
use rayon::prelude::*;

use super::linalg::Mat;

/// Rows of the register tile.
pub(crate) const MR: usize = 12;
/// Columns of the register tile (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Rows per parallel task (whole register tiles): the task's packed A block, `MC x K` bf16, and
/// one packed B panel, `K x NR`, stay in a 1 MiB L2 up to K = 3072.
const MC: usize = 4 * MR;
/// Column panels per parallel task.
const NC_PANELS: usize = 8;
/// Rows per task of a tall product, which runs them against every panel: a 96 x 3072 bf16 A
/// block is 576 KiB, inside a 1 MiB L2.
const MC_TALL: usize = 8 * MR;

/// The bf16 product kernel a CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX512-BF16 `vdpbf16ps` (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and
    /// later).
    Avx512Bf16,
    /// Plain Rust, any CPU.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16") {
            return Bf16Kernel::Avx512Bf16;
        }
        Bf16Kernel::Portable
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Bf16Kernel::Portable => true,
            Bf16Kernel::Avx512Bf16 => Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16,
        }
    }

    /// A one-line description for `info` and `selftest`, naming the CPU features seen.
    pub fn describe(self) -> String {
        let amx = cpu_has_amx_bf16();
        let name = match self {
            Bf16Kernel::Avx512Bf16 => "AVX512-BF16 (vdpbf16ps)",
            Bf16Kernel::Portable => "portable (no AVX512-BF16 on this CPU)",
        };
        if amx {
            format!("{name}; AMX-BF16 present but not used (no AMX kernel yet)")
        } else {
            name.to_string()
        }
    }
}

/// Whether the CPU reports AMX-BF16 (CPUID leaf 7, EDX bit 22).
fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 is checked against the maximum leaf first.
        use std::arch::x86_64::__cpuid_count;
        if __cpuid_count(0, 0).eax >= 7 {
            return __cpuid_count(7, 0).edx & (1 << 22) != 0;
        }
    }
    false
}

/// How a CPU backend takes its products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prec {
    /// f32 operands (the `gemm` crate).
    F32,
    /// bf16 operands, f32 accumulation, with this kernel.
    Bf16(Bf16Kernel),
}

/// `x` rounded to bf16 (nearest, ties to even; NaN stays NaN, quieted), with subnormal results
/// flushed to a signed zero as `vdpbf16ps` reads them.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let h = if (b & 0x7fff_ffff) > 0x7f80_0000 {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded
    };
    if h & 0x7f80 == 0 {
        h & 0x8000
    } else {
        h
    }
}

/// The f32 value of a bf16 bit pattern.
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` with a subnormal value flushed to a signed zero.
#[inline(always)]
pub(crate) fn ftz(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// One step of the definition: `acc + a * b` rounded once to f32, then flushed. In f64 the
/// product of two bf16 values is exact whatever its exponent, and the sum rounded to f64 then
/// to f32 is the correctly rounded f32 sum (53 >= 2 x 24 + 2 bits).
#[inline(always)]
pub(crate) fn step(acc: f32, a: f32, b: f32) -> f32 {
    ftz((acc as f64 + a as f64 * b as f64) as f32)
}

/// The element `(i, j)` of a strided operand.
///
/// # Safety
/// `(i, j)` must lie inside the operand's extent.
#[inline(always)]
unsafe fn at(m: Mat, i: usize, j: usize) -> f32 {
    *m.ptr.offset(i as isize * m.rs + j as isize * m.cs)
}

/// One reduction pair packed as `vdpbf16ps` reads it: element `2p` in the low half.
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    to_bf16(even) as u32 | (to_bf16(odd) as u32) << 16
}

/// Row `r` of `lhs`, `k` values, as `k.div_ceil(2)` pairs into `out` (an odd `k`'s last pair
/// padded with zero). Contiguous rows go through the kernel's vector conversion.
///
/// # Safety
/// `lhs` must cover row `r`, columns `0..k`; `out.len() == k.div_ceil(2)`.
#[inline]
unsafe fn pack_row(kernel: Bf16Kernel, lhs: Mat, r: usize, k: usize, out: &mut [u32]) {
    let row = lhs.ptr.offset(r as isize * lhs.rs);
    let mut done = 0;
    if lhs.cs == 1 {
        let src = std::slice::from_raw_parts(row, k);
        done = match kernel {
            Bf16Kernel::Avx512Bf16 => avx512::convert_pairs(src, out),
            Bf16Kernel::Portable => 0,
        };
    }
    for (p, o) in out.iter_mut().enumerate().take(k / 2).skip(done) {
        *o = pair(at(lhs, r, 2 * p), at(lhs, r, 2 * p + 1));
    }
    if k % 2 == 1 {
        out[k / 2] = pair(at(lhs, r, k - 1), 0.0);
    }
}

/// Packs rows `r0..r0 + rows` of `lhs` (`m x k`) into register-tile panels of `MR` rows, each
/// `[MR][kp]` (row-major pairs; rows past `rows` zero), into `out` (`rows.div_ceil(MR) * MR *
/// kp` long).
///
/// # Safety
/// `lhs` must cover rows `r0..r0 + rows` and columns `0..k`.
unsafe fn pack_a(kernel: Bf16Kernel, lhs: Mat, r0: usize, rows: usize, k: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    for (i, dst) in out.chunks_exact_mut(kp.max(1)).enumerate() {
        if kp == 0 {
            break;
        }
        if i < rows {
            pack_row(kernel, lhs, r0 + i, k, dst);
        } else {
            dst.fill(0);
        }
    }
}

/// A right operand (`k x n`) packed once for any number of products: panels of `NR` columns,
/// each `[kp][NR]` pairs (columns past `n` zero). `D` owns the data (`Vec<u32>`) or borrows a
/// slice of a larger buffer ([`PackedB::view`]).
pub(crate) struct PackedB<D = Vec<u32>> {
    data: D,
    n: usize,
    k: usize,
}

/// Elements of a packed `k x n` right operand.
pub(crate) fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(NR) * k.div_ceil(2) * NR
}

/// Packs `rhs` (`k x n`) into `out` (`packed_len(n, k)` long), its panels in parallel when
/// `par`.
///
/// # Safety
/// `rhs` must cover rows `0..k` and columns `0..n`.
pub(crate) unsafe fn pack_b_into(rhs: Mat, n: usize, k: usize, out: &mut [u32], par: bool) {
    let kp = k.div_ceil(2);
    if kp == 0 {
        return;
    }
    let rhs = Operand(rhs);
    let fill = |(j, out): (usize, &mut [u32])| pack_b_panel(rhs.get(), j * NR, n, k, out);
    if par {
        out.par_chunks_mut(kp * NR).enumerate().for_each(fill);
    } else {
        out.chunks_mut(kp * NR).enumerate().for_each(fill);
    }
}

impl PackedB {
    /// [`pack_b_into`] a buffer of its own, reusing `data`'s allocation (kept across calls: a
    /// fresh multi-megabyte buffer per product costs a page fault per 4 KiB).
    ///
    /// # Safety
    /// As [`pack_b_into`].
    unsafe fn new_in(mut data: Vec<u32>, rhs: Mat, n: usize, k: usize, par: bool) -> Self {
        fit(&mut data, packed_len(n, k));
        pack_b_into(rhs, n, k, &mut data, par);
        PackedB { data, n, k }
    }
}

impl<'a> PackedB<&'a [u32]> {
    /// A `k x n` operand packed by [`pack_b_into`] into `data`.
    pub(crate) fn view(data: &'a [u32], n: usize, k: usize) -> Self {
        debug_assert_eq!(data.len(), packed_len(n, k));
        PackedB { data, n, k }
    }
}

impl<D: AsRef<[u32]>> PackedB<D> {
    fn panel(&self, j: usize) -> *const u32 {
        let kp = self.k.div_ceil(2);
        self.data.as_ref()[j * kp * NR..].as_ptr()
    }
}

/// Packs columns `c0..c0 + NR` of `rhs` (`k x n`) into one panel `[kp][NR]` (columns at or past
/// `n` zero).
///
/// # Safety
/// `rhs` must cover rows `0..k` and columns `c0..min(c0 + NR, n)`; `out.len() == kp * NR`.
unsafe fn pack_b_panel(rhs: Mat, c0: usize, n: usize, k: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    let cols = NR.min(n - c0);
    for p in 0..kp {
        let (r0, r1) = (2 * p, 2 * p + 1);
        let dst = &mut out[p * NR..(p + 1) * NR];
        for (j, d) in dst.iter_mut().enumerate() {
            *d = if j >= cols {
                0
            } else if r1 < k {
                pair(at(rhs, r0, c0 + j), at(rhs, r1, c0 + j))
            } else {
                pair(at(rhs, r0, c0 + j), 0.0)
            };
        }
    }
}

/// Where a register tile's results go: `rows x cols` of `dst` (row stride `rs`), written as
/// `dst = [dst +] scale * acc`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub dst: *mut f32,
    pub rs: usize,
    pub rows: usize,
    pub cols: usize,
    pub accumulate: bool,
    pub scale: f32,
}

/// One register tile: `kp` pairs of a packed A panel (`[MR][kp]`) against a packed B panel
/// (`[kp][NR]`).
///
/// # Safety
/// The panels must hold `kp` pairs; `tile` must describe writable memory.
#[inline]
unsafe fn micro(kernel: Bf16Kernel, kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    match kernel {
        Bf16Kernel::Avx512Bf16 => avx512::micro(kp, a, b, tile),
        Bf16Kernel::Portable => portable::micro(kp, a, b, tile),
    }
}

/// Sets `v`'s length to `len` without touching the elements it keeps: every packer writes all
/// of its buffer, so zeroing a reused one (a megabyte per attention block) would be wasted.
fn fit(v: &mut Vec<u32>, len: usize) {
    if v.len() > len {
        v.truncate(len);
    } else {
        v.resize(len, 0);
    }
}

thread_local! {
    /// Per-thread packing scratch for A on the serial path, reused across calls.
    static PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's packed A and B of the parallel path, kept between calls. Taken out
    /// of the cell for the duration of a product, not borrowed: while it waits for its tasks the
    /// thread may run other rayon work that takes products of its own (which then allocates).
    static SPARE: Cell<(Vec<u32>, Vec<u32>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// A pointer that crosses rayon tasks, which write disjoint tiles of one output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint rows x column ranges of the output, which outlives the scope.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Operands sent to rayon tasks (read only).
#[derive(Clone, Copy)]
struct Operand(Mat);
// SAFETY: the operands are only read, and outlive the parallel scope.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

impl Operand {
    fn get(self) -> Mat {
        self.0
    }
}

/// Register tiles of packed A rows `r0..r0 + rows` (panels from `a`) against B panels `panels`,
/// into `dst`.
///
/// # Safety
/// As [`gemm`]; `a` must hold the rows' panels.
#[allow(clippy::too_many_arguments)]
unsafe fn tiles(
    kernel: Bf16Kernel,
    a: *const u32,
    r0: usize,
    rows: usize,
    b: &PackedB<impl AsRef<[u32]>>,
    panels: std::ops::Range<usize>,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    scale: f32,
) {
    let kp = b.k.div_ceil(2);
    for j in panels {
        for t in 0..rows.div_ceil(MR) {
            let tr0 = r0 + t * MR;
            let tile = Tile {
                dst: dst.add(tr0 * dst_rs + j * NR),
                rs: dst_rs,
                rows: MR.min(r0 + rows - tr0),
                cols: NR.min(b.n - j * NR),
                accumulate,
                scale,
            };
            micro(kernel, kp, a.add(t * MR * kp), b.panel(j), tile);
        }
    }
}

/// `dst (m x n) = [dst +] scale * lhs (m x k) @ b` with `b` packed beforehand, on the calling
/// thread (the attention blocks reuse one packed K or V for every query block).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed(
    kernel: Bf16Kernel,
    m: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    b: &PackedB<impl AsRef<[u32]>>,
    scale: f32,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    let kp = b.k.div_ceil(2);
    PACK.with(|cell| {
        let a = &mut *cell.borrow_mut();
        fit(a, m.div_ceil(MR) * MR * kp);
        pack_a(kernel, lhs, 0, m, b.k, a);
        let panels = b.n.div_ceil(NR);
        tiles(
            kernel,
            a.as_ptr(),
            0,
            m,
            b,
            0..panels,
            dst,
            dst_rs,
            accumulate,
            scale,
        );
    });
}

/// `dst (m x n, row stride dst_rs) = [dst +] scale * lhs (m x k) @ rhs (k x n)` with bf16
/// operands and f32 accumulation; `Parallelism::Rayon` spreads row and column blocks over the
/// pool.
///
/// # Safety
/// As [`super::linalg::gemm_into`]: the pointers must cover the strided extents and `dst` must
/// not alias the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    kernel: Bf16Kernel,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let serial = matches!(par, Parallelism::None) || m * n * k < (1 << 20);
    let (mut a, spare_b) = SPARE.take();
    let b = PackedB::new_in(spare_b, rhs, n, k, !serial);
    if serial {
        gemm_packed(kernel, m, dst, dst_rs, accumulate, lhs, &b, scale);
        SPARE.set((a, b.data));
        return;
    }
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let lhs_s = Operand(lhs);
    let out = Out(dst);
    let b_ref = &b;
    let tall_blocks = m.div_ceil(MC_TALL);
    if tall_blocks >= 4 * rayon::current_num_threads() {
        // Tall products (the encoder's linears): a task per block of rows, which packs its own
        // A rows into per-thread scratch and runs them against every panel, so no packed copy
        // of the whole A is ever held.
        (0..tall_blocks).into_par_iter().for_each(|rb| {
            let (r0, rows) = (rb * MC_TALL, MC_TALL.min(m - rb * MC_TALL));
            PACK.with(|cell| {
                let pa = &mut *cell.borrow_mut();
                fit(pa, rows.div_ceil(MR) * MR * kp);
                pack_a(kernel, lhs_s.get(), r0, rows, k, pa);
                tiles(
                    kernel,
                    pa.as_ptr(),
                    r0,
                    rows,
                    b_ref,
                    0..panels,
                    out.get(),
                    dst_rs,
                    accumulate,
                    scale,
                );
            });
        });
        SPARE.set((a, b.data));
        return;
    }
    // Short and wide: A packed once, in parallel, then tiles of MC rows x NC_PANELS panels.
    fit(&mut a, m.div_ceil(MR) * MR * kp);
    if kp > 0 {
        a.par_chunks_mut(MC * kp).enumerate().for_each(|(rb, out)| {
            let rows = MC.min(m - rb * MC);
            pack_a(kernel, lhs_s.get(), rb * MC, rows, k, out)
        });
    }
    let row_blocks = m.div_ceil(MC);
    let col_blocks = panels.div_ceil(NC_PANELS);
    let a_ref = &a;
    (0..row_blocks * col_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (rb, cb) = (task / col_blocks, task % col_blocks);
            let (r0, rows) = (rb * MC, MC.min(m - rb * MC));
            let js = cb * NC_PANELS..panels.min((cb + 1) * NC_PANELS);
            tiles(
                kernel,
                a_ref.as_ptr().add(r0 * kp),
                r0,
                rows,
                b_ref,
                js,
                out.get(),
                dst_rs,
                accumulate,
                scale,
            );
        });
    SPARE.set((a, b.data));
}

/// The definition the kernels implement, one output at a time: `dst = [dst +] scale * acc` with
/// `acc` accumulated over the bf16 pairs as described in the module documentation.
///
/// # Safety
/// As [`gemm`].
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn reference(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    let bf = |x: f32| from_bf16(to_bf16(x));
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for p in 0..k.div_ceil(2) {
                let (ao, bo) = if 2 * p + 1 < k {
                    (bf(at(lhs, i, 2 * p + 1)), bf(at(rhs, 2 * p + 1, j)))
                } else {
                    (0.0, 0.0)
                };
                acc = step(acc, ao, bo);
                acc = step(acc, bf(at(lhs, i, 2 * p)), bf(at(rhs, 2 * p, j)));
            }
            let d = dst.add(i * dst_rs + j);
            *d = if accumulate {
                *d + scale * acc
            } else {
                scale * acc
            };
        }
    }
}
