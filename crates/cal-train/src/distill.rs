//! Distillation (`cal-grpo distill`): a student trained toward a frozen teacher on the
//! data's solutions, with Tunix's three strategies, on the SFT harness (the loop,
//! checkpoints, resume, logs are [`crate::sft`]'s; only the objective differs).
//!
//! Each strategy's loss is `α·D + (1 − α)·CE`, CE the student's cross-entropy on the
//! solution tokens (SFT's loss) and D:
//!
//! ```text
//! logit      τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))    mean over solution tokens
//! attention  Σ_k (P·A_S − A_T)²                          mean over mapped layers, teacher
//!                                                        heads and real query tokens
//! feature    ‖W·pool(h_S) − pool(h_T)‖² / d_T           mean over mapped layers and rows
//! ```
//!
//! A are attention probabilities `[heads, T, T]` of a mapped layer pair; P `[H_T, H_S]`
//! a learned head projection (none when the head counts match); h the residual stream
//! after a mapped layer, pooled as the mean over a row's real tokens; W `[d_T, d_S]` a
//! learned projection (the identity at the start when the widths match). P and W train
//! with the student and are saved in its checkpoints, not in the exported student.
//! `scripts/make_distill_fixtures.py` checks the three losses and their gradients.

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::sft::{BatchTotals, Objective};
use anyhow::{bail, Result};
use cal_core::data::Example;
use cal_model::generate::{build_batch, SequenceBatch};
use cal_model::tokenizer::TokenizerBundle;
use cal_model::vocab::token_logprobs;
use cal_model::{Forward, Transformer};
use candle_core::{DType, Tensor, Var};

pub mod losses;
pub use losses::{
    attention_sq_sum, layer_map, logit_kl_sum, parse_layers, pooled_feature_sq_sum, Strategy,
};

/// Stops unless teacher and student tokenise alike (the same vocabulary, token for
/// token): logits and positions must mean the same thing on both sides.
pub fn check_same_tokenizer(
    teacher: (&str, &TokenizerBundle),
    student: (&str, &TokenizerBundle),
) -> Result<()> {
    let (vt, vs) = (
        teacher.1.tokenizer.get_vocab(true),
        student.1.tokenizer.get_vocab(true),
    );
    if vt != vs {
        let differ = vt.iter().filter(|(k, v)| vs.get(*k) != Some(v)).count();
        bail!(
            "the teacher ({}) and the student ({}) have different tokenizers: {} and {} \
             tokens, {differ} of the teacher's missing or numbered differently in the \
             student's; distillation needs one vocabulary",
            teacher.0,
            student.0,
            vt.len(),
            vs.len()
        );
    }
    Ok(())
}

/// The distillation objective of the SFT loop.
pub struct Distiller {
    pub teacher: Transformer,
    pub strategy: Strategy,
    pub tau: f64,
    pub alpha: f64,
    /// Student → teacher layer pairs (attention and feature).
    pub map: Vec<(usize, usize)>,
    /// Learned projections, one per layer pair (attention: only where the head counts
    /// differ; feature: always).
    proj: Vec<Option<(String, Var)>>,
}

impl Distiller {
    pub fn new(
        teacher: Transformer,
        student: &Transformer,
        cfg: &crate::config::DistillSection,
        map: Vec<(usize, usize)>,
        seed: u64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.alpha) {
            bail!("--distill-alpha must be in [0, 1], got {}", cfg.alpha);
        }
        if cfg.temperature.is_nan() || cfg.temperature <= 0.0 {
            bail!(
                "--distill-temperature must be positive, got {}",
                cfg.temperature
            );
        }
        let (ts, ss) = (&teacher.cfg, &student.cfg);
        let dev = &student.device;
        let dtype = student.master_dtype();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let mut proj = Vec::with_capacity(map.len());
        for (i, _) in map.iter().enumerate() {
            let p = match cfg.strategy {
                Strategy::Logit => None,
                Strategy::Attention => {
                    let (ht, hs) = (ts.num_attention_heads, ss.num_attention_heads);
                    (ht != hs)
                        .then(|| {
                            // teacher head j starts as the student head at the same depth
                            let w: Vec<f32> = (0..ht * hs)
                                .map(|x| f32::from(u8::from(x % hs == (x / hs) * hs / ht)))
                                .collect();
                            Tensor::from_vec(w, (ht, hs), dev)
                        })
                        .transpose()?
                }
                Strategy::Feature => {
                    let (dt, ds) = (ts.hidden_size, ss.hidden_size);
                    Some(if dt == ds {
                        Tensor::eye(dt, DType::F32, dev)?
                    } else {
                        let w = cal_model::model::rand_distr_lite::normal_vec(
                            &mut rng,
                            dt * ds,
                            (ds as f64).powf(-0.5),
                        );
                        Tensor::from_vec(w, (dt, ds), dev)?
                    })
                }
            };
            proj.push(match p {
                Some(t) => Some((
                    format!("distill.projection.{i}"),
                    Var::from_tensor(&t.to_dtype(dtype)?)?,
                )),
                None => None,
            });
        }
        Ok(Self {
            teacher,
            strategy: cfg.strategy,
            tau: cfg.temperature,
            alpha: cfg.alpha,
            map,
            proj,
        })
    }
}

/// The rows of `hidden: [B, T, H]` that predict the batch's real completion tokens, as
/// `[N, H]`, and those tokens `[N]`.
fn completion_rows(hidden: &Tensor, batch: &SequenceBatch) -> Result<(Tensor, Tensor)> {
    let (b, tc) = (batch.completion_mask.len(), batch.completion_len);
    let h = hidden.narrow(1, batch.prompt_len - 1, tc)?;
    let h = h.reshape((b * tc, h.dim(2)?))?;
    let idx: Vec<u32> = batch
        .completion_mask
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, &m)| m == 1)
        .map(|(i, _)| i as u32)
        .collect();
    let idx = Tensor::new(idx.as_slice(), hidden.device())?;
    let ids = batch.completion_ids.flatten_all()?.index_select(&idx, 0)?;
    Ok((h.index_select(&idx, 0)?, ids))
}

