//! Supervised fine-tuning on reference solutions: the warm start that makes RL start
//! from a policy that is sometimes right and sometimes slips in one step.

use crate::adamw::{lr_at, AdamW, OptimConfig};
use crate::checkpoint::DataOrder;
use crate::collective::{any_rank, check_weights, divides_over, share, Collective, SingleProcess};
use crate::config::RunConfig;
use crate::evaluate::{evaluate, held_out_metrics, EvalConfig};
use crate::log::{Progress, RunLogs};
use crate::metrics::Metrics;
use crate::optimize::plan_micro_batches;
use crate::policy::Policy;
use crate::rundir::{self, RunLock, Start};
use crate::trainer::{RunEnd, INTERRUPTED};
use anyhow::{bail, Result};
use cal_core::data::Example;
use cal_core::evaluate::GradedExample;
use cal_model::generate::{build_batch, completion_logprobs, SequenceBatch};
use cal_model::Forward;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

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

/// A batch's totals, which every micro-batch's share of the loss is divided by.
#[derive(Debug, Clone, Copy)]
pub struct BatchTotals {
    /// Solution tokens (what the cross-entropy averages over).
    pub target_tokens: f64,
    /// Prompt and solution tokens.
    pub tokens: f64,
    /// Examples.
    pub rows: f64,
}

/// What a supervised step minimises: SFT's cross-entropy, or a distillation loss
/// ([`crate::distill`]). `loss` returns one micro-batch's share of the batch loss
/// (so that the micro-batches' gradients add up to the batch's) and metric sums.
pub trait Objective {
    fn loss(
        &self,
        policy: &Policy,
        batch: &SequenceBatch,
        totals: &BatchTotals,
        seed: u64,
    ) -> Result<(Tensor, Metrics)>;
    /// Parameters of the objective's own, trained with the policy's (a projection).
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The run's name in logs and the progress bar (`sft/loss`, `distill/loss`).
    fn name(&self) -> &'static str {
        "sft"
    }
    /// Metrics of the held-out examples' solutions beside the greedy accuracy
    /// (distillation: the KL to the teacher), logged as `eval/*`.
    fn held_out(&self, _policy: &Policy, _examples: &[Example]) -> Result<Metrics> {
        Ok(Metrics::new())
    }
}

/// SFT's loss: the negative log-likelihood of the solution tokens, averaged over the
/// batch's solution tokens (prompt tokens are not trained on).
pub struct CrossEntropy;

impl Objective for CrossEntropy {
    fn loss(
        &self,
        policy: &Policy,
        batch: &SequenceBatch,
        totals: &BatchTotals,
        seed: u64,
    ) -> Result<(Tensor, Metrics)> {
        let (logp, _) = completion_logprobs(&policy.model, batch, Forward::training(seed))?;
        let mask = Tensor::from_vec(batch.completion_mask_f32(), logp.shape(), logp.device())?
            .to_dtype(logp.dtype())?;
        let loss = ((logp * mask)?.sum_all()? / -totals.target_tokens)?;
        Ok((loss, Metrics::new()))
    }
}

/// SFT between two steps: the optimizer, the data order and the step. It is what a
/// checkpoint stores, so a resumed run draws the same batches as an uninterrupted one.
pub struct SftLoop {
    cfg: SftConfig,
    objective: Box<dyn Objective>,
    opt: AdamW,
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
    data: DataOrder,
    pub step: usize,
    /// The ranks of a data-parallel run: each takes an equal share of every batch.
    ranks: Arc<dyn Collective>,
}

impl SftLoop {
    /// Tokenises `examples` with the policy's prompt and makes `trainable` trainable;
    /// the loss is the cross-entropy of the solutions.
    pub fn new(
        policy: &mut Policy,
        examples: &[Example],
        cfg: &SftConfig,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        Self::with_objective(policy, examples, cfg, trainable, Box::new(CrossEntropy))
    }

    /// [`SftLoop::new`] minimising `objective` (its own parameters, if any, trained
    /// beside the policy's and saved in its checkpoints).
    pub fn with_objective(
        policy: &mut Policy,
        examples: &[Example],
        cfg: &SftConfig,
        trainable: impl Fn(&str) -> bool,
        objective: Box<dyn Objective>,
    ) -> Result<Self> {
        if examples.is_empty() {
            bail!("SFT needs at least one example");
        }
        if cfg.steps == 0 || cfg.batch_size == 0 {
            bail!("SFT needs at least one step and a batch size of at least 1");
        }
        let mut vars = policy.model.make_trainable(trainable)?;
        vars.extend(objective.vars());
        let opt = AdamW::new(vars, cfg.optim)?;
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = examples
            .iter()
            .map(|e| {
                Ok((
                    policy.prompt_ids(&e.question)?,
                    policy.target_ids(&e.answer)?,
                ))
            })
            .collect::<Result<_>>()?;
        let n = pairs.len();
        Ok(Self {
            cfg: cfg.clone(),
            objective,
            opt,
            pairs,
            data: DataOrder::new(n, cfg.seed),
            step: 0,
            ranks: Arc::new(SingleProcess),
        })
    }

