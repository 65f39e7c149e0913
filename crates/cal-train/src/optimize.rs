//! Optimize: micro-batches, the fixed log-probs (reference, old policy), then per
//! iteration the loss of every micro-batch, its gradient accumulated, and one AdamW
//! step.
//!
//! Micro-batches bound memory (the full-vocabulary log-softmax dominates); their
//! gradients are accumulated with [`micro_batch_weight`]s that make the sum equal the
//! full-batch gradient, so `micro_batch` changes memory, not the update.

use crate::adamw::AdamW;
use crate::collective::{any_rank, Collective};
use crate::config::RunConfig;
use crate::loss::{micro_batch_weight, policy_loss, LossConfig, LossOutput};
use crate::policy::Policy;
use crate::rollout::Rollouts;
use crate::seed::mix_seed;
use anyhow::Result;
use cal_core::credit::AdvantageMatrix;
use cal_model::generate::{
    build_batch, build_shared_batch, completion_logprobs, completion_logprobs_hidden,
    distinct_prompts, SequenceBatch,
};
use cal_model::{Forward, Transformer};
use candle_core::{DType, Tensor};

/// Rows of the step laid out for one forward pass, with what the loss needs besides
/// the policy's own log-probs.
pub struct MicroBatch {
    /// Rows of the step, in the order they are laid out.
    pub rows: Vec<usize>,
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
    /// The sampling engine's log-probs `logq` (`[b, Tc]`, 0 on padding), when an engine
    /// other than the trainer sampled.
    pub engine_logp: Option<Tensor>,
}

/// Which rows go together: with a token budget, rows sorted by length (longest first)
/// and packed greedily while `rows × (longest prompt + longest completion)` stays within
/// `budget` tokens (and `max_rows`, when not 0), so that rows of similar length share
/// their padding; without one, consecutive chunks of `max_rows` (0 = all rows). A row
/// longer than the budget goes alone, and a batch that fits whole stays one pass in its
/// own order. Pure: `lens` are (prompt, completion) lengths.
pub fn plan_micro_batches(
    lens: &[(usize, usize)],
    max_rows: usize,
    budget: usize,
) -> Vec<Vec<usize>> {
    let n = lens.len();
    let cap = if max_rows == 0 { n.max(1) } else { max_rows };
    if budget == 0 {
        return (0..n)
            .step_by(cap)
            .map(|s| (s..(s + cap).min(n)).collect())
            .collect();
    }
    let p_all = lens.iter().map(|l| l.0).max().unwrap_or(0);
    let c_all = lens.iter().map(|l| l.1).max().unwrap_or(0);
    if n <= cap && n * (p_all + c_all) <= budget {
        // everything fits: one pass, rows in their own order
        return vec![(0..n).collect()];
    }
    let mut order: Vec<usize> = (0..n).collect();
    // stable: equal lengths keep their order, so the plan is a function of the lengths
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i].0 + lens[i].1));
    let mut plan: Vec<Vec<usize>> = Vec::new();
    let (mut p_max, mut c_max) = (0, 0);
    for i in order {
        let (p, c) = lens[i];
        let fits = plan.last().is_some_and(|mb| {
            let rows = mb.len() + 1;
            rows <= cap && rows * (p_max.max(p) + c_max.max(c)) <= budget
        });
        if fits {
            plan.last_mut().unwrap().push(i);
            (p_max, c_max) = (p_max.max(p), c_max.max(c));
        } else {
            plan.push(vec![i]);
            (p_max, c_max) = (p, c);
        }
    }
    plan
}

/// Rows that share one prompt: its length, and each row's (index, completion length).
pub type PromptGroup = (usize, Vec<(usize, usize)>);

