//! The run harness and its training loop, shared by every algorithm: the credit mode
//! decides whether oracle spans are used, the [`crate::algorithm`] how the step's
//! advantages are made (GRPO's groups, PPO's critic).
//!
//! One step, each stage a module with typed inputs and outputs:
//!
//! ```text
//! generate (rollout) ─► score: grade ─► locate (oracle, concurrent with the reference
//! pass) ─► map ─► credit (the algorithm's advantages) ─► optimize: loss, accumulate,
//! step ─► log (metrics), checkpoint
//! ```

use crate::adamw::{lr_at, AdamW};
use crate::algorithm::{self, Algorithm, Scored};
use crate::checkpoint::{self, TrainState};
use crate::collective::{any_rank, check_weights, divides_over, share, Collective, SingleProcess};
use crate::config::{RunConfig, SampleSeeds};
use crate::engine::{self, RolloutBackend, StepSeeds};
use crate::evaluate::{evaluate, held_out_metrics, EvalConfig};
use crate::log::{Progress, RunLogs};
use crate::metrics::{reduce_metrics, step_metrics, Metrics, StepRecord};
use crate::optimize::{fixed_logprobs, global_weights, micro_batches, update};
use crate::policy::Policy;
use crate::rollout::{self, Rollouts};
use crate::rundir::{self, RunLock, Start};
use crate::score::{self, Spans};
use anyhow::{bail, Context, Result};
use cal_core::data::Example;
use cal_core::evaluate::GradedExample;
use cal_core::reward::RewardFns;
use cal_model::Transformer;
use cal_oracle::{locate_all, Oracle, SpanOutcome};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct Trainer {
    pub cfg: RunConfig,
    pub policy: Policy,
    /// How advantages are made, and what it trains besides the policy (a critic).
    algo: Box<dyn Algorithm>,
    reference: Option<Transformer>,
    opt: AdamW,
    data: Vec<Example>,
    cursor: usize,
    rng: rand_chacha::ChaCha8Rng,
    pub step: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    oracle: Arc<dyn Oracle>,
    /// Who samples the rollouts (`rollout.engine`).
    engine: Box<dyn RolloutBackend>,
    rt: tokio::runtime::Runtime,
    pub out_dir: PathBuf,
    /// The main rank's logs (`None` on the others).
    logs: Option<RunLogs>,
    skipped: usize,
    rewards: RewardFns,
    /// Held-out problems evaluated every `cfg.eval.every` steps.
    held_out: Option<(Vec<Example>, EvalConfig)>,
    /// The latest held-out evaluation and the step it was made at: the one at the last
    /// step is the run's final evaluation, so callers take it instead of redoing it.
    last_held_out: Option<(usize, Vec<GradedExample>)>,
    /// The other ranks of a data-parallel run ([`SingleProcess`] alone by default).
    collective: Arc<dyn Collective>,
    /// This process's exclusive right to `out_dir`, released when the trainer drops
    /// (the main rank's; the others write nothing there).
    _lock: Option<RunLock>,
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
    /// Builds the trainer for `cfg` (output in `cfg.output_dir()`, locked for the
    /// trainer's life). `start` is a [`Start`] or a `resume` boolean: `Resume`
    /// continues from the latest checkpoint there (an error if there is none) with the
    /// logs cut back to it; `Fresh` refuses a folder holding another run; `Overwrite`
    /// moves that run aside first.
    pub fn new(
        cfg: RunConfig,
        policy: Policy,
        data: Vec<Example>,
        start: impl Into<Start>,
    ) -> Result<Self> {
        Self::new_on(cfg, policy, data, start.into(), Arc::new(SingleProcess))
    }

    /// [`Trainer::new`] as one rank of `collective`: only the main rank locks, writes
    /// and logs the run folder; every rank reads a checkpoint to resume.
    pub fn new_on(
        mut cfg: RunConfig,
        mut policy: Policy,
        data: Vec<Example>,
        start: Start,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let main = collective.is_main();
        if data.is_empty() {
            bail!("no training data");
        }
        // The same checks and derived values as a resolved configuration (a no-op on one).
        cfg.finish()?;
        let world = collective.world();
        if world > 1 {
            // each rank takes an equal share of whole groups
            divides_over("--prompts-per-step", cfg.rollout.prompts_per_step, world)?;
            crate::engine::server::refuse_own_server_on_ranks(&cfg, world)?;
            if cfg.rollout.seeds == SampleSeeds::Step {
                // the samples of a group must not depend on which rank draws them
                cfg.rollout.seeds = SampleSeeds::Group;
                if main {
                    eprintln!(
                        "data parallel over {world} ranks: rollouts seeded per group \
                         (rollout.seeds = group; one process reproduces this run with \
                         --rollout-seeds group)"
                    );
                }
            }
        }
        // the prompt of the configuration, few-shot examples drawn from this run's data
        policy.prompt = crate::prompt::PromptFormat::of(&cfg.data, &data)?;
        let out_dir = cfg.output_dir();
        let lock = main.then(|| RunLock::acquire(&out_dir)).transpose()?;
        if main {
            rundir::prepare(&out_dir, start)?;
        }
        collective.barrier()?; // the others read the folder once it is ready
                               // before the adapters: a separate critic copies the base model
        let algo = algorithm::build(&cfg, &policy)?;
        let trainable = policy.prepare(&cfg.model, cfg.run.seed)?;
        // The reference is a real frozen copy (full fine-tuning) or the same base with
        // the adapters switched off (LoRA): never the policy being trained.
        let reference = (cfg.model.lora.rank == 0 && cfg.needs_reference())
            .then(|| policy.model.frozen_copy())
            .transpose()?;
        let mut vars = policy.model.make_trainable(trainable)?;
        let own = algo.params();
        let own_names: Vec<String> = own.iter().map(|(k, _)| k.clone()).collect();
        vars.extend(own); // checkpointed and resumed with the policy
        let mut opt = AdamW::new(vars, cfg.optim)?;
        opt.scale_lr(|name| own_names.iter().any(|k| k == name), algo.lr_scale());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.run.seed);
        let (mut step, mut cursor, mut skipped) = (0, 0, 0);
        if start == Start::Resume {
            let r = checkpoint::resume(&out_dir, &mut opt)?;
            (step, cursor, rng, skipped) = (r.step, r.cursor, r.rng, r.skipped);
            if r.sample_seeds == Some(SampleSeeds::Group) && cfg.rollout.seeds != SampleSeeds::Group
            {
                // a data-parallel run resumed by fewer ranks samples as it began
                cfg.rollout.seeds = SampleSeeds::Group;
                if main {
                    eprintln!("resumed run samples per group, as it began (rollout.seeds = group)");
                }
            }
            eprintln!("resumed from {} (step {step})", r.dir.display());
        }
        let rewards = cfg.reward.functions()?;
        let oracle = cfg.oracle.build().map_err(|e| anyhow::anyhow!(e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let logs = if main {
            let resumed = (start == Start::Resume).then_some(step);
            std::fs::write(out_dir.join("config.toml"), cfg.to_toml()?)?;
            Some(RunLogs::open(&out_dir, resumed)?)
        } else {
            None
        };
        // a served engine starts from the trainer's weights (a resumed run's included)
        let tag = format!("{}-seed{}", cfg.kind(), cfg.run.seed);
        let engine = engine::build(
            &cfg.rollout,
            &policy,
            &data[0],
            step,
            &tag,
            &out_dir,
            &rt,
            collective.clone(),
        )?;
        Ok(Self {
            total_steps: cfg.steps(data.len()),
            cfg,
            policy,
            algo,
            reference,
            opt,
            data,
            cursor,
            rng,
            step,
            oracle,
            engine,
            rt,
            out_dir,
            logs,
            skipped,
            rewards,
            held_out: None,
            last_held_out: None,
            collective,
            _lock: lock,
        })
    }

    /// Replaces the configured reward functions (a library user's own [`Reward`]s).
    ///
    /// [`Reward`]: cal_core::reward::Reward
    pub fn with_rewards(mut self, rewards: RewardFns) -> Self {
        self.rewards = rewards;
        self
    }

    /// Evaluates `test` with `eval` every `cfg.eval.every` steps and at the last step
    /// (when `every > 0`), logged as `eval/*`.
    pub fn with_held_out(mut self, test: Vec<Example>, eval: EvalConfig) -> Self {
        self.held_out = Some((test, eval));
        self
    }

    /// The held-out evaluation of the starting policy when the caller already made it
    /// (an experiment's "before RL", with the same problems and [`EvalConfig`]): the
    /// curve's first point is logged from it instead of decoding everything again.
    /// Ignored on a resumed run and with LoRA (the adapters make it another model).
    pub fn with_start_eval(mut self, graded: Vec<GradedExample>) -> Self {
        if self.step == 0 && self.cfg.model.lora.adapters().is_none() {
            self.last_held_out = Some((0, graded));
        }
        self
    }

    /// Held-out accuracy now, logged at the current step.
    pub fn evaluate_held_out(&mut self) -> Result<Option<Metrics>> {
        let Some((test, eval)) = &self.held_out else {
            return Ok(None);
        };
        if !self.collective.is_main() {
            return Ok(None); // rank 0 evaluates for the run
        }
        let graded = match self.last_held_out.take() {
            Some((step, g)) if step == self.step => g,
            _ => evaluate(&self.policy, test, eval, &format!("eval @{}", self.step))?,
        };
        let m: Metrics = held_out_metrics(&graded, test.len());
        self.last_held_out = Some((self.step, graded));
        self.log(&m)?;
        Ok(Some(m))
    }

    /// The held-out evaluation of the policy as it is now, when the loop made one at
    /// the current step (with `eval.every > 0` it does at the last step): the same
    /// greedy decoding of the same problems, so evaluating again would repeat it.
    pub fn held_out_now(&self) -> Option<&[GradedExample]> {
        match &self.last_held_out {
            Some((step, graded)) if *step == self.step => Some(graded),
            _ => None,
        }
    }

    /// Logs `m` at the current step (the main rank; the others log nothing).
    fn log(&mut self, m: &Metrics) -> Result<()> {
        match &mut self.logs {
            Some(logs) => logs.write(self.step, m),
            None => Ok(()),
        }
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
                    self.cfg.run.seed ^ (epoch as u64) << 20,
                ));
                order_epoch = epoch;
            }
            out.push(self.data[order[pos]].clone());
            self.cursor += 1;
        }
        out
    }

    /// Runs until the last step (or SIGINT), checkpointing as configured.
    pub fn run(&mut self) -> Result<RunEnd> {
        let progress = if self.collective.is_main() {
            Progress::new(self.cfg.kind(), self.total_steps as u64, self.step as u64)
        } else {
            Progress::silent()
        };
        if self.cfg.eval.every > 0 && self.step == 0 {
            self.evaluate_held_out()?; // the curve starts at the policy RL starts from
        }
        while self.step < self.total_steps {
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
            let last = self.step == self.total_steps;
            let every = self.cfg.eval.every;
            if every > 0 && (self.step.is_multiple_of(every) || last) {
                self.evaluate_held_out()?;
            }
            let every = self.cfg.checkpoint.save_every;
            if (every > 0 && self.step.is_multiple_of(every)) || last {
                self.save()?;
            }
            // every rank stops after the same step, or none does
            if any_rank(self.collective.as_ref(), INTERRUPTED.load(Ordering::SeqCst))? {
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

    /// Writes a checkpoint of the current step (the main rank; every rank returns its
    /// folder once it is written).
    pub fn save(&self) -> Result<PathBuf> {
        if !self.collective.is_main() {
            self.collective.barrier()?;
            return Ok(checkpoint::step_dir(&self.out_dir, self.step));
        }
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
        let weights: cal_model::Params = self.trainable().into_iter().collect();
        let dir = checkpoint::save(&self.out_dir, &state, &weights, &self.opt.state())?;
        self.collective.barrier()?;
        Ok(dir)
    }

    /// Trainable parameters by name (for tests and export).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.opt.tensors()
    }

    /// One step: generate, then [`Trainer::learn`] from the samples; logged.
    pub fn train_step(&mut self) -> Result<Metrics> {
        let t0 = Instant::now();
        let (cursor, rng) = (self.cursor, self.rng.clone());
        // the step's groups in the run's global data order; this rank takes its share
        let c = self.collective.clone();
        let mut examples = self.next_examples(self.cfg.rollout.prompts_per_step);
        let part = share(examples.len(), c.rank(), c.world());
        let index: Vec<u64> = part.clone().map(|i| (cursor + i) as u64).collect();
        examples = examples.drain(part).collect();
        let seeds = match self.cfg.rollout.seeds {
            SampleSeeds::Step => StepSeeds::Stream(&mut self.rng),
            SampleSeeds::Group => StepSeeds::Groups {
                seed: self.cfg.run.seed,
                index: &index,
            },
        };
        let rollouts = match rollout::generate(
            self.engine.as_mut(),
            &self.policy,
            examples,
            &self.cfg.rollout,
            self.cfg.run.shared_prefix.on(),
            seeds,
        ) {
            Ok(r) => r,
            Err(err) if c.world() > 1 => {
                // the others wait in this step's reduce: the run stops on every rank
                // (mpirun ends them), and the last checkpoint stays whole
                return Err(err.context(format!(
                    "rank {}: rollouts failed at step {}; continue with --resume",
                    c.rank(),
                    self.step + 1
                )));
            }
            Err(err) => {
                // no partial group is trained on: back to the state after the last
                // step, saved, so that --resume asks for the same samples again
                (self.cursor, self.rng) = (cursor, rng);
                let dir = self.save()?;
                return Err(err.context(format!(
                    "rollouts failed at step {}; checkpoint saved to {}, continue with --resume",
                    self.step + 1,
                    dir.display()
                )));
            }
        };
        let t_gen = t0.elapsed().as_secs_f64();
        let n_tokens = rollouts.completion_tokens();
        let mut m = self.learn(&rollouts)?;
        if self.engine.remote() {
            // after every optimizer step the servers get the new weights, checked
            let t = Instant::now();
            self.engine.sync(&self.policy, self.step)?;
            m.insert("perf/sync_seconds".into(), t.elapsed().as_secs_f64());
            let (diff, shift) = self.engine.check_served(&self.policy)?;
            m.insert("rollout/sync_logprob_diff".into(), diff);
            m.insert("rollout/sync_logprob_shift".into(), shift);
        }
        m.insert("perf/step_seconds".into(), t0.elapsed().as_secs_f64());
        m.insert("perf/generate_seconds".into(), t_gen);
        m.insert(
            "perf/tokens_per_second".into(),
            n_tokens as f64 / t_gen.max(1e-9),
        );
        m.insert("tokens/trained".into(), n_tokens as f64);
        let every = self.cfg.run.weight_check_every;
        if c.world() > 1 && every > 0 && self.step.is_multiple_of(every) {
            check_weights(c.as_ref(), &self.trainable(), self.step)?;
        }
        let m = reduce_metrics(c.as_ref(), m)?;
        self.log(&m)?;
        Ok(m)
    }

    /// Everything after sampling: score (grade → locate → map), the algorithm's
    /// advantages, then optimize.
    /// Public so that a test can feed hand-written completions.
    pub fn learn(&mut self, r: &Rollouts) -> Result<Metrics> {
        let graded = score::grade(r, &self.rewards);
        let wrong = graded.wrong();
        let locating = self.cfg.credit.mode.uses_spans().then(|| {
            let reqs = score::oracle_requests(r, &wrong);
            self.rt
                .spawn(locate_all(self.oracle.clone(), reqs, self.cfg.locate))
        });
        let mut micro = micro_batches(
            r,
            self.cfg.run.micro_batch,
            self.cfg.run.micro_batch_tokens,
            &self.policy,
            &self.cfg,
            self.algo.whole_groups(),
        )?;
        // each rank's share weighed against the whole step's rows and tokens
        global_weights(
            self.collective.as_ref(),
            &mut micro,
            self.cfg.loss.aggregation,
        )?;
        // where a step's time goes: the fixed (reference) pass, the wait for the
        // oracle after it (it runs meanwhile), and the policy's forward + backward
        let t = Instant::now();
        fixed_logprobs(&self.policy, self.reference.as_ref(), &mut micro, &self.cfg)?;
        let t_fixed = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let outcomes: Vec<SpanOutcome> = match locating {
            Some(task) => self.rt.block_on(task).context("oracle task")?,
            None => Vec::new(),
        };
        let t_oracle = t.elapsed().as_secs_f64();
        let spans: Spans = score::map_spans(r, &wrong, &outcomes, self.cfg.credit.max_error_span);
        let scored = Scored {
            rollouts: r,
            graded: &graded,
            spans: &spans,
            collective: self.collective.as_ref(),
        };
        let adv = (self.algo).advantages(&scored, &self.policy, &mut micro, &self.cfg)?;
        let lr = lr_at(&self.cfg.optim, self.step, self.total_steps);
        let t = Instant::now();
        let upd = update(
            &mut self.policy,
            &mut self.opt,
            &micro,
            &adv,
            self.algo.as_mut(),
            self.collective.as_ref(),
            &self.cfg,
            self.step,
            lr,
        )?;
        let t_update = t.elapsed().as_secs_f64();
        self.skipped += usize::from(upd.skipped);
        self.step += 1;
        let (computed, padding) = crate::optimize::padding(&micro);
        let mut m = step_metrics(&StepRecord {
            rollouts: r,
            graded: &graded,
            spans: &spans.stats,
            advantages: &adv,
            update: &upd,
            lr,
            skipped_total: self.skipped,
        });
        m.extend(self.algo.metrics());
        m.insert("perf/micro_batches".into(), micro.len() as f64);
        m.insert("perf/padding_fraction".into(), padding);
        // token positions one forward pass over the step computes (prompts once per
        // micro-batch with a shared prefix)
        m.insert("perf/padded_tokens".into(), computed as f64);
        m.insert("perf/fixed_logprob_seconds".into(), t_fixed);
        m.insert("perf/oracle_wait_seconds".into(), t_oracle);
        m.insert("perf/update_seconds".into(), t_update);
        Ok(m)
    }
}