    /// The loop as one rank of `ranks`: each step's batch (in the global order) is
    /// split into equal shares, and the gradients and batch totals summed over them.
    pub fn on(mut self, ranks: Arc<dyn Collective>) -> Result<Self> {
        divides_over("--batch-size", self.cfg.batch_size, ranks.world())?;
        self.ranks = ranks;
        Ok(self)
    }

    pub fn done(&self) -> bool {
        self.step >= self.cfg.steps
    }

    /// One optimizer step on the next batch; returns its loss (for SFT the mean
    /// negative log-likelihood per target token).
    pub fn step(&mut self, policy: &Policy) -> Result<f64> {
        Ok(self.step_metrics(policy)?.0)
    }

    /// [`SftLoop::step`] with the objective's metrics, summed over micro-batches.
    pub fn step_metrics(&mut self, policy: &Policy) -> Result<(f64, Metrics)> {
        let cfg = &self.cfg;
        let c = self.ranks.clone();
        let mut idx = self.data.next_batch(cfg.batch_size);
        idx = idx[share(idx.len(), c.rank(), c.world())].to_vec();
        let pairs = &self.pairs;
        let lens: Vec<(usize, usize)> = idx
            .iter()
            .map(|&i| (pairs[i].0.len(), pairs[i].1.len()))
            .collect();
        // Every target token of the batch weighs the same: each micro-batch's summed
        // loss is divided by the batch's totals.
        let mut sums = [
            lens.iter().map(|l| l.1).sum::<usize>() as f64,
            lens.iter().map(|l| l.0 + l.1).sum::<usize>() as f64,
            lens.len() as f64,
        ];
        if c.world() > 1 {
            c.all_reduce_sum_f64(&mut sums)?; // the whole batch's, over the ranks
        }
        let totals = BatchTotals {
            target_tokens: sums[0].max(1.0),
            tokens: sums[1].max(1.0),
            rows: sums[2],
        };
        let plan = plan_micro_batches(&lens, 0, cfg.micro_batch_tokens);
        let seed = crate::seed::mix_seed(&[cfg.seed, self.step as u64]);
        let lr = lr_at(&cfg.optim, self.step, cfg.steps);
        let mut acc = self.opt.zero_accumulator();
        let mut lv = 0.0;
        let mut metrics = Metrics::new();
        for rows in &plan {
            let prompts: Vec<Vec<u32>> = rows.iter().map(|&r| pairs[idx[r]].0.clone()).collect();
            let targets: Vec<Vec<u32>> = rows.iter().map(|&r| pairs[idx[r]].1.clone()).collect();
            let batch = build_batch(&prompts, &targets, policy.tok.pad_id, &policy.model.device)?;
            let (loss, m) = self.objective.loss(policy, &batch, &totals, seed)?;
            for (k, v) in m {
                *metrics.entry(k).or_insert(0.0) += v;
            }
            lv += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if plan.len() == 1 && c.world() == 1 {
                self.opt.step(&loss.backward()?, lr)?;
            } else {
                self.opt.accumulate(&mut acc, &loss.backward()?)?;
            }
        }
        if c.world() > 1 {
            self.opt.all_reduce(c.as_ref(), &mut acc)?;
            // the loss and the objective's metrics are each rank's part of the
            // batch's: summed (every rank logs the same keys)
            let mut v: Vec<f64> = std::iter::once(lv)
                .chain(metrics.values().copied())
                .collect();
            let mut n = [v.len() as f64];
            c.all_reduce_sum_f64(&mut n)?;
            if n[0] != (v.len() * c.world()) as f64 {
                bail!("the ranks' SFT steps logged different metrics");
            }
            c.all_reduce_sum_f64(&mut v)?;
            lv = v[0];
            metrics.values_mut().zip(&v[1..]).for_each(|(m, x)| *m = *x);
        }
        if plan.len() > 1 || c.world() > 1 {
            self.opt.step_accumulated(&acc, lr)?;
        }
        // the batch's target tokens over all ranks: what runs that sample (on-policy
        // distillation, GRPO) are compared against per token trained on
        metrics.insert("tokens/trained".into(), sums[0]);
        self.step += 1;
        Ok((lv, metrics))
    }

    /// Writes a checkpoint of the loop into `out/checkpoints` (the trained weights,
    /// the optimizer's moments, the data order and cursor, the RNG): rank 0 writes,
    /// every rank returns once it is written.
    pub fn save(&self, out: &Path, config: serde_json::Value) -> Result<PathBuf> {
        (self.data).save(out, self.step, &self.opt, config, self.ranks.as_ref())
    }