/// [`plan_micro_batches`] for rows that share prompts: micro-batches hold whole groups
/// (`groups[g]` = the group's prompt length and its rows' (index, completion length)),
/// so that each prompt is computed once per micro-batch.
///
/// With a token budget, the cost of a micro-batch is its prompts plus its completions,
/// `groups × longest prompt + rows × longest completion`; a group over the budget alone
/// is cut into pieces of as many rows as fit (each piece recomputes the prompt), and
/// pieces are packed longest first, as rows are. Without a budget, consecutive groups,
/// `max_rows / G` of them per micro-batch (at least one: a group is never split, whatever
/// the row cap; 0 = all). Pure.
pub fn plan_group_micro_batches(
    groups: &[PromptGroup],
    max_rows: usize,
    budget: usize,
) -> Vec<Vec<usize>> {
    let rows_of = |g: &[(usize, usize)]| g.iter().map(|r| r.0).collect::<Vec<_>>();
    if budget == 0 {
        let size = groups.iter().map(|g| g.1.len()).max().unwrap_or(1).max(1);
        let per = if max_rows == 0 {
            groups.len().max(1)
        } else {
            (max_rows / size).max(1)
        };
        return groups
            .chunks(per)
            .map(|c| c.iter().flat_map(|g| rows_of(&g.1)).collect())
            .collect();
    }
    // pieces: (prompt length, longest completion, rows)
    let mut pieces: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for (p, rows) in groups {
        let c = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let fit = if p + rows.len() * c <= budget {
            rows.len()
        } else {
            (budget.saturating_sub(*p) / c.max(1)).max(1)
        };
        for chunk in rows.chunks(fit.max(1)) {
            let c = chunk.iter().map(|r| r.1).max().unwrap_or(0);
            pieces.push((*p, c, rows_of(chunk)));
        }
    }
    let cost = |n: usize, rows: usize, p: usize, c: usize| n * p + rows * c;
    let rows_all: usize = pieces.iter().map(|x| x.2.len()).sum();
    let (p_all, c_all) = pieces
        .iter()
        .fold((0, 0), |(p, c), x| (p.max(x.0), c.max(x.1)));
    if cost(pieces.len(), rows_all, p_all, c_all) <= budget {
        return vec![pieces.into_iter().flat_map(|x| x.2).collect()];
    }
    // stable: equal lengths keep their order, so the plan is a function of the lengths
    pieces.sort_by_key(|x| std::cmp::Reverse(x.0 + x.1));
    let mut plan: Vec<(usize, usize, usize, Vec<usize>)> = Vec::new(); // (n, p, c, rows)
    for (p, c, rows) in pieces {
        match plan.last_mut() {
            Some(mb)
                if cost(mb.0 + 1, mb.3.len() + rows.len(), mb.1.max(p), mb.2.max(c)) <= budget =>
            {
                (mb.0, mb.1, mb.2) = (mb.0 + 1, mb.1.max(p), mb.2.max(c));
                mb.3.extend(rows);
            }
            _ => plan.push((1, p, c, rows)),
        }
    }
    plan.into_iter().map(|mb| mb.3).collect()
}

/// The step's rows as groups: consecutive rows of one example, with the prompt length
/// and each row's (index, completion length).
fn row_groups(r: &Rollouts) -> Vec<PromptGroup> {
    let g = r.group.max(1);
    (0..r.len())
        .step_by(g)
        .map(|s| {
            let rows = (s..(s + g).min(r.len()))
                .map(|i| (i, r.gens[i].ids.len()))
                .collect();
            (r.prompts[s].len(), rows)
        })
        .collect()
}

/// [`row_groups`] when they share their prompt tokens; `None` when no two rows of a
/// group do (nothing to share).
fn prompt_groups(r: &Rollouts) -> Option<Vec<PromptGroup>> {
    let groups = row_groups(r);
    let shares = groups.iter().any(|(_, rows)| {
        rows.len() > 1
            && rows
                .iter()
                .all(|&(i, _)| r.prompts[i] == r.prompts[rows[0].0])
    });
    shares.then_some(groups)
}

