//! The GRPO / CAL-GRPO training loop. One code path: the credit mode decides whether
//! oracle spans are used.
//!
//! One step:
//!
//! ```text
//! prompts ─► generate (G per prompt) ─► grade ─► locate (oracle, concurrent with the
//! reference pass) ─► map (span → tokens) ─► credit ([B, T] advantages) ─► loss ─►
//! update ─► log, checkpoint
//! ```

use crate::checkpoint::{self, TrainState};
use crate::log::{JsonlLog, Progress, TensorBoard};
use crate::loss::{policy_loss, LossConfig};
use crate::policy::Policy;
use crate::update::{lr_at, AdamW, OptimConfig};
use anyhow::{bail, Context, Result};
use cal_core::credit::{token_advantages, CreditConfig, RolloutCredit};
use cal_core::data::Example;
use cal_core::grade::grade;
use cal_core::locate::LocateConfig;
use cal_core::map::map_span;
use cal_model::generate::{
    build_batch, completion_logprobs, training_logprobs, Generation, SamplingConfig,
};
use cal_model::{LoraConfig, Transformer};
use cal_oracle::{locate_all, Oracle, OracleRequest, OracleSpec, SpanOutcome};
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoConfig {
    pub steps: usize,
    /// Prompts per step (B); each gets `num_generations` completions.
    pub prompts_per_step: usize,
    pub num_generations: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub credit: CreditConfig,
    /// Cap on penalised span tokens (0 = none).
    pub max_error_span: usize,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    /// Policy updates per generated batch (> 1 reuses stored old log-probs).
    pub num_iterations: usize,
    pub seed: u64,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    pub lora: Option<LoraConfig>,
    pub oracle: OracleSpec,
    pub locate: LocateConfig,
    /// Rows per generation call (memory bound).
    pub generation_batch: usize,
    /// Rows per forward/backward of the loss (0 = all at once); gradients are
    /// accumulated exactly.
    #[serde(default)]
    pub micro_batch: usize,
}

/// Everything logged for one step.
pub type Metrics = BTreeMap<String, f64>;

pub struct Trainer {
    pub cfg: GrpoConfig,
    pub policy: Policy,
    reference: Option<Transformer>,
    opt: AdamW,
    data: Vec<Example>,
    cursor: usize,
    rng: rand_chacha::ChaCha8Rng,
    pub step: usize,
    oracle: Arc<dyn Oracle>,
    rt: tokio::runtime::Runtime,
    pub out_dir: PathBuf,
    tb: TensorBoard,
    jsonl: JsonlLog,
    skipped: usize,
}

/// Set by SIGINT: the loop saves a checkpoint and stops after the current step.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What `run` ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    Interrupted,
}

