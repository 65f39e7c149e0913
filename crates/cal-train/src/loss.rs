//! The policy loss: clipped surrogate on token advantages plus β·KL(k3) to the
//! reference, aggregated over completion tokens.
//!
//! ```text
//! ratio = exp(logp − logp_old)                 (token level; GSPO: per sequence)
//! pg    = −min(A·ratio, A·clip(ratio, 1−ε, 1+ε_high))
//! kl    = exp(ref − logp) − (ref − logp) − 1   (k3, only when β > 0)
//! loss  = aggregate(pg + β·kl)
//! ```
//!
//! `A` is the `[B, T]` token-advantage matrix from `cal_core::credit`, never reduced
//! to one number per sequence.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// How per-token losses become one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over all completion tokens of the batch (DAPO, TRL's default).
    TokenMean,
    /// Mean over sequences of the per-sequence token mean (original GRPO).
    SeqMeanTokenMean,
    /// Sum over tokens divided by `B × max_completion_len` (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

impl FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "token-mean" => Ok(Self::TokenMean),
            "seq-mean-token-mean" => Ok(Self::SeqMeanTokenMean),
            "seq-mean-token-sum-norm" => Ok(Self::SeqMeanTokenSumNorm),
            _ => Err(format!(
                "unknown loss aggregation {s:?} (token-mean, seq-mean-token-mean, seq-mean-token-sum-norm)"
            )),
        }
    }
}

/// Token-level (GRPO/PPO) or sequence-level (GSPO) importance ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Importance {
    Token,
    /// GSPO: `s_i = exp(mean_t(logp − logp_old))`, shared by the tokens of a sequence.
    Sequence,
}

impl FromStr for Importance {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "token" | "grpo" => Ok(Self::Token),
            "sequence" | "gspo" => Ok(Self::Sequence),
            _ => Err(format!("unknown importance level {s:?} (token, sequence)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub aggregation: Aggregation,
    pub importance: Importance,
    /// Normaliser of [`Aggregation::SeqMeanTokenSumNorm`].
    pub max_completion_len: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            beta: 0.04,
            epsilon: 0.2,
            epsilon_high: 0.2,
            aggregation: Aggregation::TokenMean,
            importance: Importance::Token,
            max_completion_len: 128,
        }
    }
}

/// The scalar loss and diagnostics (means over completion tokens).
pub struct LossOutput {
    pub loss: Tensor,
    pub kl: f64,
    pub clip_fraction: f64,
}

/// `logp`, `old_logp`, `ref_logp`, `adv`, `mask`: `[B, T]` in the same dtype; `mask` is
/// 1.0 on completion tokens. Gradients flow through `logp` only.
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    adv: &Tensor,
    mask: &Tensor,
    cfg: &LossConfig,
) -> Result<LossOutput> {
    let old = old_logp.detach();
    let log_ratio = (logp - &old)?;
    let ratio = match cfg.importance {
        Importance::Token => log_ratio.exp()?,
        Importance::Sequence => {
            let lens = mask.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?;
            let mean = (log_ratio * mask)?
                .sum_keepdim(D::Minus1)?
                .broadcast_div(&lens)?;
            mean.exp()?.broadcast_as(logp.shape())?
        }
    };
    let clipped = ratio.clamp(1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high)?;
    let pg = (adv * &ratio)?.minimum(&(adv * &clipped)?)?.neg()?;
    let mut per_token = pg;
    let mut kl_mean = 0.0;
    let n_tokens = mask
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    if let (Some(r), true) = (ref_logp, cfg.beta > 0.0) {
        let d = (r.detach() - logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        kl_mean = (kl.detach() * mask)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            / n_tokens;
        per_token = (per_token + (kl * cfg.beta)?)?;
    }
    let masked = (per_token * mask)?;
    let loss = match cfg.aggregation {
        Aggregation::TokenMean => (masked.sum_all()? / n_tokens)?,
        Aggregation::SeqMeanTokenMean => {
            let lens = mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?;
            (masked.sum(D::Minus1)? / lens)?.mean_all()?
        }
        Aggregation::SeqMeanTokenSumNorm => {
            let b = logp.dim(0)? as f64;
            (masked.sum_all()? / (b * cfg.max_completion_len.max(1) as f64))?
        }
    };
    // clip fraction: tokens whose ratio left the trust region
    let r = ratio.detach();
    let outside = (r.lt(1.0 - cfg.epsilon)?.to_dtype(mask.dtype())?
        + r.gt(1.0 + cfg.epsilon_high)?.to_dtype(mask.dtype())?)?;
    let clip_fraction = (outside * mask)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        / n_tokens;
    Ok(LossOutput {
        loss,
        kl: kl_mean,
        clip_fraction,
    })
}