/// Splits the step's rows into micro-batches ([`plan_micro_batches`]), each padded only
/// to its own longest prompt and completion. With `run.shared-prefix` on, whole groups
/// ([`plan_group_micro_batches`]) whose passes compute each distinct prompt once;
/// `whole_groups` (an algorithm whose loss reads a group or pair together) keeps groups
/// whole without sharing.
pub fn micro_batches(
    r: &Rollouts,
    size: usize,
    token_budget: usize,
    policy: &Policy,
    cfg: &RunConfig,
    whole_groups: bool,
) -> Result<Vec<MicroBatch>> {
    let rows = r.len();
    let total_tokens = r.completion_tokens() as f64;
    let (dev, dtype) = (&policy.model.device, policy.model.master_dtype());
    let lens: Vec<(usize, usize)> = (0..rows)
        .map(|i| (r.prompts[i].len(), r.gens[i].ids.len()))
        .collect();
    let groups = cfg
        .run
        .shared_prefix
        .on()
        .then(|| prompt_groups(r))
        .flatten();
    let plan = match (&groups, whole_groups) {
        (Some(g), _) => plan_group_micro_batches(g, size, token_budget),
        (None, true) => plan_group_micro_batches(&row_groups(r), size, token_budget),
        (None, false) => plan_micro_batches(&lens, size, token_budget),
    };
    let mut out = Vec::new();
    for rows_mb in plan {
        let prompts: Vec<Vec<u32>> = rows_mb.iter().map(|&i| r.prompts[i].clone()).collect();
        let completions: Vec<Vec<u32>> = rows_mb.iter().map(|&i| r.gens[i].ids.clone()).collect();
        let shared = groups
            .is_some()
            .then(|| distinct_prompts(&prompts))
            .filter(|(distinct, _)| distinct.len() < prompts.len());
        let batch = match shared {
            Some((distinct, group)) => {
                let distinct: Vec<Vec<u32>> = distinct.into_iter().cloned().collect();
                let group: Vec<usize> = group.iter().map(|&g| g as usize).collect();
                build_shared_batch(&distinct, &group, &completions, policy.tok.pad_id, dev)?
            }
            None => build_batch(&prompts, &completions, policy.tok.pad_id, dev)?,
        };
        let mask_f = batch.completion_mask_f32();
        let tokens: f64 = mask_f.iter().map(|&x| f64::from(x)).sum();
        let mask = Tensor::from_vec(mask_f, (rows_mb.len(), batch.completion_len), dev)?
            .to_dtype(dtype)?;
        let engine_logp = match &r.engine_logp {
            Some(lq) => {
                let tc = batch.completion_len;
                let padded: Vec<f32> = rows_mb
                    .iter()
                    .flat_map(|&i| {
                        let row = &lq[i];
                        (0..tc).map(move |t| row.get(t).copied().unwrap_or(0.0))
                    })
                    .collect();
                Some(Tensor::from_vec(padded, (rows_mb.len(), tc), dev)?.to_dtype(dtype)?)
            }
            None => None,
        };
        out.push(MicroBatch {
            weight: micro_batch_weight(
                cfg.loss.aggregation,
                rows_mb.len(),
                rows,
                tokens,
                total_tokens,
            ),
            rows: rows_mb,
            batch,
            mask,
            tokens,
            ref_logp: None,
            old_logp: None,
            engine_logp,
        });
    }
    Ok(out)
}

