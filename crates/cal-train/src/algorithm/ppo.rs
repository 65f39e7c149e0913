//! PPO with a critic: a value head reads the hidden states, GAE(γ, λ) turns the token
//! rewards (the outcome on the last token, a wrong answer's blame on its last token or,
//! with CAL, spread over the located span) and the
//! values of the policy that sampled into token advantages, and a clipped value loss
//! trains the critic beside the clipped policy loss.
//!
//! ```text
//! V_old = critic(rollouts)                         (before the update, detached)
//! r_t   = token rewards [− β·(logp_old − logp_ref)_t  with kl = "reward"]
//! A, R  = gae(r, V_old, γ, λ)   [A whitened over the batch]
//! loss  = policy_loss(A) + vf_coef · value_loss(V, V_old, R)
//! ```
//!
//! The critic is a value head on a copy of the starting model trained as a critic
//! (`separate`, the default: more forward passes, no interference with the policy) or
//! on the policy's own trunk (`shared`: the value loss trains the trunk too, or the
//! LoRA adapters).

use super::{advantage_matrix, Algorithm, Scored};
use crate::config::RunConfig;
use crate::loss::LossOutput;
use crate::metrics::Metrics;
use crate::optimize::{clipped_policy_loss, Loss, LossInputs, MicroBatch};
use crate::policy::Policy;
use crate::score;
use crate::value::{explained_variance, value_loss, ValueHead};
pub use crate::value::{CriticKind, KlPlacement, PpoConfig};
use anyhow::{bail, Result};
use cal_core::advantage::{gae, masked_mean, TokenMatrix};
use cal_core::credit::{AdvantageMatrix, Estimator};
use cal_model::generate::{completion_hidden, completion_logprobs, completion_logprobs_hidden};
use cal_model::{Forward, Transformer};
use candle_core::{DType, Tensor, Var};

pub struct Ppo {
    pub cfg: PpoConfig,
    head: ValueHead,
    /// The separate critic's own model (`critic = "separate"`) and its trainable
    /// weights.
    critic: Option<(Transformer, Vec<(String, Var)>)>,
    /// Per micro-batch of the current step: the values before the update and the GAE
    /// returns, `[b, Tc]` in the head's dtype.
    old_values: Vec<Tensor>,
    returns: Vec<Tensor>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    loss: f64,
    clip_fraction: f64,
    terms: usize,
    explained_variance: f64,
    value_mean: f64,
    return_mean: f64,
}

impl Ppo {
    /// Checkpoint prefix of the separate critic's weights.
    pub const CRITIC_PREFIX: &'static str = "critic.";

    pub fn new(cfg: &PpoConfig, policy: &Policy) -> Result<Self> {
        let m = &policy.model;
        let dtype = m.master_dtype();
        let head = ValueHead::new(m.cfg.hidden_size, dtype, &m.device)?;
        let critic = match cfg.critic {
            CriticKind::Shared => None,
            CriticKind::Separate => {
                let mut c = m.frozen_copy()?;
                let vars = c.make_trainable(|_| true)?;
                Some((c, vars))
            }
        };
        Ok(Self {
            cfg: *cfg,
            head,
            critic,
            old_values: Vec::new(),
            returns: Vec::new(),
            stats: Stats::default(),
        })
    }

    fn values(&self, policy: &Policy, m: &MicroBatch, fwd: Forward) -> Result<Tensor> {
        let h = match &self.critic {
            Some((c, _)) => completion_hidden(c, &m.batch, fwd)?,
            None => completion_hidden(&policy.model, &m.batch, fwd)?,
        };
        Ok(self.head.values(&h)?)
    }
}

/// `[b, Tc]` rows of a micro-batch scattered into the step's `[B, T]` matrix.
fn scatter(dst: &mut TokenMatrix, rows: &[usize], t: &Tensor) -> Result<()> {
    for (j, row) in t
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?
        .into_iter()
        .enumerate()
    {
        dst.row_mut(rows[j])[..row.len()].copy_from_slice(&row);
    }
    Ok(())
}

/// The step's `[B, T]` rows of a micro-batch as a `[b, Tc]` tensor like `like`.
fn gather(src: &TokenMatrix, m: &MicroBatch, like: &Tensor) -> Result<Tensor> {
    let tc = m.batch.completion_len;
    let flat: Vec<f64> = m
        .rows
        .iter()
        .flat_map(|&i| src.row(i)[..tc].iter().copied())
        .collect();
    Ok(Tensor::from_vec(flat, (m.rows.len(), tc), like.device())?.to_dtype(like.dtype())?)
}

impl Loss for Ppo {
    fn wants_hidden(&self) -> bool {
        self.critic.is_none()
    }

    /// The clipped policy loss plus `vf_coef` × the clipped value loss.
    fn loss(&mut self, i: &LossInputs) -> Result<LossOutput> {
        let mut out = clipped_policy_loss(i)?;
        let value = self.value_loss(i.k, i.micro, i.hidden, i.seed)?;
        out.loss = (out.loss + value)?;
        Ok(out)
    }
}