    /// The trained parameters by name (the policy's and the objective's).
    pub fn trainable(&self) -> Vec<(String, candle_core::Tensor)> {
        self.opt.tensors()
    }

    /// Continues from the latest checkpoint in `out` (weights, moments, order, RNG).
    pub fn resume(&mut self, out: &Path) -> Result<PathBuf> {
        let (dir, step, data) = self.data.resume(
            out,
            &mut self.opt,
            "examples",
            "--dataset and --num-samples",
        )?;
        (self.step, self.data) = (step, data);
        Ok(dir)
    }
}

/// Cross-entropy on the solution tokens (prompt tokens are not trained on), with no
/// run folder: the cached warm start of `tiny` and the tests.
pub fn sft(
    policy: &mut Policy,
    examples: &[Example],
    cfg: &SftConfig,
    trainable: impl Fn(&str) -> bool,
) -> Result<SftReport> {
    let mut lp = SftLoop::new(policy, examples, cfg, trainable)?;
    let mut losses = Vec::with_capacity(cfg.steps);
    let progress = Progress::new("sft", cfg.steps as u64, 0);
    let t0 = std::time::Instant::now();
    while !lp.done() {
        let lv = lp.step(policy)?;
        losses.push(lv);
        if lp.step % 10 == 1 || lp.done() {
            progress.update(lp.step as u64, &format!("loss {lv:.3}"));
        }
    }
    progress.finish();
    Ok(report(&losses, t0.elapsed().as_secs_f64()))
}

fn report(losses: &[f64], seconds: f64) -> SftReport {
    let tenth = (losses.len() / 10).max(1);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    SftReport {
        first_loss: mean(&losses[..tenth.min(losses.len())]),
        last_loss: mean(&losses[losses.len().saturating_sub(tenth)..]),
        steps: losses.len(),
        seconds,
    }
}

/// Where and how often a harnessed SFT run writes: checkpoints, held-out curve.
#[derive(Debug, Clone, Default)]
pub struct SftHarness {
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Greedy held-out accuracy every N steps, at step 0 and at the end (0 = never).
    pub eval_every: usize,
    /// Skip the curve's step-0 point (the pretrained model, the same for every
    /// recipe on the same held-out set and prompt: measure it once).
    pub skip_start_eval: bool,
    pub eval: EvalConfig,
    /// Data parallel: compare the ranks' weight checksums every N steps (0 = never).
    pub weight_check_every: usize,
}

/// What a harnessed run trains: its configuration, the loop's recipe and the loss.
pub struct RunSpec<'a> {
    pub config: &'a RunConfig,
    pub cfg: SftConfig,
    pub objective: Box<dyn Objective>,
    /// The ranks of a data-parallel run ([`SingleProcess`] for one process).
    pub ranks: Arc<dyn Collective>,
}

/// `cal-grpo sft` on the training harness: a locked run folder, checkpoints and
/// bit-exact `--resume`, `metrics.jsonl` and TensorBoard (`sft/loss`, `sft/lr`,
/// `eval/*`), a progress bar, and a held-out curve so a reader sees whether SFT had
/// plateaued before RL starts from it.
pub struct SftRun {
    pub policy: Policy,
    pub lp: SftLoop,
    held_out: Vec<Example>,
    harness: SftHarness,
    out_dir: PathBuf,
    config: serde_json::Value,
    /// Rank 0's: the others write nothing.
    logs: Option<RunLogs>,
    losses: Vec<f64>,
    /// The held-out evaluation made at the current step, if any.
    pub last_eval: Option<(usize, Vec<GradedExample>)>,
    ranks: Arc<dyn Collective>,
    _lock: Option<RunLock>,
}

