//! On-policy distillation on the algorithm seam (`train --algorithm on-policy-distill
//! --teacher T`): the student samples, a frozen teacher scores each sampled token, and
//! the token's reward is `log π_T(y_t) − log π_S(y_t)` (the per-token reverse KL, as in
//! GKD with λ = 1 and on-policy distillation). That is the currency CAL's spans pay in:
//! the reward is added, `distill.weight` times, to GRPO's advantages (outcome credit,
//! or CAL's span credit with `--use-cal`), token by token and not group-normalised.
//! `--distill-weight 0` is GRPO; a large weight is distillation alone.

use super::{grpo::Grpo, Algorithm, Scored};
use crate::config::RunConfig;
use crate::metrics::Metrics;
use crate::optimize::{Loss, MicroBatch};
use crate::policy::Policy;
use anyhow::{bail, Context, Result};
use cal_core::credit::AdvantageMatrix;
use cal_model::generate::completion_logprobs;
use cal_model::{Forward, Transformer};
use candle_core::DType;

pub struct OnPolicyDistill {
    teacher: Transformer,
    weight: f64,
    metrics: Metrics,
}

impl OnPolicyDistill {
    /// Loads `distill.teacher` (a Hugging Face folder or `.gguf` file) beside `policy`,
    /// on its device and dtype; refuses a teacher of another vocabulary.
    pub fn new(cfg: &RunConfig, policy: &Policy) -> Result<Self> {
        let name = &cfg.distill.teacher;
        if name.is_empty() {
            bail!("--algorithm on-policy-distill needs --teacher (a Hugging Face folder or .gguf file)");
        }
        let l = cal_model::load::load(
            std::path::Path::new(name),
            policy.model.dtype,
            &policy.model.device,
        )
        .with_context(|| format!("--teacher {name}: cannot load it"))?;
        crate::distill::check_same_tokenizer((name, &l.tokenizer), (&cfg.model.name, &policy.tok))?;
        if l.model.cfg.vocab_size != policy.model.cfg.vocab_size {
            bail!(
                "--teacher {name} has {} logits per token, the policy {}",
                l.model.cfg.vocab_size,
                policy.model.cfg.vocab_size
            );
        }
        Ok(Self {
            teacher: l.model,
            weight: cfg.distill.weight,
            metrics: Metrics::new(),
        })
    }
}

impl Loss for OnPolicyDistill {}

impl Algorithm for OnPolicyDistill {
    fn advantages(
        &mut self,
        s: &Scored,
        policy: &Policy,
        micro: &mut [MicroBatch],
        cfg: &RunConfig,
    ) -> Result<AdvantageMatrix> {
        let mut adv = Grpo.advantages(s, policy, micro, cfg)?;
        let (mut kl, mut tokens) = (0.0f64, 0.0f64);
        for mb in micro.iter() {
            let lp = |m: &Transformer| -> Result<Vec<Vec<f64>>> {
                let (l, _) = completion_logprobs(m, &mb.batch, Forward::INFERENCE)?;
                Ok(l.detach().to_dtype(DType::F64)?.to_vec2()?)
            };
            let (student, teacher) = (lp(&policy.model)?, lp(&self.teacher)?);
            for (j, &row) in mb.rows.iter().enumerate() {
                for (t, &m) in mb.batch.completion_mask[j].iter().enumerate() {
                    if m == 1 && t < adv.cols {
                        let r = teacher[j][t] - student[j][t];
                        adv.data[row * adv.cols + t] += (self.weight * r) as f32;
                        kl -= r;
                        tokens += 1.0;
                    }
                }
            }
        }
        // a sample estimate of KL(π_S ‖ π_T) per token, on the student's own samples
        self.metrics = Metrics::from([("distill/reverse_kl".to_string(), kl / tokens.max(1.0))]);
        Ok(adv)
    }

    fn metrics(&mut self) -> Metrics {
        std::mem::take(&mut self.metrics)
    }
}