impl Trainer {
    /// Builds the trainer; with `resume`, continues from the latest checkpoint in
    /// `out_dir` (an error if there is none).
    pub fn new(
        cfg: GrpoConfig,
        mut policy: Policy,
        data: Vec<Example>,
        out_dir: PathBuf,
        resume: bool,
    ) -> Result<Self> {
        if data.is_empty() {
            bail!("no training data");
        }
        if cfg.num_generations < 2 {
            bail!("num_generations must be at least 2");
        }
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        // The reference is a real frozen copy (full fine-tuning) or the same base with
        // adapters switched off (LoRA): never the policy being trained.
        let (reference, vars) = match &cfg.lora {
            Some(l) => {
                policy.model.add_lora(l.clone(), cfg.seed)?;
                let vars = policy.model.make_trainable(|k| k.contains(".lora_"))?;
                (None, vars)
            }
            None => {
                let reference = (cfg.loss.beta > 0.0)
                    .then(|| policy.model.frozen_copy())
                    .transpose()?;
                (reference, policy.model.make_trainable(|_| true)?)
            }
        };
        let mut opt = AdamW::new(vars, cfg.optim)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let (mut step, mut cursor, mut skipped) = (0, 0, 0);
        if resume {
            let ck = checkpoint::latest(&out_dir).with_context(|| {
                format!(
                    "--resume: no checkpoint in {}",
                    checkpoint::checkpoints_dir(&out_dir).display()
                )
            })?;
            let state = checkpoint::read_state(&ck)?;
            let weights = cal_model::load::load_safetensors(
                &ck.join("weights.safetensors"),
                policy.model.dtype,
                &policy.model.device,
            )?;
            for (name, var) in opt.vars() {
                let t = weights
                    .get(name)
                    .with_context(|| format!("{}: checkpoint lacks {name}", ck.display()))?;
                var.set(t)?;
            }
            opt.load_state(&ck.join("optimizer.safetensors"), state.step)?;
            rng = checkpoint::restore_rng(state.rng_seed, state.rng_stream, state.rng_word_pos);
            step = state.step;
            cursor = state.cursor;
            skipped = state.counters["skipped_steps"].as_u64().unwrap_or(0) as usize;
            eprintln!("resumed from {} (step {step})", ck.display());
        }
        let oracle = cfg.oracle.build().map_err(|e| anyhow::anyhow!(e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let tb = TensorBoard::create(&out_dir.join("tb"))?;
        let jsonl = JsonlLog::append(&out_dir.join("metrics.jsonl"))?;
        std::fs::write(
            out_dir.join("train_config.json"),
            serde_json::to_string_pretty(&cfg)?,
        )?;
        Ok(Self {
            cfg,
            policy,
            reference,
            opt,
            data,
            cursor,
            rng,
            step,
            oracle,
            rt,
            out_dir,
            tb,
            jsonl,
            skipped,
        })
    }

    /// The next `n` examples: a seeded shuffle per epoch, so the order depends only on
    /// the cursor (which checkpoints store).
    fn next_examples(&mut self, n: usize) -> Vec<Example> {
        let len = self.data.len();
        let mut out = Vec::with_capacity(n);
        let mut order_epoch = usize::MAX;
        let mut order: Vec<usize> = Vec::new();
        for _ in 0..n {
            let (epoch, pos) = (self.cursor / len, self.cursor % len);
            if epoch != order_epoch {
                order = (0..len).collect();
                order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
                    self.cfg.seed ^ (epoch as u64) << 20,
                ));
                order_epoch = epoch;
            }
            out.push(self.data[order[pos]].clone());
            self.cursor += 1;
        }
        out
    }

    /// Runs until `cfg.steps` (or SIGINT), checkpointing as configured.
    pub fn run(&mut self) -> Result<RunEnd> {
        let progress = Progress::new(
            if self.cfg.credit.mode.uses_spans() {
                "cal"
            } else {
                "grpo"
            },
            self.cfg.steps as u64,
            self.step as u64,
        );
        while self.step < self.cfg.steps {
            let m = self.train_step()?;
            progress.update(
                self.step as u64,
                &format!(
                    "acc {:.2} all-wrong {:.2} loss {:+.4} {:.1}s",
                    m["reward/accuracy"],
                    m["groups/all_wrong_frac"],
                    m["loss/total"],
                    m["perf/step_seconds"]
                ),
            );
            let every = self.cfg.save_every;
            if (every > 0 && self.step.is_multiple_of(every)) || self.step == self.cfg.steps {
                self.save()?;
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                progress.finish();
                let dir = self.save()?;
                eprintln!(
                    "interrupted: checkpoint saved to {}; continue with --resume",
                    dir.display()
                );
                return Ok(RunEnd::Interrupted);
            }
        }
        progress.finish();
        Ok(RunEnd::Finished)
    }

    pub fn save(&self) -> Result<PathBuf> {
        let (seed, stream, pos) = checkpoint::rng_state(&self.rng);
        let state = TrainState {
            step: self.step,
            cursor: self.cursor,
            rng_seed: seed,
            rng_stream: stream,
            rng_word_pos: pos,
            config: serde_json::to_value(&self.cfg)?,
            counters: serde_json::json!({"skipped_steps": self.skipped}),
        };
        let weights: cal_model::Params = self
            .opt
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(&self.out_dir, &state, &weights, &self.opt.state())
    }