impl SftRun {
    /// `out` is locked for the run's life; `start` as for [`crate::trainer::Trainer`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out: &Path,
        config: &RunConfig,
        policy: Policy,
        examples: &[Example],
        held_out: Vec<Example>,
        harness: SftHarness,
        start: impl Into<Start>,
    ) -> Result<Self> {
        let cfg = SftConfig::of_run(config);
        let run = RunSpec {
            config,
            cfg,
            objective: Box::new(CrossEntropy),
            ranks: Arc::new(SingleProcess),
        };
        Self::with_objective(out, run, policy, examples, held_out, harness, start)
    }

    /// [`SftRun::new`] with another recipe and objective (`distill`).
    pub fn with_objective(
        out: &Path,
        run: RunSpec<'_>,
        mut policy: Policy,
        examples: &[Example],
        held_out: Vec<Example>,
        harness: SftHarness,
        start: impl Into<Start>,
    ) -> Result<Self> {
        let RunSpec {
            config,
            cfg,
            objective,
            ranks,
        } = run;
        let start = start.into();
        let main = ranks.is_main();
        let lock = main.then(|| RunLock::acquire(out)).transpose()?;
        if main {
            rundir::prepare(out, start)?;
        }
        ranks.barrier()?; // the others read the folder once it is ready
        let trainable = policy.prepare(&config.model, config.run.seed)?;
        let mut lp = SftLoop::with_objective(&mut policy, examples, &cfg, trainable, objective)?
            .on(ranks.clone())?;
        let mut resumed = None;
        if start == Start::Resume {
            let dir = lp.resume(out)?;
            if main {
                eprintln!("resumed from {} (step {})", dir.display(), lp.step);
            }
            resumed = Some(lp.step);
        }
        let logs = if main {
            std::fs::write(out.join("config.toml"), config.to_toml()?)?;
            Some(RunLogs::open(out, resumed)?)
        } else {
            None
        };
        Ok(Self {
            policy,
            lp,
            held_out,
            harness,
            out_dir: out.to_path_buf(),
            config: serde_json::to_value(config)?,
            logs,
            losses: Vec::new(),
            last_eval: None,
            ranks,
            _lock: lock,
        })
    }

    fn log(&mut self, m: &BTreeMap<String, f64>) -> Result<()> {
        match &mut self.logs {
            Some(logs) => logs.write(self.lp.step, m),
            None => Ok(()),
        }
    }

    /// Greedy held-out accuracy now, logged as `eval/*` at the current step.
    pub fn evaluate_held_out(&mut self) -> Result<()> {
        if self.held_out.is_empty() || !self.ranks.is_main() {
            return Ok(()); // rank 0 evaluates for the run
        }
        let step = self.lp.step;
        let graded = evaluate(
            &self.policy,
            &self.held_out,
            &self.harness.eval,
            &format!("eval @{step}"),
        )?;
        let mut m = held_out_metrics(&graded, self.held_out.len());
        m.extend(self.lp.objective.held_out(&self.policy, &self.held_out)?);
        self.log(&m)?;
        self.last_eval = Some((step, graded));
        Ok(())
    }

    /// One step with its log row, and the held-out evaluation and checkpoint that
    /// fall on it; returns the step's loss.
    pub fn train_step(&mut self) -> Result<f64> {
        let total = self.lp.cfg.steps;
        let lr = lr_at(&self.lp.cfg.optim, self.lp.step, total);
        let ts = std::time::Instant::now();
        let (loss, mut m) = self.lp.step_metrics(&self.policy)?;
        self.losses.push(loss);
        let name = self.lp.objective.name();
        m.insert(format!("{name}/loss"), loss);
        m.insert(format!("{name}/lr"), lr);
        m.insert("perf/step_seconds".to_string(), ts.elapsed().as_secs_f64());
        self.log(&m)?;
        let (step, last) = (self.lp.step, self.lp.done());
        let every = self.harness.eval_every;
        if every > 0 && (step.is_multiple_of(every) || last) {
            self.evaluate_held_out()?;
        }
        let save = self.harness.save_every;
        if (save > 0 && step.is_multiple_of(save)) || last {
            self.lp.save(&self.out_dir, self.config.clone())?;
        }
        let every = self.harness.weight_check_every;
        if self.ranks.world() > 1 && every > 0 && step.is_multiple_of(every) {
            check_weights(self.ranks.as_ref(), &self.lp.trainable(), step)?;
        }
        Ok(loss)
    }

    /// Trains to the last step (or SIGINT, which saves and returns `Interrupted`).
    pub fn run(&mut self) -> Result<(RunEnd, SftReport)> {
        let progress = if self.ranks.is_main() {
            Progress::new(
                self.lp.objective.name(),
                self.lp.cfg.steps as u64,
                self.lp.step as u64,
            )
        } else {
            Progress::silent()
        };
        let t0 = std::time::Instant::now();
        if self.harness.eval_every > 0 && self.lp.step == 0 && !self.harness.skip_start_eval {
            self.evaluate_held_out()?; // the curve starts at the pretrained model
        }
        while !self.lp.done() {
            let loss = self.train_step()?;
            progress.update(self.lp.step as u64, &format!("loss {loss:.3}"));
            // every rank stops after the same step, or none does
            let stop = any_rank(self.ranks.as_ref(), INTERRUPTED.load(Ordering::SeqCst))?;
            if stop && !self.lp.done() {
                progress.finish();
                let dir = self.lp.save(&self.out_dir, self.config.clone())?;
                eprintln!(
                    "interrupted: checkpoint saved to {}; continue with --resume",
                    dir.display()
                );
                return Ok((RunEnd::Interrupted, report(&self.losses, 0.0)));
            }
        }
        progress.finish();
        Ok((
            RunEnd::Finished,
            report(&self.losses, t0.elapsed().as_secs_f64()),
        ))
    }
}
