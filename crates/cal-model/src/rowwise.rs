//! Differentiable fused kernels for the training path: RMSNorm, softmax, RoPE (per row)
//! and the SwiGLU gate (per element), each one op forward and one op backward with the
//! gradient written by hand.
//!
//! The compositions in [`crate::compose`] are correct but costly: RMSNorm is 6 candle ops
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
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension, differentiable in `x`
/// and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) && weight.dtype() == x.dtype() && weight.rank() == 1 {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps })
    } else {
        crate::compose::rms_norm(x, weight, eps)
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        crate::compose::softmax_last_dim(x)
    }
}

/// `softmax(scores + bias)` over the last dimension, for attention scores
/// `[B, H, T, Tk]` and an additive mask `[B, 1, T, Tk]` that is not differentiated;
/// differentiable in the scores. The same bits as the broadcast sum followed by
/// [`softmax_last_dim`], without the `[B, H, T, Tk]` sum and its backward.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, _, t, tk) = scores.dims4()?;
    if fusable(scores)
        && bias.dims() == [b, 1, t, tk]
        && bias.dtype() == scores.dtype()
        && !bias.track_op()
        && tk > 0
    {
        scores
            .contiguous()?
            .apply_op2(&bias.contiguous()?, MaskedSoftmax)
    } else {
        softmax_last_dim(&scores.broadcast_add(bias)?)
    }
}

/// Rotary embedding of `x: [B, H, T, D]` with tables `cos, sin: [B, 1, T, D]` (halves
/// duplicated, as `Kernels::rope_tables` in `ops.rs` builds them), differentiable in
/// `x`.
///
/// The composition is 5 ops forward (two products, a negation, a concatenation, a sum)
/// and about 10 backward, on a tensor the size of q or k, per layer. This is one pass
/// each way, and it does the same floating-point operations in the same order as the
/// composition (`x·cos + (−x')·sin`; backward `g·cos ± g'·sin'`), so a training run
/// gives the same bits with either (`tests/gradients.rs`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let tables_fit =
        |c: &Tensor| c.dims() == [b, 1, t, d] && c.dtype() == x.dtype() && !c.track_op();
    if fusable(x) && d % 2 == 0 && tables_fit(cos) && tables_fit(sin) {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { backward: false },
        )
    } else {
        crate::compose::rope(x, cos, sin)
    }
}

/// The SwiGLU gate `silu(gate) ⊙ up`, differentiable in both.
///
/// candle's composition is 2 ops forward and 13 backward (SiLU's derivative alone is
/// 7), each streaming an `[tokens, intermediate]` tensor. This is one pass each way,
/// with the same floating-point operations in the same order as candle's `silu` and
/// its backward, so the bits do not change (`tests/gradients.rs`).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fusable(gate) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        gate.silu()? * up
    }
}

fn fusable(t: &Tensor) -> bool {
    crate::device::cpu_kernels(t.device()) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Elements per parallel task of the element-wise kernels.
const ELEMWISE_CHUNK: usize = 1 << 14;

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
                o.copy_from_slice(row);
                softmax_in_place(o);
            });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// Softmax of one row of logits, in place.
fn softmax_in_place<T: Real>(o: &mut [T]) {
    let m = o.iter().fold(T::neg_infinity(), |a, &v| Float::max(a, v));
    let mut total = T::zero();
    for o in o.iter_mut() {
        *o = (*o - m).exp();
        total += *o;
    }
    for o in o.iter_mut() {
        *o /= total;
    }
}

