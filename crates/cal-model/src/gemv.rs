//! Small-batch `x · Wᵀ` for decoding: `x [m, k]` with a handful of rows (one per
//! sequence being sampled) against a weight `W [n, k]` in its stored layout.
//!
//! Why not candle's matmul: at `m = 8` gemm packs the weight panel before multiplying,
//! so a decoding step reads every weight twice and writes it once more; the
//! `[8, 576] × [576, 49 152]` logits product ran at 10 GB/s on a machine that streams
//! 31 GB/s (`cal-grpo bench kernels`). Decoding is a weight-streaming problem: this
//! kernel reads each weight row once, straight from its storage, and keeps a tile of 4
//! weight rows in L1 while every group of up to 4 activation rows is multiplied
//! against it (16 accumulators, one FMA per loaded lane). AVX-512 and AVX2+FMA paths
//! are chosen at run time (the build stays portable); on other CPUs gemm stays in
//! charge ([`available`]).
//!
//! Forward only, with no backward at all: [`crate::ops::linear_decode`] routes here
//! only decoding steps whose inputs record no gradient. Each output is summed in one
//! fixed order by one thread, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Largest number of activation rows routed here; beyond it gemm's packing pays off.
pub const MAX_ROWS: usize = 16;

/// Weight rows per tile: their `4 · k` floats stay in L1 across activation groups.
const NR: usize = 4;
/// Weight rows per parallel task: large enough that scheduling costs nothing.
const ROWS_PER_TASK: usize = 64;

/// `x [m, k] · w[n, k]ᵀ → [m, n]` for f32 CPU tensors; `w` must be contiguous.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &MatMulNt)
}

struct MatMulNt;

impl CustomOp2 for MatMulNt {
    fn name(&self) -> &'static str {
        "small-batch-matmul-nt"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xv), CpuStorage::F32(wv)) = (xs, ws) else {
            candle_core::bail!("small-batch matmul: expected f32 inputs");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("small-batch matmul: inputs must be contiguous");
        };
        let ([m, k], [n, kw]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "small-batch matmul: expected 2-D inputs, got {:?} and {:?}",
                xl.dims(),
                wl.dims()
            );
        };
        if k != kw {
            candle_core::bail!("small-batch matmul: x is [{m}, {k}] but w is [{n}, {kw}]");
        }
        let mut out = vec![0f32; m * n];
        matmul_nt_slices(&xv[x0..x1], &wv[w0..w1], *m, *k, *n, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((*m, *n))))
    }
}

/// Raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    // A method, not `.0`: closures then capture the whole (Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[i, j] = Σ_p x[i, p] · w[j, p]`, `out` row-major `[m, n]`.
pub fn matmul_nt_slices(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    let kernel = kernel().unwrap_or(Kernel::Portable);
    let ptr = Out(out.as_mut_ptr());
    let task = |t: usize| {
        let (j0, j1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(n));
        // SAFETY: tasks own disjoint column ranges [j0, j1) of `out`, all in bounds.
        unsafe { kernel.columns(x, w, m, k, n, j0, j1, ptr.get()) }
    };
    let tasks = n.div_ceil(ROWS_PER_TASK);
    // Tiny products (the embedded model) lose more to scheduling than they gain.
    if m * n * k < 1 << 18 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Whether decoding products are routed here: only where a SIMD kernel exists (a
/// plain loop is slower than gemm) and `CAL_GRPO_NO_GEMV` is unset (for A/B benches).
pub fn available() -> bool {
    kernel().is_some()
}

fn kernel() -> Option<Kernel> {
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(Kernel::detect)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect() -> Option<Self> {
        if std::env::var_os("CAL_GRPO_NO_GEMV").is_some() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Some(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Some(Kernel::Avx2);
            }
        }
        None
    }

    /// Columns `[j0, j1)` of every output row.
    ///
    /// # Safety
    /// `out` points to `m · n` floats and no other thread writes these columns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns(
        self,
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
    ) {
        let mut j = j0;
        while j < j1 {
            let nr = NR.min(j1 - j);
            let mut i = 0;
            while i < m {
                let mr = 4.min(m - i);
                let mut acc = [[0f32; NR]; 4];
                if nr == NR {
                    match self {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512 => x86::tile512(x, w, k, i, mr, j, &mut acc),
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => x86::tile256(x, w, k, i, mr, j, &mut acc),
                        Kernel::Portable => portable_tile(x, w, k, i, mr, j, nr, &mut acc),
                    }
                } else {
                    portable_tile(x, w, k, i, mr, j, nr, &mut acc);
                }
                for (di, row) in acc.iter().enumerate().take(mr) {
                    for (dj, v) in row.iter().enumerate().take(nr) {
                        *out.add((i + di) * n + j + dj) = *v;
                    }
                }
                i += mr;
            }
            j += nr;
        }
    }
}