/// Padded tokens the passes of `micro` compute, and how many of them are padding.
pub fn padding(micro: &[MicroBatch]) -> (usize, f64) {
    let computed: usize = micro.iter().map(|m| m.batch.computed_tokens()).sum();
    let real: usize = micro.iter().map(|m| m.batch.real_tokens()).sum();
    (computed, 1.0 - real as f64 / computed.max(1) as f64)
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
        if cfg.needs_reference() {
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

/// What a loss reads for one micro-batch in one iteration of the update. `[b, Tc]`
/// tensors in the loss dtype; gradients flow through `logp` (and `hidden`) only.
pub struct LossInputs<'a> {
    /// The policy's log-probs of the completion tokens, this forward.
    pub logp: &'a Tensor,
    /// The sampling policy's (detached `logp` when the batch is used once).
    pub old_logp: &'a Tensor,
    /// The frozen reference's, when β > 0.
    pub ref_logp: Option<&'a Tensor>,
    pub advantages: &'a Tensor,
    /// Truncated importance weights of an engine's samples, applied to the advantages.
    pub is_weights: Option<&'a Tensor>,
    /// 1.0 on completion tokens.
    pub mask: &'a Tensor,
    /// The policy's completion hidden states, when [`Loss::wants_hidden`].
    pub hidden: Option<&'a Tensor>,
    pub cfg: &'a LossConfig,
    /// The rollouts' longest allowed completion (`rollout.max-new-tokens`): the
    /// normaliser of `seq-mean-token-sum-norm`.
    pub max_completion_len: usize,
    /// The micro-batch (its rows and batch), its index `k`, the iteration, and the
    /// dropout seed of this forward.
    pub micro: &'a MicroBatch,
    pub k: usize,
    pub iteration: usize,
    pub seed: u64,
}

/// The clipped surrogate with the k3 KL to the reference ([`policy_loss`]), the
/// importance weights of an engine's samples applied to the advantages: the loss of
/// GRPO and the policy half of PPO's.
pub fn clipped_policy_loss(i: &LossInputs) -> Result<LossOutput> {
    let weighted;
    let adv = match i.is_weights {
        Some(w) => {
            weighted = (i.advantages * w)?;
            &weighted
        }
        None => i.advantages,
    };
    Ok(policy_loss(
        i.logp,
        i.old_logp,
        i.ref_logp,
        adv,
        i.mask,
        i.cfg,
        i.max_completion_len,
    )?)
}

/// The loss an algorithm trains with, one micro-batch at a time; every
/// [`crate::algorithm::Algorithm`] is one. The default is the clipped policy loss; PPO
/// adds its value loss, DPO would replace it.
pub trait Loss {
    /// Whether [`Loss::loss`] reads the policy forward's hidden states.
    fn wants_hidden(&self) -> bool {
        false
    }

    /// Whether micro-batches must hold whole groups (consecutive rows of one prompt;
    /// a preference pair is a group of two) even when the prompt is not shared.
    fn whole_groups(&self) -> bool {
        false
    }

    /// The scalar loss of one micro-batch (its share of the full batch is applied by the
    /// update).
    fn loss(&mut self, inputs: &LossInputs) -> Result<LossOutput> {
        clipped_policy_loss(inputs)
    }
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
    /// When an engine sampled: how far its log-probs were from the trainer's before the
    /// update (token means of `|logp_old − logq|` and of the k3 estimate of
    /// KL(engine ‖ trainer)) and the mean truncated importance weight applied.
    pub engine: Option<EngineMismatch>,
}

/// The trainer against the sampling engine, on one step's tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct EngineMismatch {
    pub logprob_abs_diff: f64,
    pub kl: f64,
    pub is_weight: f64,
}