    /// Trainable parameters by name (for tests and export).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.opt
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// One GRPO step: sample, then [`Trainer::learn`] from the samples.
    pub fn train_step(&mut self) -> Result<Metrics> {
        let t0 = Instant::now();
        let g = self.cfg.num_generations;
        let examples = self.next_examples(self.cfg.prompts_per_step);
        let prompts: Vec<Vec<u32>> = examples
            .iter()
            .flat_map(|e| std::iter::repeat_n(e, g))
            .map(|e| self.policy.prompt_ids(&e.question))
            .collect::<Result<_>>()?;

        // generate
        let sampling = SamplingConfig {
            max_new_tokens: self.cfg.max_new_tokens,
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            ..SamplingConfig::default()
        };
        let gens: Vec<Generation> = self.policy.sample(
            &prompts,
            &sampling,
            self.cfg.generation_batch,
            &mut self.rng,
        )?;
        let t_gen = t0.elapsed().as_secs_f64();
        let mut m = self.learn(&examples, &prompts, &gens)?;
        let n_tokens: usize = gens.iter().map(|x| x.ids.len()).sum();
        m.insert("perf/step_seconds".into(), t0.elapsed().as_secs_f64());
        m.insert("perf/generate_seconds".into(), t_gen);
        m.insert(
            "perf/tokens_per_second".into(),
            n_tokens as f64 / t_gen.max(1e-9),
        );
        self.tb.scalars(self.step as i64, &m)?;
        let mut row = serde_json::to_value(&m)?;
        row["step"] = serde_json::json!(self.step);
        self.jsonl.write(&row)?;
        Ok(m)
    }

