//! Preference losses on a pair's sequence log-probs: DPO's sigmoid, IPO and ORPO, with
//! TRL's conventions (`docs/preferences.md`), as pure functions of tensors so that a
//! fixture made by transcribing TRL checks them (`scripts/make_preference_fixtures.py`).
//!
//! For a pair (chosen c, rejected r) of one prompt, with log π(y) the policy's summed
//! token log-probs of answer y over the tokens that count (the whole answer, or the
//! first differing step with first-error credit):
//!
//! ```text
//! h    = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))
//! dpo  = −log σ(β·h)
//! ipo  = (h̄ − 1/(2β))²                   h̄: each log-ratio averaged over its tokens
//! orpo = NLL(c) − β·log σ(log odds(c̄) − log odds(r̄)),  odds(p) = p/(1 − p), c̄ = mean log-prob
//! ```
//!
//! The batch loss is the mean over pairs (plus, for ORPO, the chosen tokens' mean NLL);
//! [`preference_loss`] returns one micro-batch's share of it, so that micro-batches'
//! gradients add up to the batch's exactly.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Which preference loss (`dpo.loss`, `--loss`), named as TRL names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PrefLoss {
    /// DPO: −log σ(β·h) on summed log-probs.
    #[default]
    Sigmoid,
    /// IPO: (h̄ − 1/(2β))² on log-ratios averaged over tokens.
    Ipo,
    /// ORPO: the chosen answer's NLL plus β × the odds-ratio term; no reference.
    Orpo,
}

impl PrefLoss {
    /// Whether the loss reads a reference model's log-probs.
    pub fn uses_reference(self) -> bool {
        self != PrefLoss::Orpo
    }
}

/// Which tokens of each answer a pair's log-probs sum (`dpo.pair-credit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PairCredit {
    /// Every answer token (classic DPO).
    #[default]
    Full,
    /// Only the first differing step of each answer: from where the answers part to the
    /// end of that line; the carried-forward rest is dropped (Step-DPO).
    FirstError,
}

/// Sequence log-probs of a micro-batch's pairs, `[P]` each: the policy's (with their
/// gradient), the reference's (`None` for ORPO) and the token counts they sum over.
pub struct PairLogps<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: Option<&'a Tensor>,
    pub ref_rejected: Option<&'a Tensor>,
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

/// One micro-batch's share of the batch loss and what TRL logs of its pairs.
pub struct PrefOutput {
    /// Scalar: this micro-batch's pairs' terms over `pairs_total` (ORPO: plus their
    /// chosen NLL over `chosen_tokens_total`).
    pub loss: Tensor,
    /// Per pair: `rewards/chosen` and `rewards/rejected` (β × log-ratio; ORPO: β × mean
    /// log-prob).
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
}

/// `−log σ(x)`, stable for large |x|: `softplus(−x) = max(−x, 0) + log(1 + e^{−|x|})`.
fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let relu = x.neg()?.relu()?;
    Ok((relu + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// `log(1 − e^x)` for x < 0, branched at −ln 2 as TRL's `log1mexp` is.
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let small = x.lt(-std::f64::consts::LN_2)?;
    let a = (x.exp()?.neg()? + 1.0)?.log()?; // log1p(−e^x), accurate far below 0
    let b = (x.exp()? - 1.0)?.neg()?.log()?; // log(−expm1(x)), accurate near 0
    Ok(small.where_cond(&a, &b)?)
}

/// The loss of one micro-batch of pairs ([`PrefOutput`]). `pairs_total` and
/// `chosen_tokens_total` are the whole batch's, so that summing the micro-batches'
/// losses gives the batch loss.
pub fn preference_loss(
    kind: PrefLoss,
    beta: f64,
    p: &PairLogps,
    pairs_total: f64,
    chosen_tokens_total: f64,
) -> Result<PrefOutput> {
    let (c, r) = (p.chosen, p.rejected);
    let (terms, rc, rj) = match kind {
        PrefLoss::Sigmoid | PrefLoss::Ipo => {
            let (Some(ref_c), Some(ref_r)) = (p.ref_chosen, p.ref_rejected) else {
                anyhow::bail!("{kind:?} needs the reference's log-probs");
            };
            let lc = (c - ref_c.detach())?;
            let lr = (r - ref_r.detach())?;
            let terms = if kind == PrefLoss::Sigmoid {
                neg_log_sigmoid(&((&lc - &lr)? * beta)?)?
            } else {
                let d = ((&lc / p.chosen_tokens)? - (&lr / p.rejected_tokens)?)?;
                (d - 1.0 / (2.0 * beta))?.sqr()?
            };
            (terms, (lc * beta)?, (lr * beta)?)
        }
        PrefLoss::Orpo => {
            let mc = (c / p.chosen_tokens)?;
            let mr = (r / p.rejected_tokens)?;
            let log_odds = ((&mc - &mr)? - (log1mexp(&mc)? - log1mexp(&mr)?)?)?;
            // −β·logσ(log_odds) per pair; the NLL is added below as a token mean
            let terms = (neg_log_sigmoid(&log_odds)? * beta)?;
            (terms, (mc * beta)?, (mr * beta)?)
        }
    };
    let mut loss = (terms.sum_all()? / pairs_total)?;
    if kind == PrefLoss::Orpo {
        loss = (loss - (c.sum_all()? / chosen_tokens_total)?)?;
    }
    let to_vec =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    Ok(PrefOutput {
        loss,
        chosen_rewards: to_vec(&rc)?,
        rejected_rewards: to_vec(&rj)?,
    })
}

/// TRL's reward metrics of a set of pairs: `rewards/chosen`, `rewards/rejected`,
/// `rewards/margins` (means) and `rewards/accuracies` (the share with chosen > rejected).
pub fn reward_metrics(chosen: &[f64], rejected: &[f64]) -> [(&'static str, f64); 4] {
    let n = chosen.len().max(1) as f64;
    let mean = |x: &[f64]| x.iter().sum::<f64>() / n;
    let wins = chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64;
    let margin: f64 = chosen.iter().zip(rejected).map(|(c, r)| c - r).sum::<f64>() / n;
    [
        ("rewards/chosen", mean(chosen)),
        ("rewards/rejected", mean(rejected)),
        ("rewards/margins", margin),
        ("rewards/accuracies", wins / n),
    ]
}