/// Reference tile: rows `i..i+mr` of `x` against weight rows `j..j+nr`.
#[allow(clippy::too_many_arguments)]
fn portable_tile(
    x: &[f32],
    w: &[f32],
    k: usize,
    i: usize,
    mr: usize,
    j: usize,
    nr: usize,
    acc: &mut [[f32; NR]; 4],
) {
    for di in 0..mr {
        let xr = &x[(i + di) * k..(i + di + 1) * k];
        for dj in 0..nr {
            let wr = &w[(j + dj) * k..(j + dj + 1) * k];
            // Eight partial sums: lets the compiler vectorise without reassociating.
            let mut lanes = [0f32; 8];
            let mut cx = xr.chunks_exact(8);
            let mut cw = wr.chunks_exact(8);
            for (a, b) in (&mut cx).zip(&mut cw) {
                for l in 0..8 {
                    lanes[l] += a[l] * b[l];
                }
            }
            let tail: f32 = cx
                .remainder()
                .iter()
                .zip(cw.remainder())
                .map(|(a, b)| a * b)
                .sum();
            acc[di][dj] = lanes.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NR;
    use std::arch::x86_64::*;

    /// AVX-512 tile: up to 4 activation rows × 4 weight rows, 16 lanes per step; the
    /// `k % 16` tail is read with a masked load (no out-of-bounds access).
    pub(super) fn tile512(
        x: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        mr: usize,
        j: usize,
        acc: &mut [[f32; NR]; 4],
    ) {
        // SAFETY: the caller checked avx512f at run time; every row read below lies in
        // `x` / `w` (i + mr ≤ m, j + NR ≤ n, masked tail).
        unsafe {
            match mr {
                4 => t512::<4>(x, w, k, i, j, acc),
                3 => t512::<3>(x, w, k, i, j, acc),
                2 => t512::<2>(x, w, k, i, j, acc),
                _ => t512::<1>(x, w, k, i, j, acc),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn t512<const MR: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        j: usize,
        acc: &mut [[f32; NR]; 4],
    ) {
        let xp: [*const f32; MR] = std::array::from_fn(|d| x.as_ptr().add((i + d) * k));
        let wp: [*const f32; NR] = std::array::from_fn(|d| w.as_ptr().add((j + d) * k));
        let mut a = [[_mm512_setzero_ps(); NR]; MR];
        let full = k / 16 * 16;
        let mut p = 0;
        while p < full {
            // The next weight tile, one cache line per row per step: the hardware
            // prefetcher alone left a third of the bandwidth unused (16.9 → 21.9 GB/s
            // on the logits product).
            for row in wp {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR * k + p) as *const i8);
            }
            let wv: [__m512; NR] = std::array::from_fn(|d| _mm512_loadu_ps(wp[d].add(p)));
            for r in 0..MR {
                let xv = _mm512_loadu_ps(xp[r].add(p));
                for d in 0..NR {
                    a[r][d] = _mm512_fmadd_ps(xv, wv[d], a[r][d]);
                }
            }
            p += 16;
        }
        if p < k {
            let mask: __mmask16 = (1u16 << (k - p)) - 1;
            let wv: [__m512; NR] =
                std::array::from_fn(|d| _mm512_maskz_loadu_ps(mask, wp[d].add(p)));
            for r in 0..MR {
                let xv = _mm512_maskz_loadu_ps(mask, xp[r].add(p));
                for d in 0..NR {
                    a[r][d] = _mm512_fmadd_ps(xv, wv[d], a[r][d]);
                }
            }
        }
        for r in 0..MR {
            for d in 0..NR {
                acc[r][d] = _mm512_reduce_add_ps(a[r][d]);
            }
        }
    }

    /// AVX2+FMA tile: as [`tile512`] with 8 lanes and a scalar tail; at most 2
    /// activation rows at a time (8 accumulators + loads fit the 16 ymm registers).
    pub(super) fn tile256(
        x: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        mr: usize,
        j: usize,
        acc: &mut [[f32; NR]; 4],
    ) {
        // SAFETY: the caller checked avx2 and fma at run time; reads stay in bounds as
        // in `tile512` (the tail is scalar).
        unsafe {
            let mut r = 0;
            while r < mr {
                let part = if mr - r >= 2 {
                    t256::<2>(x, w, k, i + r, j)
                } else {
                    let one = t256::<1>(x, w, k, i + r, j);
                    [one[0], [0.0; NR]]
                };
                for (d, row) in part.iter().enumerate().take(2.min(mr - r)) {
                    acc[r + d] = *row;
                }
                r += 2;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn t256<const MR: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        j: usize,
    ) -> [[f32; NR]; MR] {
        let xp: [*const f32; MR] = std::array::from_fn(|d| x.as_ptr().add((i + d) * k));
        let wp: [*const f32; NR] = std::array::from_fn(|d| w.as_ptr().add((j + d) * k));
        let mut a = [[_mm256_setzero_ps(); NR]; MR];
        let full = k / 8 * 8;
        let mut p = 0;
        while p < full {
            let wv: [__m256; NR] = std::array::from_fn(|d| _mm256_loadu_ps(wp[d].add(p)));
            for r in 0..MR {
                let xv = _mm256_loadu_ps(xp[r].add(p));
                for d in 0..NR {
                    a[r][d] = _mm256_fmadd_ps(xv, wv[d], a[r][d]);
                }
            }
            p += 8;
        }
        let mut out = [[0f32; NR]; MR];
        for r in 0..MR {
            for d in 0..NR {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[r][d]);
                let tail: f32 = (full..k).map(|q| *xp[r].add(q) * *wp[d].add(q)).sum();
                out[r][d] = lanes.iter().sum::<f32>() + tail;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| f64::from(x[i * k + p]) * f64::from(w[j * k + p]))
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        // Deterministic values in [-1, 1) from an LCG: no RNG crate needed.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every kernel this CPU has, on shapes with row, column and lane remainders,
    /// against an f64 reference.
    #[test]
    fn kernels_match_f64_reference_on_ragged_shapes() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
            }
        }
        for (m, k, n) in [
            (1, 1, 1),
            (3, 17, 5),
            (8, 64, 130),
            (5, 33, 67),
            (16, 576, 9),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = naive(&x, &w, m, k, n);
            for kernel in &kernels {
                let mut got = vec![f32::NAN; m * n];
                unsafe { kernel.columns(&x, &w, m, k, n, 0, n, got.as_mut_ptr()) };
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt(),
                        "{m}x{k}x{n}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn op_matches_candle_matmul_and_rejects_bad_shapes() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::from_vec(data(8 * 200, 3), (8, 200), &dev)?;
        let w = Tensor::from_vec(data(1000 * 200, 4), (1000, 200), &dev)?;
        let got = matmul_nt(&x, &w)?;
        let want = x.matmul(&w.t()?)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max abs diff {diff}");
        let bad = Tensor::zeros((3, 7), candle_core::DType::F32, &dev)?;
        let err = matmul_nt(&x, &bad).unwrap_err().to_string();
        assert!(err.contains("[8, 200]") && err.contains("[3, 7]"), "{err}");
        Ok(())
    }
}