/// `softmax(x + bias)` of attention scores `x: [B, H, T, Tk]` with an additive mask
/// `bias: [B, 1, T, Tk]` shared by the heads: the broadcast sum is never materialised.
struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, h, t, tk] = *xl.dims() else {
            candle_core::bail!(
                "masked softmax: expected x [B, H, T, Tk], got {:?}",
                xl.dims()
            )
        };
        if bl.dims() != [b, 1, t, tk] || tk == 0 {
            candle_core::bail!(
                "masked softmax: bias {:?} does not match scores {:?}",
                bl.dims(),
                xl.dims()
            );
        }
        dispatch!(xs, T => {
            let (x, bias) = (slice::<T>(xs, xl, "masked softmax x")?, slice::<T>(bs, bl, "masked softmax bias")?);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(tk).zip(x.par_chunks(tk)).enumerate().for_each(|(r, (o, row))| {
                // Row r is (b, head, query); its bias row is (b, query).
                let at = (r / (h * t) * t + r % t) * tk;
                for ((o, &v), &m) in o.iter_mut().zip(row).zip(&bias[at..at + tk]) {
                    *o = v + m;
                }
                softmax_in_place(o);
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        p: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The bias is a constant of the mask (checked before fusing).
        let dx = p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?;
        Ok((Some(dx), None))
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

// ---- RoPE ----

/// `x·cos + rotate_half(x)·sin` per row of `x: [B, H, T, D]`, tables `[B, 1, T, D]`.
/// With `backward`, the gradient of that map: `g·cos + rotate_halfᵀ(g·sin)`, where
/// `rotate_halfᵀ(y) = [y₂, −y₁]`.
struct Rope {
    backward: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.backward {
            "rope-grad"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [_, h, t, d] = *xl.dims() else {
            candle_core::bail!("rope: expected x [B, H, T, D], got {:?}", xl.dims())
        };
        let table = [xl.dims()[0], 1, t, d];
        if cl.dims() != table || sl.dims() != table || d % 2 != 0 {
            candle_core::bail!(
                "rope: tables {:?} and {:?} do not match x {:?}",
                cl.dims(),
                sl.dims(),
                xl.dims()
            );
        }
        let half = d / 2;
        let backward = self.backward;
        dispatch!(xs, T => {
            let x = slice::<T>(xs, xl, "rope x")?;
            let (c, s) = (slice::<T>(cs, cl, "rope cos")?, slice::<T>(ss, sl, "rope sin")?);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(r, (o, row))| {
                // Row r is (b, head, pos); its table row is (b, pos).
                let at = (r / (h * t) * t + r % t) * d;
                let (c, s) = (&c[at..at + d], &s[at..at + d]);
                for j in 0..half {
                    if backward {
                        o[j] = row[j] * c[j] + row[j + half] * s[j + half];
                        o[j + half] = row[j + half] * c[j + half] - row[j] * s[j];
                    } else {
                        o[j] = row[j] * c[j] + -row[j + half] * s[j];
                        o[j + half] = row[j + half] * c[j + half] + row[j] * s[j + half];
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The tables are constants of the positions (checked before fusing).
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { backward: true })?;
        Ok((Some(dx), None, None))
    }
}

// ---- SwiGLU ----

struct SwiGlu;

/// `silu(x) = x / (1 + e^(−x))`, as candle computes it.
fn silu<T: Real>(x: T) -> T {
    x / (T::one() + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(gs, T => {
            let (g, u) = same_shape::<T>((gs, gl), (us, ul), "swiglu")?;
            let mut out = vec![T::zero(); g.len()];
            out.par_chunks_mut(ELEMWISE_CHUNK)
                .zip(g.par_chunks(ELEMWISE_CHUNK).zip(u.par_chunks(ELEMWISE_CHUNK)))
                .for_each(|(o, (g, u))| {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = silu(g) * u;
                    }
                });
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad { of_up: false })?;
        let d_up = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad { of_up: true })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// One input's gradient of [`SwiGlu`]: `d_up = g·silu(x)`, or
/// `d_gate = (g·up)·(σ·(1 − silu(x)) + silu(x))` with `σ = 1 / (e^(−x) + 1)`: candle's
/// backward of `silu(x) * up`, operation for operation.
struct SwiGluGrad {
    of_up: bool,
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let of_up = self.of_up;
        dispatch!(xs, T => {
            let (x, u) = same_shape::<T>((xs, xl), (us, ul), "swiglu grad")?;
            let (_, g) = same_shape::<T>((xs, xl), (gs, gl), "swiglu grad")?;
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(ELEMWISE_CHUNK)
                .zip(x.par_chunks(ELEMWISE_CHUNK))
                .zip(u.par_chunks(ELEMWISE_CHUNK).zip(g.par_chunks(ELEMWISE_CHUNK)))
                .for_each(|((o, x), (u, g))| {
                    for (((o, &x), &u), &g) in o.iter_mut().zip(x).zip(u).zip(g) {
                        let y = silu(x);
                        *o = if of_up {
                            g * y
                        } else {
                            let sigmoid = ((-x).exp() + T::one()).recip();
                            (g * u) * (sigmoid * (T::one() - y) + y)
                        };
                    }
                });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}