impl Ppo {
    /// `vf_coef` × the clipped value loss of micro-batch `k` (`hidden`: the policy's
    /// completion hidden states for the shared critic; `seed`: the forward's dropout).
    fn value_loss(
        &mut self,
        k: usize,
        m: &MicroBatch,
        hidden: Option<&Tensor>,
        seed: u64,
    ) -> Result<Tensor> {
        let v = match (&self.critic, hidden) {
            (Some((c, _)), _) => {
                self.head
                    .values(&completion_hidden(c, &m.batch, Forward::training(seed))?)?
            }
            (None, Some(h)) => self.head.values(h)?,
            (None, None) => bail!("ppo: the shared critic needs the policy's hidden states"),
        };
        let mask = m.mask.to_dtype(v.dtype())?;
        let (loss, clipped) = value_loss(
            &v,
            &self.old_values[k],
            &self.returns[k],
            &mask,
            self.cfg.value_clip,
        )?;
        let share = m.weight;
        self.stats.loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
        self.stats.clip_fraction += clipped * share;
        if k == 0 {
            self.stats.terms += 1;
        }
        Ok((loss * self.cfg.vf_coef)?.to_dtype(m.mask.dtype())?)
    }
}

impl Algorithm for Ppo {
    fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.head.params("");
        if let Some((_, vars)) = &self.critic {
            p.extend(
                vars.iter()
                    .map(|(k, v)| (format!("{}{k}", Self::CRITIC_PREFIX), v.clone())),
            );
        }
        p
    }

    fn advantages(
        &mut self,
        s: &Scored,
        policy: &Policy,
        micro: &mut [MicroBatch],
        cfg: &RunConfig,
    ) -> Result<AdvantageMatrix> {
        let c = &cfg.credit;
        if c.group != Estimator::Gae {
            bail!("ppo estimates advantages with its critic: credit.advantage must be gae");
        }
        let (mut rewards, mask, shaped, fallbacks) =
            score::token_rewards(s.rollouts, s.graded, s.spans, c);
        let mut values = TokenMatrix::zeros(rewards.rows, rewards.cols);
        let kl_reward = self.cfg.kl == KlPlacement::Reward && cfg.loss.beta > 0.0;
        self.old_values.clear();
        for m in micro.iter_mut() {
            // the critic and the policy as they were when the rollouts were sampled
            let v = match (&self.critic, kl_reward) {
                (None, true) => {
                    let (lp, _, h) =
                        completion_logprobs_hidden(&policy.model, &m.batch, Forward::INFERENCE)?;
                    penalise(&mut rewards, m, &lp, cfg.loss.beta)?;
                    self.head.values(&h)?
                }
                (Some(_), true) => {
                    let (lp, _) = completion_logprobs(&policy.model, &m.batch, Forward::INFERENCE)?;
                    penalise(&mut rewards, m, &lp, cfg.loss.beta)?;
                    self.values(policy, m, Forward::INFERENCE)?
                }
                (_, false) => self.values(policy, m, Forward::INFERENCE)?,
            }
            .detach();
            if kl_reward {
                m.ref_logp = None; // the KL is in the rewards, not in the loss
            }
            scatter(&mut values, &m.rows, &v)?;
            self.old_values.push(v);
        }
        let (adv, returns) = gae(&rewards, &values, &mask, c.gamma, c.lambda);
        self.returns = micro
            .iter()
            .zip(&self.old_values)
            .map(|(m, v)| gather(&returns, m, v))
            .collect::<Result<_>>()?;
        self.stats = Stats {
            explained_variance: explained_variance(&returns.data, &values.data, &mask),
            value_mean: masked_mean(&values, &mask),
            return_mean: masked_mean(&returns, &mask),
            ..Stats::default()
        };
        let adv = if self.cfg.whiten {
            s.whiten(&adv, &mask)?
        } else {
            adv
        };
        Ok(advantage_matrix(&adv, &mask, shaped, fallbacks))
    }

    fn lr_scale(&self) -> f64 {
        self.cfg.value_lr_scale
    }

    fn metrics(&mut self) -> Metrics {
        let s = &self.stats;
        let iters = s.terms.max(1) as f64;
        [
            ("loss/value", s.loss / iters),
            ("value/clip_fraction", s.clip_fraction / iters),
            ("value/explained_variance", s.explained_variance),
            ("value/mean", s.value_mean),
            ("value/returns_mean", s.return_mean),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// `r_t −= β·(logp_old − logp_ref)_t` on the micro-batch's rows (k1 per token).
fn penalise(rewards: &mut TokenMatrix, m: &MicroBatch, logp: &Tensor, beta: f64) -> Result<()> {
    let Some(r) = &m.ref_logp else {
        return Ok(());
    };
    let d = ((logp - r)? * &m.mask)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    for (j, row) in d.into_iter().enumerate() {
        for (t, x) in row.into_iter().enumerate() {
            rewards.row_mut(m.rows[j])[t] -= beta * x;
        }
    }
    Ok(())
}
