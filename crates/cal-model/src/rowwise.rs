//! Differentiable row-wise kernels for the training path: RMSNorm and softmax, each one
//! op forward and one op backward with the gradient written by hand.
//!
//! The compositions in [`crate::ops`] are correct but costly: RMSNorm is 6 candle ops
//! forward and about 10 backward, softmax 5 and 8, each allocating and streaming a full
//! tensor. On SmolLM2's training step the attention-probability tensors alone are
//! `[8, 9, 256, 256]` (19 MB) per layer. Here each runs as one pass per row forward and
//! one backward. f32 and f64 CPU tensors take these kernels (so the f64
//! finite-difference tests in `tests/gradients.rs` exercise them directly); other
//! dtypes and devices take the compositions, which the tests also compare against.
//!
//! Every output element is computed by one thread in a fixed order, and the RMSNorm
//! weight gradient is reduced over fixed row blocks in block order, so results do not
//! depend on the thread count or on how a batch is split into micro-batches.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};
use candle_core::{DType, Tensor, WithDType};
use num_traits::{Float, Zero};
use rayon::prelude::*;

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension, differentiable in `x`
/// and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) && weight.dtype() == x.dtype() && weight.rank() == 1 {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps })
    } else {
        crate::ops::rms_norm(x, weight, eps)
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        crate::ops::softmax_last_dim(x)
    }
}

fn fusable(t: &Tensor) -> bool {
    crate::device::cpu_kernels(t.device()) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float types the kernels are written for.
trait Real: WithDType + Float + Send + Sync {}
impl Real for f32 {}
impl Real for f64 {}

fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// Row length of a `[..., H]` layout (rank ≥ 1, H > 0).
fn row_len(l: &Layout, what: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&h) if h > 0 => Ok(h),
        _ => candle_core::bail!("{what}: expected [..., H] with H > 0, got {:?}", l.dims()),
    }
}

/// A backward kernel's two `[..., H]` inputs of one shape (x and its gradient, or p
/// and its gradient), checked.
fn same_shape<'a, T: Real>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    what: &str,
) -> Result<(&'a [T], &'a [T])> {
    let (a, b) = (slice::<T>(s1, l1, what)?, slice::<T>(s2, l2, what)?);
    if l1.dims() != l2.dims() {
        candle_core::bail!("{what}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    Ok((a, b))
}

/// Runs `$body` with `$T` bound to the storage's float type.
macro_rules! dispatch {
    ($s:expr, $T:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            _ => candle_core::bail!("row-wise kernel: expected f32 or f64"),
        }
    };
}

// ---- RMSNorm ----

struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms<T: Real>(row: &[T], eps: T) -> T {
    let ss = row.iter().fold(T::zero(), |a, &v| a + v * v);
    let n = len_as::<T>(row.len());
    (ss / n + eps).sqrt().recip()
}

fn eps_of<T: Real>(eps: f64) -> T {
    num_traits::cast(eps).expect("eps fits the float type")
}

fn len_as<T: Real>(n: usize) -> T {
    num_traits::cast(n).expect("a length fits the float type")
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = row_len(xl, "rms_norm x")?;
        if wl.dims() != [h] {
            candle_core::bail!(
                "rms_norm: weight {:?} does not match x {:?}",
                wl.dims(),
                xl.dims()
            );
        }
        dispatch!(xs, T => {
            let (x, w) = (slice::<T>(xs, xl, "rms_norm x")?, slice::<T>(ws, wl, "rms_norm weight")?);
            let eps = eps_of::<T>(self.eps);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, row)| {
                let r = inv_rms(row, eps);
                for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
                    *o = v * r * g;
                }
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGradX { eps: self.eps })?;
        // A frozen norm (LoRA) needs no weight gradient: skip the reduction.
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &RmsNormGradW { eps: self.eps })?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// `dx = r·(g⊙w) − x·r³·mean((g⊙w)⊙x)` per row, `r = 1/rms(x)`.
struct RmsNormGradX {
    eps: f64,
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "rms-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = row_len(xl, "rms_norm grad x")?;
        dispatch!(xs, T => {
            let (x, g) = same_shape::<T>((xs, xl), (gs, gl), "rms_norm grad")?;
            let w = slice::<T>(ws, wl, "rms_norm weight")?;
            if w.len() != h {
                candle_core::bail!("rms_norm grad: weight {:?} does not match x {:?}", wl.dims(), xl.dims());
            }
            let eps = eps_of::<T>(self.eps);
            let n = len_as::<T>(h);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(h)
                .zip(x.par_chunks(h).zip(g.par_chunks(h)))
                .for_each(|(o, (row, gr))| {
                    let r = inv_rms(row, eps);
                    let c = gr
                        .iter()
                        .zip(w)
                        .zip(row)
                        .fold(T::zero(), |a, ((&gv, &wv), &xv)| a + gv * wv * xv)
                        / n;
                    let k = r * r * r * c;
                    for (((o, &gv), &wv), &xv) in o.iter_mut().zip(gr).zip(w).zip(row) {
                        *o = r * gv * wv - xv * k;
                    }
                });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

/// `dw = Σ_rows g ⊙ x·r`, reduced over fixed blocks of rows in block order.
struct RmsNormGradW {
    eps: f64,
}

/// Rows per block of the weight-gradient reduction (fixed: determinism).
const GRAD_W_BLOCK: usize = 64;

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "rms-norm-grad-w"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = row_len(xl, "rms_norm grad w")?;
        dispatch!(xs, T => {
            let (x, g) = same_shape::<T>((xs, xl), (gs, gl), "rms_norm grad")?;
            let eps = eps_of::<T>(self.eps);
            let partial: Vec<Vec<T>> = x
                .par_chunks(h * GRAD_W_BLOCK)
                .zip(g.par_chunks(h * GRAD_W_BLOCK))
                .map(|(xb, gb)| {
                    let mut acc = vec![T::zero(); h];
                    for (row, gr) in xb.chunks(h).zip(gb.chunks(h)) {
                        let r = inv_rms(row, eps);
                        for ((a, &xv), &gv) in acc.iter_mut().zip(row).zip(gr) {
                            *a += gv * xv * r;
                        }
                    }
                    acc
                })
                .collect();
            let mut out = vec![T::zero(); h];
            for p in &partial {
                for (o, &v) in out.iter_mut().zip(p) {
                    *o += v;
                }
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from(h)))
        })
    }
}

// ---- softmax ----

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = row_len(l, "softmax")?;
        dispatch!(s, T => {
            let x = slice::<T>(s, l, "softmax x")?;
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, row)| {
                let m = row.iter().fold(T::neg_infinity(), |a, &v| a.max(v));
                let mut total = T::zero();
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - m).exp();
                    total += *o;
                }
                for o in o.iter_mut() {
                    *o /= total;
                }
            });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = p ⊙ (g − Σ g⊙p)` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = row_len(pl, "softmax grad")?;
        dispatch!(ps, T => {
            let (p, g) = same_shape::<T>((ps, pl), (gs, gl), "softmax grad")?;
            let mut out = vec![T::zero(); p.len()];
            out.par_chunks_mut(h)
                .zip(p.par_chunks(h).zip(g.par_chunks(h)))
                .for_each(|(o, (pr, gr))| {
                    let dot = pr.iter().zip(gr).fold(T::zero(), |a, (&pv, &gv)| a + pv * gv);
                    for ((o, &pv), &gv) in o.iter_mut().zip(pr).zip(gr) {
                        *o = pv * (gv - dot);
                    }
                });
            Ok((T::to_cpu_storage_owned(out), pl.shape().clone()))
        })
    }
}