/// Truncated importance weights `min(exp(old − logq), cap)` (1 everywhere when `cap` is
/// 0) and the mismatch sums `(Σ|old − logq|, Σ k3, Σ w)` over the masked tokens.
pub fn engine_weights(
    old: &Tensor,
    logq: &Tensor,
    mask: &Tensor,
    cap: f64,
) -> Result<(Tensor, [f64; 3])> {
    let d = (old - logq)?;
    let ratio = d.exp()?;
    let w = if cap > 0.0 {
        ratio.clamp(0.0, cap)?
    } else {
        ratio.ones_like()?
    };
    // k3 of KL(q ‖ p) with samples from q: r − 1 − log r, r = p/q = exp(old − logq)
    let k3 = ((&ratio - 1.0)? - &d)?;
    let sum = |t: &Tensor| -> Result<f64> {
        Ok((t * mask)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let sums = [sum(&d.abs()?)?, sum(&k3)?, sum(&w)?];
    Ok(((w * mask)?, sums))
}

/// Data parallel: each micro-batch's weight against the rows and tokens of the whole
/// step over all ranks (summed), so that the ranks' summed gradients are the one-process
/// gradient of the same batch. One process: untouched.
pub fn global_weights(
    c: &dyn Collective,
    micro: &mut [MicroBatch],
    aggregation: crate::loss::Aggregation,
) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mut t = [
        micro.iter().map(|m| m.rows.len() as f64).sum::<f64>(),
        micro.iter().map(|m| m.tokens).sum::<f64>(),
    ];
    c.all_reduce_sum_f64(&mut t)?;
    for m in micro.iter_mut() {
        m.weight = micro_batch_weight(aggregation, m.rows.len(), t[0] as usize, m.tokens, t[1]);
    }
    Ok(())
}

/// `num_iterations` × (loss and gradient of every micro-batch, the algorithm's own
/// term included, accumulated; one AdamW step at `lr`). `step` seeds the LoRA dropout
/// masks.
#[allow(clippy::too_many_arguments)]
pub fn update(
    policy: &mut Policy,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    adv: &AdvantageMatrix,
    algo: &mut dyn Loss,
    collective: &dyn Collective,
    cfg: &RunConfig,
    step: usize,
    lr: f64,
) -> Result<Update> {
    let (dev, dtype) = (policy.model.device.clone(), policy.model.master_dtype());
    // data parallel: the whole step's tokens, so that each rank's sums below are its
    // contribution to the step's means
    let mut total_tokens = [micro.iter().map(|m| m.tokens).sum::<f64>()];
    if collective.world() > 1 {
        collective.all_reduce_sum_f64(&mut total_tokens)?;
    }
    let total_tokens = total_tokens[0].max(1.0);
    let adv_t: Vec<Tensor> = micro
        .iter()
        .map(|m| {
            let tc = m.batch.completion_len;
            let a: Vec<f32> = m
                .rows
                .iter()
                .flat_map(|&i| adv.row(i)[..tc].iter().copied())
                .collect();
            Ok(Tensor::from_vec(a, (m.rows.len(), tc), &dev)?.to_dtype(dtype)?)
        })
        .collect::<Result<_>>()?;
    let mut u = Update::default();
    let mut engine: Option<EngineMismatch> = None;
    for it in 0..cfg.run.num_iterations.max(1) {
        let mut acc = opt.zero_accumulator();
        let (mut loss, mut kl, mut clip, mut ent) = (0.0, 0.0, 0.0, 0.0);
        for (k, m) in micro.iter().enumerate() {
            // LoRA dropout masks: a pure function of (seed, step, iteration, micro-batch).
            let seed = mix_seed(&[cfg.run.seed, step as u64, it as u64, k as u64]);
            let fwd = Forward::training(seed);
            let (logp, entropy, hidden) = if algo.wants_hidden() {
                let (lp, e, h) = completion_logprobs_hidden(&policy.model, &m.batch, fwd)?;
                (lp, e, Some(h))
            } else {
                let (lp, e) = completion_logprobs(&policy.model, &m.batch, fwd)?;
                (lp, e, None)
            };
            let old = m.old_logp.clone().unwrap_or_else(|| logp.detach());
            // An engine's samples: each token's advantage weighted by its truncated
            // importance weight, computed once from the policy that sampled.
            let is_weights = match &m.engine_logp {
                Some(logq) => {
                    let (w, sums) = engine_weights(&old, logq, &m.mask, cfg.loss.engine_is_cap)?;
                    if it == 0 {
                        let e = engine.get_or_insert_with(EngineMismatch::default);
                        e.logprob_abs_diff += sums[0] / total_tokens;
                        e.kl += sums[1] / total_tokens;
                        e.is_weight += sums[2] / total_tokens;
                    }
                    Some(w)
                }
                None => None,
            };
            let out = algo.loss(&LossInputs {
                logp: &logp,
                old_logp: &old,
                ref_logp: m.ref_logp.as_ref(),
                advantages: &adv_t[k],
                is_weights: is_weights.as_ref(),
                mask: &m.mask,
                hidden: hidden.as_ref(),
                cfg: &cfg.loss,
                max_completion_len: cfg.rollout.max_new_tokens,
                micro: m,
                k,
                iteration: it,
                seed,
            })?;
            let lv = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                tracing::warn!(step, "non-finite loss; step skipped");
                u.skipped = true;
                break;
            }
            let weighted = if micro.len() == 1 && collective.world() == 1 {
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
        if any_rank(collective, u.skipped)? {
            u.skipped = true;
            break;
        }
        // the reduce point: the global gradient, before its norm is taken and clipped
        opt.all_reduce(collective, &mut acc)?;
        if collective.world() > 1 {
            let mut sums = [loss, kl, clip, ent];
            collective.all_reduce_sum_f64(&mut sums)?;
            [loss, kl, clip, ent] = sums;
        }
        u.grad_norm = opt.step_accumulated(&acc, lr)?;
        u.iterations += 1;
        u.loss += loss;
        u.kl += kl;
        u.clip_fraction += clip;
        u.entropy += ent;
    }
    u.engine = engine;
    let n = u.iterations.max(1) as f64;
    u.loss /= n;
    u.kl /= n;
    u.clip_fraction /= n;
    u.entropy /= n;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::plan_micro_batches;
    use rand::{Rng, SeedableRng};

    fn padded(lens: &[(usize, usize)], plan: &[Vec<usize>]) -> usize {
        plan.iter()
            .map(|mb| {
                let p = mb.iter().map(|&i| lens[i].0).max().unwrap();
                let c = mb.iter().map(|&i| lens[i].1).max().unwrap();
                mb.len() * (p + c)
            })
            .sum()
    }

    #[test]
    fn plans_cover_every_row_once_within_the_budget() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let n = rng.random_range(1..40);
            let lens: Vec<(usize, usize)> = (0..n)
                .map(|_| (rng.random_range(5..60), rng.random_range(1..120)))
                .collect();
            let budget = rng.random_range(0..600);
            let rows = rng.random_range(0..6);
            let plan = plan_micro_batches(&lens, rows, budget);
            let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            for mb in &plan {
                assert!(!mb.is_empty());
                assert!(rows == 0 || mb.len() <= rows);
                if budget > 0 && mb.len() > 1 {
                    assert!(padded(&lens, std::slice::from_ref(mb)) <= budget, "{mb:?}");
                }
            }
            if budget == 0 {
                // consecutive chunks, the old behaviour
                let want: Vec<Vec<usize>> = (0..n)
                    .collect::<Vec<_>>()
                    .chunks(if rows == 0 { n } else { rows })
                    .map(<[usize]>::to_vec)
                    .collect();
                assert_eq!(plan, want);
            }
        }
    }

    #[test]
    fn group_plans_keep_groups_whole_and_respect_the_budget() {
        use super::plan_group_micro_batches;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for _ in 0..200 {
            let (n, g) = (rng.random_range(1..10), rng.random_range(1..9));
            let mut row = 0;
            let groups: Vec<super::PromptGroup> = (0..n)
                .map(|_| {
                    let rows = (0..g)
                        .map(|_| {
                            row += 1;
                            (row - 1, rng.random_range(1..120))
                        })
                        .collect();
                    (rng.random_range(5..200), rows)
                })
                .collect();
            let budget = rng.random_range(0..3000);
            let max_rows = rng.random_range(0..12);
            let plan = plan_group_micro_batches(&groups, max_rows, budget);
            let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n * g).collect::<Vec<_>>());
            let group_of = |r: usize| r / g;
            for mb in &plan {
                let ids: std::collections::BTreeSet<usize> =
                    mb.iter().map(|&r| group_of(r)).collect();
                let p = ids.iter().map(|&i| groups[i].0).max().unwrap();
                let c = mb
                    .iter()
                    .map(|&r| groups[group_of(r)].1[r % g].1)
                    .max()
                    .unwrap();
                let cost = ids.len() * p + mb.len() * c;
                if budget == 0 {
                    // whole groups, max_rows / G of them (at least one)
                    assert_eq!(mb.len() % g, 0);
                    let per = if max_rows == 0 {
                        n
                    } else {
                        (max_rows / g).max(1)
                    };
                    assert!(ids.len() <= per);
                } else if mb.len() > 1 {
                    assert!(cost <= budget, "{mb:?} costs {cost} > {budget}");
                }
            }
            if budget == 0
                || groups
                    .iter()
                    .all(|(p, r)| p + g * r.iter().map(|x| x.1).max().unwrap() <= budget)
            {
                // no group was cut: every group lies in one micro-batch
                for i in 0..n {
                    let holders = plan
                        .iter()
                        .filter(|mb| mb.iter().any(|&r| group_of(r) == i))
                        .count();
                    assert_eq!(holders, 1, "group {i} split in {plan:?}");
                }
            }
        }
    }

    #[test]
    fn sorting_by_length_cuts_padding() {
        // GRPO-like: groups of 8 with completions from 10 to 256 tokens
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let lens: Vec<(usize, usize)> = (0..64)
            .map(|i| (40 + (i / 8) * 3, rng.random_range(10..256)))
            .collect();
        let chunks = plan_micro_batches(&lens, 2, 0);
        let sorted = plan_micro_batches(&lens, 2, 1 << 20);
        let (a, b) = (padded(&lens, &chunks), padded(&lens, &sorted));
        let real: usize = lens.iter().map(|(p, c)| p + c).sum();
        assert!(
            b < a && b - real < (a - real) / 3,
            "padding {a} -> {b} (real {real})"
        );
    }
}
