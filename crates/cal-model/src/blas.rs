//! f32 matrix products of the CPU training path through the system's OpenBLAS
//! (feature `openblas`, Debian's `libopenblas-dev`), as a differentiable candle op.
//!
//! Why: candle's CPU matmul (the `gemm` crate) reached about half of the f32 rate that
//! PyTorch gets from the same two cores on SmolLM2's training shapes, and
//! the linear layers are most of a training step's FLOPs. OpenBLAS's packed kernels are
//! tuned per CPU at run time (DYNAMIC_ARCH). Which product wins is a measurement:
//! `cal-grpo bench gemm` runs both alternately on the model's shapes.
//!
//! [`Gemm`] computes `C = op(A) · op(B)` for row-major 2-D inputs, `op` being identity
//! or transpose; its backward is two more [`Gemm`]s, so gradients of every linear
//! layer take the same fast path. Without the feature, or after
//! [`set_enabled`]`(false)`, [`crate::ops::linear`] keeps candle's matmul.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "openblas"));

/// Whether the build links OpenBLAS (feature `openblas`).
pub fn compiled() -> bool {
    cfg!(feature = "openblas")
}

/// Whether linear layers use this product: compiled in, not switched off by
/// [`set_enabled`], and `CAL_GRPO_NO_BLAS` unset (for A/B runs of whole commands).
pub fn enabled() -> bool {
    static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "openblas")
        && ENABLED.load(Ordering::Relaxed)
        && !*ENV_OFF.get_or_init(|| std::env::var_os("CAL_GRPO_NO_BLAS").is_some_and(|v| v != "0"))
}

/// Switches the BLAS path on or off for the whole process (benchmarks alternate it);
/// a no-op without the `openblas` feature.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// What `bench` prints as the product in use.
pub fn describe() -> &'static str {
    if enabled() {
        "OpenBLAS sgemm"
    } else if cfg!(feature = "openblas") {
        "candle gemm (OpenBLAS switched off)"
    } else {
        "candle gemm (built without the `openblas` feature)"
    }
}

/// `x [m, k] · w [n, k]ᵀ → [m, n]`, differentiable in both arguments.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    gemm(x, w, false, true)
}

/// `op(a) · op(b)` with `op` a transpose where `ta` / `tb` say so.
pub fn gemm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Gemm { ta, tb })
}

/// `C = op(A) · op(B)`; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
}

impl Gemm {
    /// `(m, k, n)` of the product, or an error naming the mismatch.
    fn dims(&self, al: &Layout, bl: &Layout) -> Result<(usize, usize, usize)> {
        let ([ar, ac], [br, bc]) = (al.dims(), bl.dims()) else {
            candle_core::bail!(
                "blas gemm: expected 2-D inputs, got {:?} and {:?}",
                al.dims(),
                bl.dims()
            );
        };
        let (m, k) = if self.ta { (*ac, *ar) } else { (*ar, *ac) };
        let (kb, n) = if self.tb { (*bc, *br) } else { (*br, *bc) };
        if k != kb {
            candle_core::bail!(
                "blas gemm: inner sizes differ: op(a) is [{m}, {k}], op(b) is [{kb}, {n}]"
            );
        }
        Ok((m, k, n))
    }
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "blas-gemm"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(av), CpuStorage::F32(bv)) = (as_, bs) else {
            candle_core::bail!("blas gemm: expected f32 inputs");
        };
        let (Some((a0, a1)), Some((b0, b1))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("blas gemm: inputs must be contiguous");
        };
        let (m, k, n) = self.dims(al, bl)?;
        let mut out = vec![0f32; m * n];
        sgemm(
            self.ta,
            self.tb,
            m,
            n,
            k,
            &av[a0..a1],
            &bv[b0..b1],
            &mut out,
        )?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    /// For `C = op(A) op(B)` and upstream `G = dL/dC`:
    /// `dA = G op(B)ᵀ` (stored transposed when `ta`), `dB = op(A)ᵀ G` (likewise).
    /// The gradient products record no graph of their own (as candle's backward
    /// expects: a tracked gradient would chain every step's graph into AdamW's
    /// moments), and a frozen argument (LoRA's base weight) gets no product at all.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let da = if !a.track_op() {
            None
        } else if self.ta {
            // A is stored [k, m]: dA = op(B) Gᵀ.
            Some(gemm_no_bwd(b, &g, self.tb, true)?)
        } else {
            Some(gemm_no_bwd(&g, b, false, !self.tb)?)
        };
        let db = if !b.track_op() {
            None
        } else if self.tb {
            // B is stored [n, k]: dB = Gᵀ op(A).
            Some(gemm_no_bwd(&g, a, true, self.ta)?)
        } else {
            Some(gemm_no_bwd(a, &g, !self.ta, false)?)
        };
        Ok((da, db))
    }
}