    /// Everything after sampling: grade → locate → map → credit → loss → update.
    /// `gens[i]` answers `examples[i / G]` with prompt `prompts[i]`. Public so that a
    /// test can feed hand-written completions.
    pub fn learn(
        &mut self,
        examples: &[Example],
        prompts: &[Vec<u32>],
        gens: &[Generation],
    ) -> Result<Metrics> {
        let g = self.cfg.num_generations;
        if gens.len() != examples.len() * g || prompts.len() != gens.len() {
            bail!(
                "learn: {} completions for {} examples × {g} generations",
                gens.len(),
                examples.len()
            );
        }
        // grade
        let correct: Vec<bool> = gens
            .iter()
            .enumerate()
            .map(|(i, gen)| grade(&gen.text, &examples[i / g].final_answer).correct)
            .collect();
        let rewards: Vec<f64> = correct.iter().map(|&c| f64::from(u8::from(c))).collect();

        // locate: the oracle runs on the incorrect rollouts while the reference pass runs
        let wrong: Vec<usize> = (0..gens.len()).filter(|&i| !correct[i]).collect();
        let oracle_task = self.cfg.credit.mode.uses_spans().then(|| {
            let reqs: Vec<OracleRequest> = wrong
                .iter()
                .map(|&i| OracleRequest {
                    question: examples[i / g].question.clone(),
                    reference: examples[i / g].answer.clone(),
                    response: gens[i].text.clone(),
                })
                .collect();
            self.rt
                .spawn(locate_all(self.oracle.clone(), reqs, self.cfg.locate))
        });
        let completions: Vec<Vec<u32>> = gens.iter().map(|x| x.ids.clone()).collect();
        let batch = build_batch(
            prompts,
            &completions,
            self.policy.tok.pad_id,
            &self.policy.model.device,
        )?;
        // Micro-batches bound memory (the full-vocabulary log-softmax dominates); their
        // gradients are accumulated with weights that make the sum equal the full-batch
        // gradient.
        let rows = gens.len();
        let mb = if self.cfg.micro_batch == 0 {
            rows
        } else {
            self.cfg.micro_batch.min(rows)
        };
        let chunks: Vec<std::ops::Range<usize>> = (0..rows)
            .step_by(mb)
            .map(|s| s..(s + mb).min(rows))
            .collect();
        let micro: Vec<cal_model::generate::SequenceBatch> = if chunks.len() == 1 {
            vec![batch.clone()]
        } else {
            chunks
                .iter()
                .map(|r| {
                    build_batch(
                        &prompts[r.clone()],
                        &completions[r.clone()],
                        self.policy.tok.pad_id,
                        &self.policy.model.device,
                    )
                })
                .collect::<Result<_>>()?
        };
        let ref_logp: Vec<Option<Tensor>> = micro
            .iter()
            .map(|m| self.reference_logprobs(m))
            .collect::<Result<_>>()?;
        let old_logp: Vec<Option<Tensor>> = micro
            .iter()
            .map(|m| -> Result<Option<Tensor>> {
                Ok(if self.cfg.num_iterations > 1 {
                    Some(completion_logprobs(&self.policy.model, m)?.0.detach())
                } else {
                    None
                })
            })
            .collect::<Result<_>>()?;
        let outcomes: Vec<SpanOutcome> = match oracle_task {
            Some(task) => self.rt.block_on(task).context("oracle task")?,
            None => Vec::new(),
        };

        // map
        let mut spans: Vec<Option<std::ops::Range<usize>>> = vec![None; gens.len()];
        let mut om = OracleMetrics::default();
        for (&i, outcome) in wrong.iter().zip(&outcomes) {
            om.count(outcome);
            if let Some(r) = outcome.range() {
                match map_span(&gens[i].offsets, r, self.cfg.max_error_span) {
                    Some(ts) => {
                        om.capped += usize::from(ts.capped);
                        om.span_tokens += ts.len();
                        spans[i] = Some(ts.range());
                    }
                    None => om.unmappable += 1,
                }
            }
        }

        // credit
        let rollouts: Vec<RolloutCredit> = (0..gens.len())
            .map(|i| RolloutCredit {
                reward: rewards[i],
                correct: correct[i],
                mask: batch.completion_mask[i].iter().map(|&m| m == 1).collect(),
                span: spans[i].clone(),
            })
            .collect();
        let adv = token_advantages(&rollouts, g, &self.cfg.credit)?;
        let dev = &self.policy.model.device;
        let dtype = self.policy.model.dtype;
        let n_total: f64 = batch
            .completion_mask
            .iter()
            .flatten()
            .map(|&m| f64::from(m))
            .sum::<f64>()
            .max(1.0);
        // per micro-batch: (advantages, mask, weight of its loss in the full-batch loss)
        let mut parts = Vec::with_capacity(micro.len());
        for (r, m) in chunks.iter().zip(&micro) {
            let tc = m.completion_len;
            let mut a = Vec::with_capacity(r.len() * tc);
            for i in r.clone() {
                a.extend_from_slice(&adv.row(i)[..tc]);
            }
            let mask_f = m.completion_mask_f32();
            let n_mb: f64 = mask_f.iter().map(|&x| f64::from(x)).sum();
            let weight = match self.cfg.loss.aggregation {
                crate::loss::Aggregation::TokenMean => n_mb / n_total,
                _ => r.len() as f64 / rows as f64,
            };
            parts.push((
                Tensor::from_vec(a, (r.len(), tc), dev)?.to_dtype(dtype)?,
                Tensor::from_vec(mask_f, (r.len(), tc), dev)?.to_dtype(dtype)?,
                weight,
                n_mb,
            ));
        }

        // loss + update
        let lr = lr_at(&self.cfg.optim, self.step, self.cfg.steps);
        let (mut loss_v, mut kl, mut clip, mut grad_norm, mut entropy) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut skipped_now = 0.0;
        'iterations: for it in 0..self.cfg.num_iterations.max(1) {
            let mut acc = self.opt.zero_accumulator();
            let (mut lv_sum, mut kl_sum, mut clip_sum, mut ent_sum) = (0.0, 0.0, 0.0, 0.0);
            for (k, m) in micro.iter().enumerate() {
                let (adv_t, mask_t, weight, n_mb) = &parts[k];
                // LoRA dropout masks: a pure function of (seed, step, iteration, micro-batch).
                let seed = mix_seed(&[self.cfg.seed, self.step as u64, it as u64, k as u64]);
                let (logp, ent) = training_logprobs(&mut self.policy.model, m, seed)?;
                let old = old_logp[k].clone().unwrap_or_else(|| logp.detach());
                let out = policy_loss(
                    &logp,
                    &old,
                    ref_logp[k].as_ref(),
                    adv_t,
                    mask_t,
                    &self.cfg.loss,
                )?;
                let lv = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !lv.is_finite() {
                    self.skipped += 1;
                    skipped_now = 1.0;
                    tracing::warn!(step = self.step, "non-finite loss; step skipped");
                    break 'iterations;
                }
                let loss = if micro.len() == 1 {
                    out.loss
                } else {
                    (out.loss * *weight)?
                };
                self.opt.accumulate(&mut acc, &loss.backward()?)?;
                let share = n_mb / n_total;
                lv_sum += lv * weight;
                kl_sum += out.kl * share;
                clip_sum += out.clip_fraction * share;
                ent_sum += (ent * mask_t)?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            grad_norm = self.opt.step_accumulated(&acc, lr)?;
            loss_v = lv_sum;
            kl = kl_sum;
            clip = clip_sum;
            entropy = ent_sum / n_total;
        }
        self.step += 1;

        // log
        let n_tokens: usize = gens.iter().map(|x| x.ids.len()).sum();
        let groups: Vec<&[bool]> = correct.chunks(g).collect();
        let frac = |f: &dyn Fn(&&[bool]) -> bool| {
            groups.iter().filter(|x| f(x)).count() as f64 / groups.len() as f64
        };
        let mean_r = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let std_r = (rewards.iter().map(|r| (r - mean_r).powi(2)).sum::<f64>()
            / rewards.len() as f64)
            .sqrt();
        let mut m = Metrics::new();
        m.insert("reward/mean".into(), mean_r);
        m.insert("reward/std".into(), std_r);
        m.insert("reward/accuracy".into(), mean_r);
        m.insert(
            "groups/all_wrong_frac".into(),
            frac(&|x| x.iter().all(|c| !c)),
        );
        m.insert(
            "groups/all_right_frac".into(),
            frac(&|x| x.iter().all(|c| *c)),
        );
        m.insert("loss/total".into(), loss_v);
        m.insert("loss/kl".into(), kl);
        m.insert("loss/clip_fraction".into(), clip);
        m.insert("policy/entropy".into(), entropy);
        m.insert(
            "completion/mean_length".into(),
            n_tokens as f64 / gens.len() as f64,
        );
        m.insert("optim/grad_norm".into(), grad_norm);
        m.insert("optim/lr".into(), lr);
        m.insert("optim/skipped_steps".into(), self.skipped as f64);
        m.insert("optim/skipped_now".into(), skipped_now);
        m.insert("credit/fallbacks".into(), adv.fallbacks as f64);
        m.insert("credit/span_credited".into(), adv.span_credited as f64);
        om.write(&mut m);
        Ok(m)
    }