impl Objective for Distiller {
    fn loss(
        &self,
        policy: &Policy,
        batch: &SequenceBatch,
        totals: &BatchTotals,
        seed: u64,
    ) -> Result<(Tensor, Metrics)> {
        let student = &policy.model;
        // the loss in the student's master dtype (f32 for half precision; f64 in the
        // finite-difference tests)
        let dt = student.master_dtype();
        let attention = self.strategy == Strategy::Attention;
        let (sl, tl): (Vec<usize>, Vec<usize>) = match self.strategy {
            Strategy::Logit => (Vec::new(), Vec::new()),
            _ => self.map.iter().copied().unzip(),
        };
        let s = student.forward_probe(
            &batch.ids,
            &batch.mask,
            Forward::training(seed),
            &sl,
            attention,
        )?;
        let t = self.teacher.forward_probe(
            &batch.ids,
            &batch.mask,
            Forward::INFERENCE,
            &tl,
            attention,
        )?;
        let (s_rows, targets) = completion_rows(&s.hidden, batch)?;
        let (t_rows, _) = completion_rows(&t.hidden.detach(), batch)?;
        let s_logits = student.logits(&s_rows)?.to_dtype(dt)?;
        let t_logits = self.teacher.logits(&t_rows)?.detach().to_dtype(dt)?;
        let n = totals.target_tokens;
        let ce = (token_logprobs(&s_logits, &targets)?.sum_all()? / -n)?;
        let kl1 = logit_kl_sum(&s_logits.detach(), &t_logits, 1.0)?;
        let rows = Tensor::from_vec(
            batch
                .mask
                .iter()
                .flatten()
                .map(|&m| f32::from(m))
                .collect::<Vec<f32>>(),
            (batch.mask.len(), batch.mask[0].len()),
            &student.device,
        )?
        .to_dtype(dt)?;
        let pairs = self.map.len().max(1) as f64;
        let term = match self.strategy {
            Strategy::Logit => {
                (logit_kl_sum(&s_logits, &t_logits, self.tau)? * (self.tau * self.tau / n))?
            }
            Strategy::Attention => {
                let heads = self.teacher.cfg.num_attention_heads as f64;
                let mut sum = Tensor::zeros((), dt, &student.device)?;
                for (i, (a_s, a_t)) in s.attention.iter().zip(&t.attention).enumerate() {
                    let p = self.proj[i].as_ref().map(|(_, v)| v.as_tensor());
                    let a_s = a_s.to_dtype(dt)?;
                    let a_t = a_t.to_dtype(dt)?;
                    sum = (sum + attention_sq_sum(&a_s, &a_t, p, &rows)?)?;
                }
                (sum / (totals.tokens * heads * pairs))?
            }
            Strategy::Feature => {
                let width = self.teacher.cfg.hidden_size as f64;
                let mut sum = Tensor::zeros((), dt, &student.device)?;
                for (i, (h_s, h_t)) in s.layers.iter().zip(&t.layers).enumerate() {
                    let Some((_, w)) = &self.proj[i] else {
                        bail!("feature strategy without a projection for layer pair {i}");
                    };
                    let (h_s, h_t) = (h_s.to_dtype(dt)?, h_t.to_dtype(dt)?);
                    sum = (sum + pooled_feature_sq_sum(&h_s, &h_t, w.as_tensor(), &rows)?)?;
                }
                (sum / (totals.rows * width * pairs))?
            }
        };
        let loss = ((&term * self.alpha)? + (&ce * (1.0 - self.alpha))?)?;
        let scalar =
            |x: &Tensor| -> Result<f64> { Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let m = Metrics::from([
            ("distill/kl".to_string(), scalar(&kl1)? / n),
            ("distill/ce".to_string(), scalar(&ce)?),
            ("distill/term".to_string(), scalar(&term)?),
        ]);
        Ok((loss, m))
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.proj.iter().flatten().cloned().collect()
    }

    fn name(&self) -> &'static str {
        "distill"
    }

    /// The student's KL to the teacher (τ = 1) on the held-out solutions, per token:
    /// `eval/distill/kl`.
    fn held_out(&self, policy: &Policy, examples: &[Example]) -> Result<Metrics> {
        let (mut kl, mut n) = (0.0, 0usize);
        for chunk in examples.chunks(8) {
            let prompts = chunk
                .iter()
                .map(|e| policy.prompt_ids(&e.question))
                .collect::<Result<Vec<_>>>()?;
            let targets = chunk
                .iter()
                .map(|e| policy.target_ids(&e.answer))
                .collect::<Result<Vec<_>>>()?;
            let batch = build_batch(&prompts, &targets, policy.tok.pad_id, &policy.model.device)?;
            let dt = policy.model.master_dtype();
            let logits = |m: &Transformer| -> Result<Tensor> {
                let h = m.forward_probe(&batch.ids, &batch.mask, Forward::INFERENCE, &[], false)?;
                let (rows, _) = completion_rows(&h.hidden.detach(), &batch)?;
                Ok(m.logits(&rows)?.detach().to_dtype(dt)?)
            };
            let sum = logit_kl_sum(&logits(&policy.model)?, &logits(&self.teacher)?, 1.0)?;
            kl += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n += targets.iter().map(Vec::len).sum::<usize>();
        }
        Ok(Metrics::from([(
            "eval/distill/kl".to_string(),
            kl / n.max(1) as f64,
        )]))
    }
}