fn gemm_no_bwd(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &Gemm { ta, tb })
}

// cblas-sys only declares the functions; the system library provides them.
// (openblas-src's `system` mode would do the same but pulls a downloader with TLS.)
#[cfg(feature = "openblas")]
#[link(name = "openblas")]
extern "C" {}

/// Row-major `out[m, n] = op(a) · op(b)`, `a` stored `[m, k]` (`[k, m]` when `ta`) and
/// `b` stored `[k, n]` (`[n, k]` when `tb`). Without OpenBLAS the op still runs, as a
/// plain candle product, so tests and the fallback path exercise the same code.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
) -> Result<()> {
    // m, n or k = 0: nothing to multiply (`out` already holds the zeros k = 0 gives;
    // BLAS would reject a leading dimension of 0).
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    #[cfg(feature = "openblas")]
    {
        use cblas_sys::{cblas_sgemm, CBLAS_LAYOUT, CBLAS_TRANSPOSE};
        let int = |x: usize| {
            i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("blas gemm: {x} > i32")))
        };
        let t = |on| {
            if on {
                CBLAS_TRANSPOSE::CblasTrans
            } else {
                CBLAS_TRANSPOSE::CblasNoTrans
            }
        };
        // Stored row lengths.
        let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
        // SAFETY: the slices hold op(a) [m, k] and op(b) [k, n] at these strides
        // (checked by the caller's layout dims) and `out` holds m · n floats.
        unsafe {
            cblas_sgemm(
                CBLAS_LAYOUT::CblasRowMajor,
                t(ta),
                t(tb),
                int(m)?,
                int(n)?,
                int(k)?,
                1.0,
                a.as_ptr(),
                int(lda)?,
                b.as_ptr(),
                int(ldb)?,
                0.0,
                out.as_mut_ptr(),
                int(n)?,
            );
        }
    }
    #[cfg(not(feature = "openblas"))]
    {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::from_slice(a, if ta { (k, m) } else { (m, k) }, &dev)?;
        let b = Tensor::from_slice(b, if tb { (n, k) } else { (k, n) }, &dev)?;
        let a = if ta { a.t()? } else { a };
        let b = if tb { b.t()? } else { b };
        let c = a.matmul(&b)?.flatten_all()?.to_vec1::<f32>()?;
        out.copy_from_slice(&c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        assert!(d <= tol * s, "max |diff| {d} (scale {s})");
        Ok(())
    }

    /// Values and gradients of all four transpose cases against candle's matmul.
    #[test]
    fn matches_candle_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n) = (13, 37, 21);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = Var::from_tensor(&Tensor::randn(
                0f32,
                1.0,
                if ta { (k, m) } else { (m, k) },
                &dev,
            )?)?;
            let b = Var::from_tensor(&Tensor::randn(
                0f32,
                1.0,
                if tb { (n, k) } else { (k, n) },
                &dev,
            )?)?;
            let w = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
            let op = |x: &Tensor, t: bool| if t { x.t() } else { Ok(x.clone()) };
            let want = op(a.as_tensor(), ta)?.matmul(&op(b.as_tensor(), tb)?)?;
            let got = gemm(a.as_tensor(), b.as_tensor(), ta, tb)?;
            close(&got, &want, 1e-5)?;
            let gw = (want * &w)?.sum_all()?.backward()?;
            let gg = (got * &w)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let g = gg.get(v).unwrap();
                close(g, gw.get(v).unwrap(), 1e-5)?;
                // A gradient that records a graph would keep every step alive in AdamW.
                assert!(!g.track_op(), "gradient records a graph");
            }
        }
        Ok(())
    }

    /// Finite differences of `sum(w ⊙ x Bᵀ)` in f64-free f32: a relative check loose
    /// enough for single precision, tight enough to catch a transposed gradient.
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 6), &dev)?)?;
        let b = Tensor::randn(0f32, 1.0, (5, 6), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let f = |x: &Tensor| -> Result<f32> { (matmul_nt(x, &b)? * &w)?.sum_all()?.to_scalar() };
        let grads = (matmul_nt(x.as_tensor(), &b)? * &w)?
            .sum_all()?
            .backward()?;
        let g = grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let x0 = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let eps = 1e-2f32;
        for i in 0..x0.len() {
            let mut xp = x0.clone();
            xp[i] += eps;
            let mut xm = x0.clone();
            xm[i] -= eps;
            let fd = (f(&Tensor::from_vec(xp, (4, 6), &dev)?)?
                - f(&Tensor::from_vec(xm, (4, 6), &dev)?)?)
                / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 1e-2 * fd.abs().max(1.0),
                "{i}: fd {fd} vs {}",
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((5, 3), candle_core::DType::F32, &dev).unwrap();
        let err = matmul_nt(&a, &b).unwrap_err().to_string();
        assert!(err.contains("inner sizes differ"), "{err}");
    }
}
