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

/// How per-token losses become one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over all completion tokens of the batch (DAPO, TRL's default).
    TokenMean,
    /// Mean over sequences of the per-sequence token mean (GRPO as published).
    SeqMeanTokenMean,
    /// Sum over tokens divided by `B × max_completion_len` (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// Token-level (GRPO/PPO) or sequence-level (GSPO) importance ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Importance {
    /// GRPO/PPO: one ratio per token.
    #[serde(alias = "grpo")]
    #[value(alias = "grpo")]
    Token,
    /// GSPO: `s_i = exp(mean_t(logp − logp_old))`, shared by the tokens of a sequence.
    #[serde(alias = "gspo")]
    #[value(alias = "gspo")]
    Sequence,
}

/// The `[loss]` section of a run configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LossConfig {
    /// KL coefficient (k3 against the frozen reference; 0 = no reference pass).
    pub beta: f64,
    /// Lower clip range of the surrogate.
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher; `None` = `epsilon`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    pub aggregation: Aggregation,
    pub importance: Importance,
    /// Truncated importance sampling of an engine's samples: each token's advantage is
    /// weighted by `min(exp(logp_old − logq), cap)`, `logq` being the engine's log-prob
    /// of the token (0 = off; only used when an engine sampled).
    pub engine_is_cap: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            beta: 0.04,
            epsilon: 0.2,
            epsilon_high: None,
            aggregation: Aggregation::TokenMean,
            importance: Importance::Token,
            engine_is_cap: 2.0,
        }
    }
}

impl LossConfig {
    /// The upper clip range in force: `epsilon_high`, or `epsilon` when unset.
    pub fn clip_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

/// The scalar loss and diagnostics (means over completion tokens).
pub struct LossOutput {
    pub loss: Tensor,
    pub kl: f64,
    pub clip_fraction: f64,
}

/// `logp`, `old_logp`, `ref_logp`, `adv`, `mask`: `[B, T]` in the same dtype; `mask` is
/// 1.0 on completion tokens. Gradients flow through `logp` only. `max_completion_len`
/// normalises [`Aggregation::SeqMeanTokenSumNorm`] (the rollouts' max new tokens).
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    adv: &Tensor,
    mask: &Tensor,
    cfg: &LossConfig,
    max_completion_len: usize,
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
    let eps_high = cfg.clip_high();
    let clipped = ratio.clamp(1.0 - cfg.epsilon, 1.0 + eps_high)?;
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
            (masked.sum_all()? / (b * max_completion_len.max(1) as f64))?
        }
    };
    // clip fraction: tokens whose ratio left the trust region
    let r = ratio.detach();
    let outside = (r.lt(1.0 - cfg.epsilon)?.to_dtype(mask.dtype())?
        + r.gt(1.0 + eps_high)?.to_dtype(mask.dtype())?)?;
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

/// The weight of one micro-batch's loss in the full-batch loss, such that the weighted
/// micro-batch gradients sum exactly to the full-batch gradient: token-mean divides by
/// the tokens of the whole batch, the per-sequence aggregations by its rows.
pub fn micro_batch_weight(
    aggregation: Aggregation,
    rows: usize,
    total_rows: usize,
    tokens: f64,
    total_tokens: f64,
) -> f64 {
    match aggregation {
        Aggregation::TokenMean => tokens / total_tokens.max(1.0),
        Aggregation::SeqMeanTokenMean | Aggregation::SeqMeanTokenSumNorm => {
            rows as f64 / total_rows.max(1) as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(rows: &[&[f64]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }

    fn scalar(x: &Tensor) -> f64 {
        x.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn token_ratios_clip_asymmetrically() {
        // ratios [1.5, 0.7, 1.1] against advantages [1, −1, 1]
        let logp = Var::from_tensor(&t(&[&[0.0, 0.0, 0.0]])).unwrap();
        let old = t(&[&[-(1.5f64.ln()), -(0.7f64.ln()), -(1.1f64.ln())]]);
        let adv = t(&[&[1.0, -1.0, 1.0]]);
        let mask = t(&[&[1.0, 1.0, 1.0]]);
        let cfg = |hi: Option<f64>| LossConfig {
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: hi,
            ..LossConfig::default()
        };
        // ε_high = 0.3: range [0.8, 1.3]; pg = −[min(1.5, 1.3), min(−0.7, −0.8), 1.1]
        let out = policy_loss(
            logp.as_tensor(),
            &old,
            None,
            &adv,
            &mask,
            &cfg(Some(0.3)),
            128,
        )
        .unwrap();
        assert!((scalar(&out.loss) - (-1.3 + 0.8 - 1.1) / 3.0).abs() < 1e-12);
        assert!((out.clip_fraction - 2.0 / 3.0).abs() < 1e-12);
        // the clipped tokens get no gradient; the third gets −A·r / N
        let g = out.loss.backward().unwrap();
        let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!((g[0][0], g[0][1]), (0.0, 0.0));
        assert!((g[0][2] + 1.1 / 3.0).abs() < 1e-12, "{g:?}");
        // symmetric ε = 0.2: range [0.8, 1.2]
        let out = policy_loss(logp.as_tensor(), &old, None, &adv, &mask, &cfg(None), 128).unwrap();
        assert!((scalar(&out.loss) - (-1.2 + 0.8 - 1.1) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn sequence_ratios_follow_gspo() {
        // s_i = exp(mean over the row's completion tokens of (logp − old)); the padded
        // position (5.0) must not count.
        let logp = t(&[&[0.1, -0.2, 0.4], &[0.3, 0.1, 5.0]]);
        let old = t(&[&[0.0, 0.0, 0.0], &[0.0, 0.0, 0.0]]);
        let adv = t(&[&[1.0, 1.0, 1.0], &[-1.0, -1.0, 0.0]]);
        let mask = t(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
        let cfg = LossConfig {
            beta: 0.0,
            importance: Importance::Sequence,
            ..LossConfig::default()
        };
        let out = policy_loss(&logp, &old, None, &adv, &mask, &cfg, 128).unwrap();
        let (s0, s1) = (0.1f64.exp(), 0.2f64.exp()); // s1 = 1.221 > 1.2: clipped, but
                                                     // min(−s1, −1.2) keeps −s1
        let want = (-3.0 * s0 + 2.0 * s1) / 5.0;
        assert!(
            (scalar(&out.loss) - want).abs() < 1e-12,
            "{}",
            scalar(&out.loss)
        );
        assert!((out.clip_fraction - 2.0 / 5.0).abs() < 1e-12);
    }

    #[test]
    fn micro_batch_weights_sum_to_one() {
        for agg in [
            Aggregation::TokenMean,
            Aggregation::SeqMeanTokenMean,
            Aggregation::SeqMeanTokenSumNorm,
        ] {
            let w = micro_batch_weight(agg, 2, 5, 7.0, 20.0)
                + micro_batch_weight(agg, 3, 5, 13.0, 20.0);
            assert!((w - 1.0).abs() < 1e-12, "{agg:?}");
        }
        assert_eq!(
            micro_batch_weight(Aggregation::TokenMean, 2, 5, 7.0, 20.0),
            0.35
        );
    }
}
