//! Optimize: micro-batches, the fixed log-probs (reference, old policy), then per
//! iteration the loss of every micro-batch, its gradient accumulated, and one AdamW
//! step.
//!
//! Micro-batches bound memory (the full-vocabulary log-softmax dominates); their
//! gradients are accumulated with [`micro_batch_weight`]s that make the sum equal the
//! full-batch gradient, so `micro_batch` changes memory, not the update.

use crate::config::RunConfig;
use crate::grpo::mix_seed;
use crate::loss::{micro_batch_weight, policy_loss};
use crate::policy::Policy;
use crate::rollout::Rollouts;
use crate::update::AdamW;
use anyhow::Result;
use cal_core::credit::AdvantageMatrix;
use cal_model::generate::{build_batch, completion_logprobs, SequenceBatch};
use cal_model::{Forward, Transformer};
use candle_core::{DType, Tensor};
use std::ops::Range;

/// Rows of the step laid out for one forward pass, with what the loss needs besides
/// the policy's own log-probs.
pub struct MicroBatch {
    pub rows: Range<usize>,
    pub batch: SequenceBatch,
    /// `[b, Tc]` completion mask (1.0 = real token), in the loss dtype (f32 for half models).
    pub mask: Tensor,
    pub tokens: f64,
    /// Share of this micro-batch's loss in the full-batch loss.
    pub weight: f64,
    /// Frozen reference log-probs (when β > 0).
    pub ref_logp: Option<Tensor>,
    /// Log-probs of the policy that sampled (when it is updated more than once).
    pub old_logp: Option<Tensor>,
}

/// Splits the step's rows into micro-batches of at most `size` rows (0 = one batch),
/// each padded only to its own longest prompt and completion.
pub fn micro_batches(
    r: &Rollouts,
    size: usize,
    policy: &Policy,
    cfg: &RunConfig,
) -> Result<Vec<MicroBatch>> {
    let rows = r.len();
    let size = if size == 0 { rows } else { size.min(rows) }.max(1);
    let total_tokens = r.completion_tokens() as f64;
    let (dev, dtype) = (&policy.model.device, policy.model.master_dtype());
    let mut out = Vec::new();
    for start in (0..rows).step_by(size) {
        let range = start..(start + size).min(rows);
        let completions: Vec<Vec<u32>> = r.gens[range.clone()]
            .iter()
            .map(|g| g.ids.clone())
            .collect();
        let batch = build_batch(
            &r.prompts[range.clone()],
            &completions,
            policy.tok.pad_id,
            dev,
        )?;
        let mask_f = batch.completion_mask_f32();
        let tokens: f64 = mask_f.iter().map(|&x| f64::from(x)).sum();
        let mask =
            Tensor::from_vec(mask_f, (range.len(), batch.completion_len), dev)?.to_dtype(dtype)?;
        out.push(MicroBatch {
            weight: micro_batch_weight(
                cfg.loss.aggregation,
                range.len(),
                rows,
                tokens,
                total_tokens,
            ),
            rows: range,
            batch,
            mask,
            tokens,
            ref_logp: None,
            old_logp: None,
        });
    }
    Ok(out)
}

/// Log-probs that stay fixed during the update: the reference's (a frozen copy, or the
/// base without adapters for LoRA; skipped when β = 0) and, when the batch is used for
/// more than one update, the sampling policy's.
pub fn fixed_logprobs(
    policy: &Policy,
    reference: Option<&Transformer>,
    micro: &mut [MicroBatch],
    cfg: &RunConfig,
) -> Result<()> {
    for m in micro.iter_mut() {
        if cfg.loss.beta > 0.0 {
            let (model, fwd) = match reference {
                Some(r) => (r, Forward::INFERENCE),
                None => (&policy.model, Forward::BASE),
            };
            m.ref_logp = Some(completion_logprobs(model, &m.batch, fwd)?.0.detach());
        }
        if cfg.run.num_iterations > 1 {
            let lp = completion_logprobs(&policy.model, &m.batch, Forward::INFERENCE)?.0;
            m.old_logp = Some(lp.detach());
        }
    }
    Ok(())
}

/// What the update did, averaged over iterations (token-weighted within one).
#[derive(Debug, Default, Clone)]
pub struct Update {
    pub loss: f64,
    pub kl: f64,
    pub clip_fraction: f64,
    pub entropy: f64,
    /// Pre-clipping global gradient norm of the last iteration.
    pub grad_norm: f64,
    /// Optimizer steps taken (`num_iterations`, fewer if a loss was not finite).
    pub iterations: usize,
    /// A non-finite loss stopped the update.
    pub skipped: bool,
}

/// `num_iterations` × (loss and gradient of every micro-batch, accumulated; one AdamW
/// step at `lr`). `step` seeds the LoRA dropout masks.
pub fn update(
    policy: &mut Policy,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    adv: &AdvantageMatrix,
    cfg: &RunConfig,
    step: usize,
    lr: f64,
) -> Result<Update> {
    let (dev, dtype) = (policy.model.device.clone(), policy.model.master_dtype());
    let total_tokens: f64 = micro.iter().map(|m| m.tokens).sum::<f64>().max(1.0);
    let adv_t: Vec<Tensor> = micro
        .iter()
        .map(|m| {
            let tc = m.batch.completion_len;
            let a: Vec<f32> = m
                .rows
                .clone()
                .flat_map(|i| adv.row(i)[..tc].iter().copied())
                .collect();
            Ok(Tensor::from_vec(a, (m.rows.len(), tc), &dev)?.to_dtype(dtype)?)
        })
        .collect::<Result<_>>()?;
    let mut u = Update::default();
    for it in 0..cfg.run.num_iterations.max(1) {
        let mut acc = opt.zero_accumulator();
        let (mut loss, mut kl, mut clip, mut ent) = (0.0, 0.0, 0.0, 0.0);
        for (k, m) in micro.iter().enumerate() {
            // LoRA dropout masks: a pure function of (seed, step, iteration, micro-batch).
            let seed = mix_seed(&[cfg.run.seed, step as u64, it as u64, k as u64]);
            let (logp, entropy) =
                completion_logprobs(&policy.model, &m.batch, Forward::training(seed))?;
            let old = m.old_logp.clone().unwrap_or_else(|| logp.detach());
            let out = policy_loss(
                &logp,
                &old,
                m.ref_logp.as_ref(),
                &adv_t[k],
                &m.mask,
                &cfg.loss,
            )?;
            let lv = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                tracing::warn!(step, "non-finite loss; step skipped");
                u.skipped = true;
                break;
            }
            let weighted = if micro.len() == 1 {
                out.loss
            } else {
                (out.loss * m.weight)?
            };
            opt.accumulate(&mut acc, &weighted.backward()?)?;
            let share = m.tokens / total_tokens;
            loss += lv * m.weight;
            kl += out.kl * share;
            clip += out.clip_fraction * share;
            ent += (entropy * &m.mask)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                / total_tokens;
        }
        if u.skipped {
            break;
        }
        u.grad_norm = opt.step_accumulated(&acc, lr)?;
        u.iterations += 1;
        u.loss += loss;
        u.kl += kl;
        u.clip_fraction += clip;
        u.entropy += ent;
    }
    let n = u.iterations.max(1) as f64;
    u.loss /= n;
    u.kl /= n;
    u.clip_fraction /= n;
    u.entropy /= n;
    Ok(u)
}
