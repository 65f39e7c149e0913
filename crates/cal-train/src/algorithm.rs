//! The algorithm seam: what differs between GRPO and PPO, behind one small trait, each
//! algorithm one file ([`grpo`], [`ppo`]). Everything else (data, rollouts, oracle,
//! held-out evaluation, checkpoints, logs, signals) is the run harness in
//! [`crate::trainer`], shared by all.
//!
//! An algorithm gets a step's scored rollouts (grades and located spans; token rewards
//! are one call away, [`crate::score::token_rewards`]) and the step's micro-batches, and
//! returns the `[B, T]` token advantages the policy loss uses. It may train parameters
//! of its own (a critic: [`Algorithm::params`], registered with the optimizer and kept
//! in checkpoints), and it says what its loss is ([`Loss::loss`], given the policy's
//! log-probs and everything else in [`crate::optimize::LossInputs`]; the default is the
//! clipped policy loss, PPO adds its value loss).

pub mod distill;
pub mod dpo;
pub mod grpo;
pub mod ppo;

pub use crate::config::AlgorithmKind;
use crate::config::RunConfig;
use crate::metrics::Metrics;
use crate::optimize::{Loss, MicroBatch};
use crate::policy::Policy;
use crate::rollout::Rollouts;
use crate::score::{Graded, Spans};
use anyhow::Result;
use cal_core::credit::AdvantageMatrix;
use candle_core::Var;

/// What scoring made of one step's rollouts.
pub struct Scored<'a> {
    pub rollouts: &'a Rollouts,
    pub graded: &'a Graded,
    pub spans: &'a Spans,
    /// The other ranks' shares of the step: statistics over the whole batch (PPO's
    /// and REINFORCE++'s whitening) are summed across them.
    pub collective: &'a dyn crate::collective::Collective,
}

impl Scored<'_> {
    /// [`cal_core::advantage::masked_whiten`] over the whole step's batch.
    pub fn whiten(
        &self,
        x: &cal_core::advantage::TokenMatrix,
        mask: &[bool],
    ) -> Result<cal_core::advantage::TokenMatrix> {
        cal_core::advantage::masked_whiten_over(x, mask, |v| self.collective.all_reduce_sum_f64(v))
    }
}

/// One RL algorithm on top of the shared harness.
pub trait Algorithm: Loss {
    /// Parameters it trains besides the policy's, by checkpoint name.
    fn params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// The step's `[B, T]` token advantages (T = the longest completion). May run
    /// passes over `micro` (PPO: the values of the policy that sampled) and change what
    /// the loss reads there (PPO with the KL as a reward penalty drops `ref_logp`).
    fn advantages(
        &mut self,
        s: &Scored,
        policy: &Policy,
        micro: &mut [MicroBatch],
        cfg: &RunConfig,
    ) -> Result<AdvantageMatrix>;

    /// Learning rate of [`Algorithm::params`] as a multiple of the policy's.
    fn lr_scale(&self) -> f64 {
        1.0
    }

    /// Its own metrics of the step just taken (`loss/value`, `value/*`).
    fn metrics(&mut self) -> Metrics {
        Metrics::new()
    }
}

/// The algorithm `cfg.run.algorithm` names, for `policy` (before adapters attach: a
/// separate critic copies the base model).
pub fn build(cfg: &RunConfig, policy: &Policy) -> Result<Box<dyn Algorithm>> {
    Ok(match cfg.run.algorithm {
        AlgorithmKind::Grpo => Box::new(grpo::Grpo),
        AlgorithmKind::Ppo => Box::new(ppo::Ppo::new(&cfg.ppo, policy)?),
        AlgorithmKind::Dpo => Box::new(dpo::Dpo::new(cfg)),
        AlgorithmKind::OnPolicyDistill => Box::new(distill::OnPolicyDistill::new(cfg, policy)?),
    })
}

/// `[B, T]` f64 advantages as the loss's f32 matrix, with the bookkeeping of
/// [`AdvantageMatrix`] (each row's mean as its "group" advantage).
pub fn advantage_matrix(
    adv: &cal_core::advantage::TokenMatrix,
    mask: &[bool],
    span_credited: usize,
    fallbacks: usize,
) -> AdvantageMatrix {
    let group_advantage = (0..adv.rows)
        .map(|i| {
            let m = &mask[i * adv.cols..(i + 1) * adv.cols];
            let n = m.iter().filter(|&&x| x).count().max(1) as f64;
            adv.row(i).iter().sum::<f64>() / n
        })
        .collect();
    AdvantageMatrix {
        rows: adv.rows,
        cols: adv.cols,
        data: adv.data.iter().map(|&v| v as f32).collect(),
        group_advantage,
        fallbacks,
        span_credited,
    }
}
