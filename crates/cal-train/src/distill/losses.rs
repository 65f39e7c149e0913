//! The pure core of distillation: the three strategies' terms as functions of tensors
//! (checked against numpy by `scripts/make_distill_fixtures.py`) and the layer map.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// Which distillation loss (`distill.strategy`, `--strategy`), as Tunix names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// τ²·KL between the teacher's and the student's softened next-token distributions.
    #[default]
    Logit,
    /// MSE between the attention maps of mapped layers (a learned head projection where
    /// the head counts differ).
    Attention,
    /// MSE between mean-pooled hidden states of mapped layers through a learned linear map.
    Feature,
}

/// Σ over rows of KL(softmax(teacher/τ) ‖ softmax(student/τ)) for logits `[N, V]`
/// (not scaled by τ², not averaged). Differentiable in `student`.
pub fn logit_kl_sum(student: &Tensor, teacher: &Tensor, tau: f64) -> Result<Tensor> {
    let ls = cal_model::compose::log_softmax_last_dim(&(student / tau)?)?;
    let lt = cal_model::compose::log_softmax_last_dim(&(teacher.detach() / tau)?)?;
    Ok((lt.exp()? * (lt - ls)?)?.sum_all()?)
}

/// Σ over rows, teacher heads, real query tokens (`rows: [B, T]`, 1 real) and keys of
/// `(P·A_S − A_T)²`, for maps `[B, H_S, T, T]` and `[B, H_T, T, T]`; `proj` `[H_T, H_S]`
/// mixes the student's heads (`None`: the head counts match).
pub fn attention_sq_sum(
    student: &Tensor,
    teacher: &Tensor,
    proj: Option<&Tensor>,
    rows: &Tensor,
) -> Result<Tensor> {
    let (b, hs, t, tk) = student.dims4()?;
    let ht = teacher.dim(1)?;
    let s = match proj {
        Some(p) => p
            .broadcast_matmul(&student.reshape((b, hs, t * tk))?)?
            .reshape((b, ht, t, tk))?,
        None => student.clone(),
    };
    let diff = (s - teacher.detach())?.sqr()?.sum(D::Minus1)?; // [B, H_T, T]
    Ok(diff.broadcast_mul(&rows.unsqueeze(1)?)?.sum_all()?)
}

/// Σ over rows and teacher dimensions of `(W·pool(h_S) − pool(h_T))²`, the pool a mean
/// over each row's real tokens (`rows: [B, T]`); `h_S: [B, T, d_S]`, `h_T: [B, T, d_T]`,
/// `proj` `[d_T, d_S]`.
pub fn pooled_feature_sq_sum(
    student: &Tensor,
    teacher: &Tensor,
    proj: &Tensor,
    rows: &Tensor,
) -> Result<Tensor> {
    let pool = |h: &Tensor| -> Result<Tensor> {
        let w = rows.unsqueeze(D::Minus1)?;
        let n = rows.sum_keepdim(1)?;
        Ok(h.broadcast_mul(&w)?.sum(1)?.broadcast_div(&n)?)
    };
    let ps = pool(student)?.matmul(&proj.t()?)?;
    let pt = pool(&teacher.detach())?;
    Ok((ps - pt)?.sqr()?.sum_all()?)
}

/// `0,3,6` → `[0, 3, 6]`; `flag` names the argument in errors.
pub fn parse_layers(text: &str, flag: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .with_context(|| format!("{flag}: `{x}` is not a layer index (e.g. 0,3,6)"))
        })
        .collect()
}

/// The student→teacher layer pairs of the attention and feature strategies: `map`
/// (`0:0,1:3`) if given, else the kept layers (`kept[i]` for student layer i), else
/// student layer i against teacher layer ⌈(i+1)·L_T/L_S⌉ − 1 (the last against the last).
pub fn layer_map(
    map: &str,
    kept: Option<&[usize]>,
    student_layers: usize,
    teacher_layers: usize,
) -> Result<Vec<(usize, usize)>> {
    if !map.trim().is_empty() {
        let pairs = map
            .split(',')
            .map(|p| {
                let (s, t) = p
                    .split_once(':')
                    .with_context(|| format!("--layer-map: `{p}` is not STUDENT:TEACHER"))?;
                let idx = |x: &str| {
                    x.trim()
                        .parse::<usize>()
                        .with_context(|| format!("--layer-map: `{x}` is not a layer index"))
                };
                Ok((idx(s)?, idx(t)?))
            })
            .collect::<Result<Vec<_>>>()?;
        for &(s, t) in &pairs {
            if s >= student_layers || t >= teacher_layers {
                bail!(
                    "--layer-map: {s}:{t} is out of range: the student has {student_layers} \
                     layers, the teacher {teacher_layers}"
                );
            }
        }
        return Ok(pairs);
    }
    Ok(match kept {
        Some(k) => k.iter().copied().enumerate().collect(),
        None => (0..student_layers)
            .map(|i| (i, ((i + 1) * teacher_layers).div_ceil(student_layers) - 1))
            .collect(),
    })
}
