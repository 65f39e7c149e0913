//! Vocabulary kernels for the loss path (token log-probs with a hand-written backward,
//! entropy), one pass per row.
//!
//! Computing `log_softmax(logits).gather(targets)` by composition materialises four
//! `[B, T, V]` tensors forward and as many again backward: for SmolLM2 (V = 49 152) that
//! is 400 MB each on an 8 × 256 batch. [`token_logprobs`] makes one pass per row
//! forward (max, log-sum-exp, pick) and writes the gradient `g · (onehot(y) − softmax(x))`
//! in one pass backward. [`entropy`] is forward-only (a metric). Both run on f32 CPU
//! tensors; other dtypes and devices take the differentiable composition of
//! [`crate::ops`], which is also the reference the tests compare against.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use candle_core::{Tensor, D};
use rayon::prelude::*;

/// `log p(y | x)` per row: `logits [..., V]` (f32), `targets [...]` (u32) → `[...]`.
///
/// Half-precision logits are widened to f32 first (a differentiable cast): the
/// log-softmax over the vocabulary is always computed in f32 or wider.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = &widen(logits)?;
    if fusable(logits) && targets.dtype() == DType::U32 {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, TokenLogProb)
    } else {
        crate::compose::log_softmax_last_dim(logits)?
            .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)
    }
}

/// Entropy of `softmax(logits)` per row, without gradient: `[..., V]` → `[...]`.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let logits = widen(&logits.detach())?;
    if fusable(&logits) {
        logits.contiguous()?.apply_op1_no_bwd(&Entropy)
    } else {
        let lp = crate::compose::log_softmax_last_dim(&logits)?;
        (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()
    }
}

fn widen(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(crate::device::loss_dtype(t.dtype()))
}

fn fusable(t: &Tensor) -> bool {
    crate::device::cpu_kernels(t.device()) && t.dtype() == DType::F32 && t.rank() >= 1
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected contiguous f32"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected contiguous u32"),
    }
}

/// Row shape checks shared by the ops: returns (rows, V, shape of one value per row).
fn rows(logits: &Layout, targets: Option<&Layout>) -> Result<(usize, usize, Shape)> {
    let dims = logits.dims();
    let v = *dims.last().unwrap_or(&0);
    let outer: Vec<usize> = dims[..dims.len() - 1].to_vec();
    if let Some(t) = targets {
        if t.dims() != outer.as_slice() {
            candle_core::bail!(
                "token_logprobs: targets shape {:?} does not match logits {:?}",
                t.dims(),
                dims
            );
        }
    }
    if v == 0 {
        candle_core::bail!("token_logprobs: empty vocabulary dimension");
    }
    Ok((outer.iter().product(), v, Shape::from(outer)))
}

/// Logits `x` (`n` rows of `v`) and targets `y` of a log-prob op, checked.
struct RowsWithTargets<'a> {
    n: usize,
    v: usize,
    shape: Shape,
    x: &'a [f32],
    y: &'a [u32],
}

fn logits_and_targets<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<RowsWithTargets<'a>> {
    let (n, v, shape) = rows(l1, Some(l2))?;
    Ok(RowsWithTargets {
        n,
        v,
        shape,
        x: f32_slice(s1, l1, "logits")?,
        y: u32_slice(s2, l2, "targets")?,
    })
}

/// `(max, log Σ exp(x − max))` of one row, accumulated in f64 for the sum.
fn lse(row: &[f32]) -> (f32, f32) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f64 = row.iter().map(|&x| f64::from((x - m).exp())).sum();
    (m, s.ln() as f32)
}

struct TokenLogProb;

impl CustomOp2 for TokenLogProb {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let RowsWithTargets { n, v, shape, x, y } = logits_and_targets(s1, l1, s2, l2)?;
        let mut out = vec![0f32; n];
        out.par_iter_mut().enumerate().for_each(|(r, o)| {
            let row = &x[r * v..(r + 1) * v];
            let (m, l) = lse(row);
            // An out-of-range target would be a bug upstream; NaN makes it visible.
            *o = row.get(y[r] as usize).map_or(f32::NAN, |&t| t - m - l);
        });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TokenLogProbGrad)?;
        Ok((Some(g), None))
    }
}

/// `dL/dx[r, j] = g[r] · (1[j = y_r] − softmax(x_r)_j)`.
struct TokenLogProbGrad;

impl CustomOp3 for TokenLogProbGrad {
    fn name(&self) -> &'static str {
        "token-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let RowsWithTargets { v, x, y, .. } = logits_and_targets(s1, l1, s2, l2)?;
        let g = f32_slice(s3, l3, "grad")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
            let row = &x[r * v..(r + 1) * v];
            let (m, l) = lse(row);
            let gr = g[r];
            for (oj, &xj) in o.iter_mut().zip(row) {
                *oj = -gr * (xj - m - l).exp();
            }
            if let Some(t) = o.get_mut(y[r] as usize) {
                *t += gr;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct Entropy;

impl CustomOp1 for Entropy {
    fn name(&self) -> &'static str {
        "entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v, shape) = rows(l, None)?;
        let x = f32_slice(s, l, "logits")?;
        let mut out = vec![0f32; n];
        out.par_iter_mut().enumerate().for_each(|(r, o)| {
            let row = &x[r * v..(r + 1) * v];
            let (m, l) = lse(row);
            // H = −Σ p log p with log p = x − m − l
            let h: f64 = row
                .iter()
                .map(|&xj| {
                    let lp = f64::from(xj - m - l);
                    -lp.exp() * lp
                })
                .sum();
            *o = h as f32;
        });
        Ok((CpuStorage::F32(out), shape))
    }
}
