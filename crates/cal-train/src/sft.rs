//! Supervised fine-tuning on reference solutions: the warm start that makes RL start
//! from a policy that is sometimes right and sometimes slips in one step.

use crate::adamw::{lr_at, AdamW, OptimConfig};
use crate::config::RunConfig;
use crate::log::Progress;
use crate::optimize::plan_micro_batches;
use crate::policy::Policy;
use anyhow::{bail, Result};
use cal_core::data::Example;
use cal_model::generate::{build_batch, completion_logprobs};
use cal_model::Forward;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SftConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    /// Padded tokens per forward/backward (0 = the whole batch at once): a batch that
    /// does not fit is split into length-sorted micro-batches whose gradients are
    /// accumulated exactly ([`crate::optimize::plan_micro_batches`]). A real model on
    /// GSM8K needs it: 8 rows of up to ~600 tokens held 24 GB for SmolLM2-135M.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub micro_batch_tokens: usize,
}

impl SftConfig {
    /// The recipe of a run configuration: its `[sft]` section, with the run's seed and
    /// AdamW settings and a linear warmup over the first tenth of the steps.
    pub fn of_run(run: &RunConfig) -> Self {
        let s = &run.sft;
        Self {
            steps: s.steps,
            batch_size: s.batch_size,
            optim: OptimConfig {
                lr: s.learning_rate,
                warmup_steps: s.steps / 10,
                ..run.optim
            },
            seed: run.run.seed,
            micro_batch_tokens: s.micro_batch_tokens,
        }
    }
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

/// Mean loss of the first and last tenth of the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SftReport {
    pub first_loss: f64,
    pub last_loss: f64,
    pub steps: usize,
    pub seconds: f64,
}

/// Cross-entropy on the solution tokens (prompt tokens are not trained on).
pub fn sft(
    policy: &mut Policy,
    examples: &[Example],
    cfg: &SftConfig,
    trainable: impl Fn(&str) -> bool,
) -> Result<SftReport> {
    if examples.is_empty() {
        bail!("SFT needs at least one example");
    }
    if cfg.steps == 0 || cfg.batch_size == 0 {
        bail!("SFT needs at least one step and a batch size of at least 1");
    }
    let vars = policy.model.make_trainable(trainable)?;
    let mut opt = AdamW::new(vars, cfg.optim)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = examples
        .iter()
        .map(|e| {
            Ok((
                policy.prompt_ids(&e.question)?,
                policy.target_ids(&e.answer)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut cursor = order.len();
    let mut losses = Vec::with_capacity(cfg.steps);
    let progress = Progress::new("sft", cfg.steps as u64, 0);
    let t0 = std::time::Instant::now();
    for step in 0..cfg.steps {
        let mut idx = Vec::with_capacity(cfg.batch_size);
        while idx.len() < cfg.batch_size {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            idx.push(order[cursor]);
            cursor += 1;
        }
        let lens: Vec<(usize, usize)> = idx
            .iter()
            .map(|&i| (pairs[i].0.len(), pairs[i].1.len()))
            .collect();
        // Every target token of the batch weighs the same: each micro-batch's summed
        // log-likelihood is divided by the batch's token count.
        let n = lens.iter().map(|l| l.1).sum::<usize>().max(1) as f64;
        let plan = plan_micro_batches(&lens, 0, cfg.micro_batch_tokens);
        let seed = crate::seed::mix_seed(&[cfg.seed, step as u64]);
        let mut acc = opt.zero_accumulator();
        let mut lv = 0.0;
        for rows in &plan {
            let prompts: Vec<Vec<u32>> = rows.iter().map(|&r| pairs[idx[r]].0.clone()).collect();
            let targets: Vec<Vec<u32>> = rows.iter().map(|&r| pairs[idx[r]].1.clone()).collect();
            let batch = build_batch(&prompts, &targets, policy.tok.pad_id, &policy.model.device)?;
            let (logp, _) = completion_logprobs(&policy.model, &batch, Forward::training(seed))?;
            let mask = Tensor::from_vec(batch.completion_mask_f32(), logp.shape(), logp.device())?
                .to_dtype(logp.dtype())?;
            let loss = ((logp * mask)?.sum_all()? / -n)?;
            lv += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if plan.len() == 1 {
                opt.step(&loss.backward()?, lr_at(&cfg.optim, step, cfg.steps))?;
            } else {
                opt.accumulate(&mut acc, &loss.backward()?)?;
            }
        }
        if plan.len() > 1 {
            opt.step_accumulated(&acc, lr_at(&cfg.optim, step, cfg.steps))?;
        }
        losses.push(lv);
        if step % 10 == 0 || step + 1 == cfg.steps {
            progress.update(step as u64 + 1, &format!("loss {lv:.3}"));
        }
    }
    progress.finish();
    let tenth = (losses.len() / 10).max(1);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    Ok(SftReport {
        first_loss: mean(&losses[..tenth]),
        last_loss: mean(&losses[losses.len() - tenth..]),
        steps: cfg.steps,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