    fn reference_logprobs(
        &mut self,
        batch: &cal_model::generate::SequenceBatch,
    ) -> Result<Option<Tensor>> {
        if self.cfg.loss.beta <= 0.0 {
            return Ok(None);
        }
        let lp = match &self.reference {
            Some(r) => completion_logprobs(r, batch)?.0,
            None => {
                // LoRA: the base model is the reference
                self.policy.model.lora_enabled = false;
                let out = completion_logprobs(&self.policy.model, batch);
                self.policy.model.lora_enabled = true;
                out?.0
            }
        };
        Ok(Some(lp.detach()))
    }
}

/// Oracle and span counters of one step.
#[derive(Default)]
struct OracleMetrics {
    calls: usize,
    cache_hits: usize,
    failures: usize,
    no_error: usize,
    located: usize,
    not_located: usize,
    unmappable: usize,
    capped: usize,
    span_tokens: usize,
    latency_ms: f64,
    cost: f64,
}

impl OracleMetrics {
    fn count(&mut self, o: &SpanOutcome) {
        self.calls += 1;
        if let Some(u) = o.usage() {
            self.cache_hits += usize::from(u.cached);
            self.latency_ms += u.latency.as_secs_f64() * 1e3;
            self.cost += u.cost_usd;
        }
        match o {
            SpanOutcome::Located { .. } => self.located += 1,
            SpanOutcome::NoError { .. } => self.no_error += 1,
            SpanOutcome::NotLocated { .. } => self.not_located += 1,
            SpanOutcome::Failed { failure } => {
                self.failures += 1;
                tracing::warn!("oracle failed ({}): {failure}", failure.kind());
            }
        }
    }

    fn write(&self, m: &mut Metrics) {
        let located = self.located - self.unmappable;
        m.insert("oracle/calls".into(), self.calls as f64);
        m.insert("oracle/cache_hits".into(), self.cache_hits as f64);
        m.insert("oracle/failures".into(), self.failures as f64);
        m.insert("oracle/no_error".into(), self.no_error as f64);
        m.insert(
            "oracle/latency_ms".into(),
            self.latency_ms / self.calls.max(1) as f64,
        );
        m.insert("oracle/cost_usd".into(), self.cost);
        m.insert("spans/located".into(), located as f64);
        m.insert(
            "spans/not_located".into(),
            (self.not_located + self.unmappable) as f64,
        );
        m.insert("spans/capped".into(), self.capped as f64);
        m.insert(
            "spans/mean_tokens".into(),
            self.span_tokens as f64 / located.max(1) as f64,
        );
    }
}

/// Default optimiser settings for RL fine-tuning.
pub fn default_optim(lr: f64) -> OptimConfig {
    OptimConfig {
        lr,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        warmup_steps: 0,
        min_lr_ratio: 0.1,
        ..OptimConfig::default()
    }
}

/// SplitMix64-style mixing of several integers into one seed.
pub fn mix_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &p| {
        let mut z = h ^ p.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(h << 6);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}
