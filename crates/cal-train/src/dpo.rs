//! Offline preference optimisation (`cal-grpo dpo`): DPO, IPO or ORPO on pairs of
//! answers to one prompt, on the training harness (locked run folder, checkpoints and
//! bit-exact resume, `metrics.jsonl` and TensorBoard with TRL's metric names, a
//! held-out pair accuracy).
//!
//! A step takes the next `batch_size` pairs of a seeded order, lays each pair's two
//! rows side by side (never split across micro-batches), sums the policy's log-probs of
//! the credited tokens of each answer (all of them, or the first differing step), and
//! takes one AdamW step on [`crate::preference::preference_loss`]. The reference's sums
//! are computed once per pair, the first time the pair is drawn: with LoRA the
//! reference is the base with the adapters off, else a frozen copy of the start.

use crate::adamw::{lr_at, AdamW, OptimConfig};
use crate::checkpoint::DataOrder;
use crate::collective::{any_rank, check_weights, divides_over, share, Collective, SingleProcess};
use crate::config::RunConfig;
use crate::log::{Progress, RunLogs};
use crate::metrics::Metrics;
use crate::optimize::plan_micro_batches;
use crate::policy::Policy;
use crate::preference::{preference_loss, reward_metrics, PairCredit, PairLogps, PrefLoss};
use crate::rundir::{self, RunLock, Start};
use crate::trainer::{RunEnd, INTERRUPTED};
use anyhow::{bail, Result};
use cal_core::data::preference::{first_differing_step, PreferencePair, Turns};
use cal_core::map::map_span;
use cal_model::generate::{build_batch, completion_logprobs, decode_with_offsets};
use cal_model::{Forward, Transformer};
use candle_core::{DType, Tensor};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The recipe of a preference run.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    pub beta: f64,
    pub loss: PrefLoss,
    pub micro_batch_tokens: usize,
}

impl DpoConfig {
    /// The recipe of a run configuration: its `[dpo]` section, with the run's seed and
    /// AdamW settings and a linear warmup over the first tenth of the steps.
    pub fn of_run(run: &RunConfig) -> Self {
        let d = &run.dpo;
        Self {
            steps: d.steps,
            batch_size: d.batch_size,
            optim: OptimConfig {
                lr: d.learning_rate,
                warmup_steps: d.steps / 10,
                ..run.optim
            },
            seed: run.run.seed,
            beta: d.beta,
            loss: d.loss,
            micro_batch_tokens: d.micro_batch_tokens,
        }
    }
}

/// A pair as token ids: the prompt, both answers (ending in the stop token), and the
/// completion positions whose log-probs each answer's sum covers.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub chosen_span: Range<usize>,
    pub rejected_span: Range<usize>,
}

/// What tokenising a file did besides the pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeStats {
    /// Pairs cut to `max-prompt-length` / `max-length` (TRL's truncation).
    pub truncated: usize,
    /// First-error pairs without a differing step (one answer a prefix of the other,
    /// or the step cut off): credited in full.
    pub no_step: usize,
}

/// Tokenises preference pairs for `policy`: chat-message prompts through the model's
/// chat template, string prompts as text (as TRL does), answers followed by the stop
/// token; prompts keep their last `max_prompt` tokens and answers their first
/// `max_len − prompt` tokens.
pub fn tokenize_pairs(
    policy: &Policy,
    pairs: &[PreferencePair],
    credit: PairCredit,
    max_len: usize,
    max_prompt: usize,
) -> Result<(Vec<TokenPair>, TokenizeStats)> {
    let tok = &policy.tok;
    let mut stats = TokenizeStats::default();
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        let mut prompt = match &p.prompt {
            Turns::Text(t) => {
                let mut ids = tok.encode(t)?;
                if let Some(bos) = tok.bos_id.filter(|_| tok.chat_template.is_none()) {
                    if ids.first() != Some(&bos) {
                        ids.insert(0, bos);
                    }
                }
                ids
            }
            Turns::Messages(m) => {
                let Some(tpl) = &tok.chat_template else {
                    bail!(
                        "line {}: the prompt is chat messages but the model has no chat template",
                        p.line
                    );
                };
                let msgs: Vec<(&str, &str)> =
                    m.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                tok.encode(&tpl.render(&msgs, true)?)?
            }
        };
        let answer = |t: &Turns| -> Result<Vec<u32>> {
            let mut ids = tok.encode(&t.answer_text())?;
            ids.push(tok.eos_ids[0]);
            Ok(ids)
        };
        let (mut chosen, mut rejected) = (answer(&p.chosen)?, answer(&p.rejected)?);
        let mut cut = false;
        if prompt.len() > max_prompt {
            prompt.drain(..prompt.len() - max_prompt);
            cut = true;
        }
        let room = max_len.saturating_sub(prompt.len()).max(1);
        for a in [&mut chosen, &mut rejected] {
            if a.len() > room {
                a.truncate(room);
                cut = true;
            }
        }
        stats.truncated += usize::from(cut);
        let (mut chosen_span, mut rejected_span) = (0..chosen.len(), 0..rejected.len());
        if credit == PairCredit::FirstError {
            match first_error_spans(policy, p, &chosen, &rejected)? {
                Some((c, r)) => (chosen_span, rejected_span) = (c, r),
                None => stats.no_step += 1,
            }
        }
        out.push(TokenPair {
            prompt,
            chosen,
            rejected,
            chosen_span,
            rejected_span,
        });
    }
    Ok((out, stats))
}

/// The token ranges of the answers' first differing step
/// ([`first_differing_step`] on the decoded answers).
fn first_error_spans(
    policy: &Policy,
    p: &PreferencePair,
    chosen: &[u32],
    rejected: &[u32],
) -> Result<Option<(Range<usize>, Range<usize>)>> {
    let tok = &policy.tok;
    let (c_text, c_off) = decode_with_offsets(tok, chosen)?;
    let (r_text, r_off) = decode_with_offsets(tok, rejected)?;
    // the label's offset is into the answer as written; the decoded text may carry a
    // leading space or lose trailing text to truncation
    let written = p.rejected.answer_text();
    let shift = r_text
        .find(written.trim_start())
        .map_or(0, |b| r_text[..b].chars().count()) as isize
        - (written.chars().count() - written.trim_start().chars().count()) as isize;
    let error = p
        .first_error_start
        .map(|e| (e as isize + shift).max(0) as usize);
    let Some((c, r)) = first_differing_step(&c_text, &r_text, error) else {
        return Ok(None);
    };
    let bytes = |text: &str, chars: Range<usize>| {
        let at = |i: usize| text.char_indices().nth(i).map_or(text.len(), |(b, _)| b);
        at(chars.start)..at(chars.end)
    };
    let c = map_span(&c_off, bytes(&c_text, c), 0);
    let r = map_span(&r_off, bytes(&r_text, r), 0);
    Ok(c.zip(r).map(|(c, r)| (c.range(), r.range())))
}

/// Each pair's credited log-prob sums under `model` (`[chosen, rejected]`, as f64),
/// the policy's own forward with no gradient. For the reference and held-out metrics.
fn sequence_sums(
    model: &Transformer,
    fwd: Forward,
    pairs: &[&TokenPair],
    pad: u32,
    budget: usize,
) -> Result<Vec<[f64; 2]>> {
    let mut out = vec![[0.0; 2]; pairs.len()];
    for units in plan_pairs(pairs, budget) {
        let rows: Vec<&TokenPair> = units.iter().map(|&u| pairs[u]).collect();
        let (logp, mask) = pair_logprobs(model, fwd, &rows, pad)?;
        let sums = (logp * mask)?
            .sum(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for (k, &u) in units.iter().enumerate() {
            out[u] = [sums[2 * k], sums[2 * k + 1]];
        }
    }
    Ok(out)
}

/// Micro-batches of whole pairs within `budget` padded tokens (0 = all at once).
fn plan_pairs(pairs: &[&TokenPair], budget: usize) -> Vec<Vec<usize>> {
    // a pair is one unit of two rows: twice a row's prompt and longest answer
    let lens: Vec<(usize, usize)> = pairs
        .iter()
        .map(|p| (2 * p.prompt.len(), 2 * p.chosen.len().max(p.rejected.len())))
        .collect();
    plan_micro_batches(&lens, 0, budget)
}

/// The rows `[c₀, r₀, c₁, r₁, …]` of `pairs`: their completion log-probs `[2P, Tc]`
/// and the credit mask over them (1 on the tokens each answer's sum covers).
fn pair_logprobs(
    model: &Transformer,
    fwd: Forward,
    pairs: &[&TokenPair],
    pad: u32,
) -> Result<(Tensor, Tensor)> {
    let mut prompts = Vec::with_capacity(2 * pairs.len());
    let mut answers = Vec::with_capacity(2 * pairs.len());
    let mut spans = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        for (a, s) in [(&p.chosen, &p.chosen_span), (&p.rejected, &p.rejected_span)] {
            prompts.push(p.prompt.clone());
            answers.push(a.clone());
            spans.push(s.clone());
        }
    }
    let batch = build_batch(&prompts, &answers, pad, &model.device)?;
    let (logp, _) = completion_logprobs(model, &batch, fwd)?;
    let tc = batch.completion_len;
    let mask: Vec<f32> = spans
        .iter()
        .flat_map(|s| (0..tc).map(move |t| f32::from(u8::from(s.contains(&t)))))
        .collect();
    let mask = Tensor::from_vec(mask, (spans.len(), tc), logp.device())?.to_dtype(logp.dtype())?;
    Ok((logp, mask))
}

/// The preference loss of `pairs` under `model` (their share of a batch of
/// `pairs_total` pairs with `chosen_tokens_total` credited chosen tokens), given the
/// reference's sums `refs`; also the policy's summed log-probs of each side.
#[allow(clippy::too_many_arguments)]
pub fn pairs_loss(
    model: &Transformer,
    fwd: Forward,
    pairs: &[&TokenPair],
    refs: &[[f64; 2]],
    cfg: &DpoConfig,
    pad: u32,
    pairs_total: f64,
    chosen_tokens_total: f64,
) -> Result<(crate::preference::PrefOutput, [f64; 2])> {
    let (logp, mask) = pair_logprobs(model, fwd, pairs, pad)?;
    let dev = logp.device().clone();
    let sums = (logp * &mask)?.sum(1)?.to_dtype(DType::F64)?;
    let counts = mask
        .sum(1)?
        .to_dtype(DType::F64)?
        .clamp(1.0, f64::INFINITY)?;
    let even: Vec<u32> = (0..pairs.len() as u32).map(|k| 2 * k).collect();
    let even = Tensor::new(even, &dev)?;
    let odd = (&even + 1.0)?;
    let ref_c = Tensor::new(refs.iter().map(|r| r[0]).collect::<Vec<_>>(), &dev)?;
    let ref_r = Tensor::new(refs.iter().map(|r| r[1]).collect::<Vec<_>>(), &dev)?;
    let (c, r) = (sums.index_select(&even, 0)?, sums.index_select(&odd, 0)?);
    let out = preference_loss(
        cfg.loss,
        cfg.beta,
        &PairLogps {
            chosen: &c,
            rejected: &r,
            ref_chosen: Some(&ref_c),
            ref_rejected: Some(&ref_r),
            chosen_tokens: &counts.index_select(&even, 0)?,
            rejected_tokens: &counts.index_select(&odd, 0)?,
        },
        pairs_total,
        chosen_tokens_total,
    )?;
    let side = [
        c.sum_all()?.to_scalar::<f64>()?,
        r.sum_all()?.to_scalar::<f64>()?,
    ];
    Ok((out, side))
}

/// Preference training between two steps: the optimizer, the data order, the step and
/// the reference's sums. A checkpoint stores the first three; the sums are recomputed.
pub struct DpoLoop {
    pub cfg: DpoConfig,
    opt: AdamW,
    pairs: Vec<TokenPair>,
    data: DataOrder,
    pub step: usize,
    /// A frozen copy of the start (full fine-tuning); `None` with LoRA (the base with
    /// adapters off) or ORPO (no reference).
    reference: Option<Transformer>,
    ref_sums: Vec<Option<[f64; 2]>>,
    /// The ranks of a data-parallel run: each takes an equal share of every batch.
    ranks: Arc<dyn Collective>,
}

impl DpoLoop {
    /// `trainable` says which of the policy's parameters train (all, or the adapters).
    pub fn new(
        policy: &mut Policy,
        pairs: Vec<TokenPair>,
        cfg: &DpoConfig,
        trainable: impl Fn(&str) -> bool,
        lora: bool,
    ) -> Result<Self> {
        if pairs.is_empty() {
            bail!("preference training needs at least one pair");
        }
        if cfg.steps == 0 || cfg.batch_size == 0 {
            bail!("dpo needs at least one step and a batch of at least one pair");
        }
        if cfg.beta.is_nan() || cfg.beta <= 0.0 {
            bail!("dpo.beta must be positive, got {}", cfg.beta);
        }
        let reference = (cfg.loss.uses_reference() && !lora)
            .then(|| policy.model.frozen_copy())
            .transpose()?;
        let vars = policy.model.make_trainable(trainable)?;
        let n = pairs.len();
        Ok(Self {
            cfg: cfg.clone(),
            opt: AdamW::new(vars, cfg.optim)?,
            ref_sums: vec![None; n],
            pairs,
            data: DataOrder::new(n, cfg.seed),
            step: 0,
            reference,
            ranks: Arc::new(SingleProcess),
        })
    }

    /// The loop as one rank of `ranks`: each step's pairs (in the global order) are
    /// split into equal shares, and the gradients and batch totals summed over them.
    pub fn on(mut self, ranks: Arc<dyn Collective>) -> Result<Self> {
        divides_over("--batch-size", self.cfg.batch_size, ranks.world())?;
        self.ranks = ranks;
        Ok(self)
    }

    /// The trained parameters by name.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.opt.tensors()
    }

    pub fn done(&self) -> bool {
        self.step >= self.cfg.steps
    }

    /// The reference's sums of `pairs` (computed for those not seen yet).
    fn reference_sums(&mut self, policy: &Policy, idx: &[usize]) -> Result<Vec<[f64; 2]>> {
        let missing: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| self.ref_sums[i].is_none())
            .collect();
        if !missing.is_empty() && self.cfg.loss.uses_reference() {
            let (model, fwd) = match &self.reference {
                Some(r) => (r, Forward::INFERENCE),
                None => (&policy.model, Forward::BASE),
            };
            let rows: Vec<&TokenPair> = missing.iter().map(|&i| &self.pairs[i]).collect();
            let sums = sequence_sums(
                model,
                fwd,
                &rows,
                policy.tok.pad_id,
                self.cfg.micro_batch_tokens,
            )?;
            for (i, s) in missing.into_iter().zip(sums) {
                self.ref_sums[i] = Some(s);
            }
        }
        Ok(idx
            .iter()
            .map(|&i| self.ref_sums[i].unwrap_or([0.0; 2]))
            .collect())
    }

    /// One optimizer step on the next batch of pairs; its metrics (TRL's names).
    pub fn step(&mut self, policy: &Policy) -> Result<Metrics> {
        let ranks = self.ranks.clone();
        let mut idx = self.data.next_batch(self.cfg.batch_size);
        idx = idx[share(idx.len(), ranks.rank(), ranks.world())].to_vec();
        let refs = self.reference_sums(policy, &idx)?;
        let cfg = self.cfg.clone();
        let batch: Vec<&TokenPair> = idx.iter().map(|&i| &self.pairs[i]).collect();
        // the whole batch's pairs and chosen tokens, over the ranks
        let mut totals = [
            batch.len() as f64,
            batch.iter().map(|p| p.chosen_span.len() as f64).sum(),
        ];
        if ranks.world() > 1 {
            ranks.all_reduce_sum_f64(&mut totals)?;
        }
        let [pairs_total, chosen_tokens] = totals;
        let seed = crate::seed::mix_seed(&[cfg.seed, self.step as u64]);
        let lr = lr_at(&cfg.optim, self.step, cfg.steps);
        let plan = plan_pairs(&batch, cfg.micro_batch_tokens);
        let mut acc = self.opt.zero_accumulator();
        let (mut loss, mut chosen_r, mut rejected_r) = (0.0, Vec::new(), Vec::new());
        let (mut logps_c, mut logps_r) = (0.0, 0.0);
        for units in &plan {
            let rows: Vec<&TokenPair> = units.iter().map(|&u| batch[u]).collect();
            let unit_refs: Vec<[f64; 2]> = units.iter().map(|&u| refs[u]).collect();
            let (out, [c, r]) = pairs_loss(
                &policy.model,
                Forward::training(seed),
                &rows,
                &unit_refs,
                &cfg,
                policy.tok.pad_id,
                pairs_total,
                chosen_tokens,
            )?;
            loss += out.loss.to_scalar::<f64>()?;
            logps_c += c;
            logps_r += r;
            chosen_r.extend(out.chosen_rewards);
            rejected_r.extend(out.rejected_rewards);
            if plan.len() == 1 && ranks.world() == 1 {
                self.opt.step(&out.loss.backward()?, lr)?;
            } else {
                self.opt.accumulate(&mut acc, &out.loss.backward()?)?;
            }
        }
        let mut rewards = reward_metrics(&chosen_r, &rejected_r);
        let w = ranks.world();
        if w > 1 {
            self.opt.all_reduce(ranks.as_ref(), &mut acc)?;
            // sums of the ranks' parts; the reward metrics are means over equal shares
            let mut v = [loss, logps_c, logps_r];
            ranks.all_reduce_sum_f64(&mut v)?;
            [loss, logps_c, logps_r] = v;
            let mut r: Vec<f64> = rewards.iter().map(|(_, x)| *x).collect();
            ranks.all_reduce_sum_f64(&mut r)?;
            for ((_, x), s) in rewards.iter_mut().zip(r) {
                *x = s / w as f64;
            }
        }
        if plan.len() > 1 || w > 1 {
            self.opt.step_accumulated(&acc, lr)?;
        }
        self.step += 1;
        let mut m = Metrics::from([
            ("loss".to_string(), loss),
            ("learning_rate".to_string(), lr),
            ("logps/chosen".to_string(), logps_c / pairs_total),
            ("logps/rejected".to_string(), logps_r / pairs_total),
        ]);
        for (k, v) in rewards {
            m.insert(k.to_string(), v);
        }
        Ok(m)
    }

    /// TRL's reward metrics of held-out `pairs` under the policy now (no gradient),
    /// prefixed `eval/`: `eval/rewards/accuracies` is the held-out pair accuracy.
    pub fn evaluate(&mut self, policy: &Policy, pairs: &[TokenPair]) -> Result<Metrics> {
        let rows: Vec<&TokenPair> = pairs.iter().collect();
        let (pad, budget) = (policy.tok.pad_id, self.cfg.micro_batch_tokens);
        let now = sequence_sums(&policy.model, Forward::INFERENCE, &rows, pad, budget)?;
        let refs = match (self.cfg.loss.uses_reference(), &self.reference) {
            (false, _) => vec![[0.0; 2]; rows.len()],
            (true, Some(r)) => sequence_sums(r, Forward::INFERENCE, &rows, pad, budget)?,
            (true, None) => sequence_sums(&policy.model, Forward::BASE, &rows, pad, budget)?,
        };
        let beta = self.cfg.beta;
        let reward = |k: usize, i: usize, n: usize| match self.cfg.loss {
            PrefLoss::Orpo => beta * now[k][i] / n.max(1) as f64,
            _ => beta * (now[k][i] - refs[k][i]),
        };
        let chosen: Vec<f64> = (0..rows.len())
            .map(|k| reward(k, 0, rows[k].chosen_span.len()))
            .collect();
        let rejected: Vec<f64> = (0..rows.len())
            .map(|k| reward(k, 1, rows[k].rejected_span.len()))
            .collect();
        Ok(reward_metrics(&chosen, &rejected)
            .into_iter()
            .map(|(k, v)| (format!("eval/{k}"), v))
            .collect())
    }

    /// Writes a checkpoint of the loop into `out/checkpoints`: rank 0 writes, every
    /// rank returns once it is written.
    pub fn save(&self, out: &Path, config: serde_json::Value) -> Result<PathBuf> {
        (self.data).save(out, self.step, &self.opt, config, self.ranks.as_ref())
    }

    /// Continues from the latest checkpoint in `out` (weights, moments, order, RNG).
    pub fn resume(&mut self, out: &Path) -> Result<PathBuf> {
        let (dir, step, data) = self.data.resume(out, &mut self.opt, "pairs", "--dataset")?;
        (self.step, self.data) = (step, data);
        Ok(dir)
    }
}

/// `cal-grpo dpo` on the harness: a locked run folder, checkpoints every `save_every`
/// steps and at the end, bit-exact `--resume`, logs, the held-out pair accuracy every
/// `eval_every` steps (0: at the start and the end).
pub struct DpoRun {
    pub policy: Policy,
    pub lp: DpoLoop,
    held_out: Vec<TokenPair>,
    save_every: usize,
    eval_every: usize,
    out_dir: PathBuf,
    config: serde_json::Value,
    /// Rank 0's: the others write nothing.
    logs: Option<RunLogs>,
    /// The held-out metrics at the start and at the last evaluation.
    pub first_eval: Option<Metrics>,
    pub last_eval: Option<Metrics>,
    ranks: Arc<dyn Collective>,
    weight_check_every: usize,
    _lock: Option<RunLock>,
}

impl DpoRun {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out: &Path,
        config: &RunConfig,
        policy: Policy,
        pairs: Vec<TokenPair>,
        held_out: Vec<TokenPair>,
        save_every: usize,
        eval_every: usize,
        start: Start,
    ) -> Result<Self> {
        let one: Arc<dyn Collective> = Arc::new(SingleProcess);
        Self::new_on(
            out, config, policy, pairs, held_out, save_every, eval_every, start, one,
        )
    }

    /// [`DpoRun::new`] as one rank of `ranks`: rank 0 locks, writes, logs and
    /// evaluates; every rank trains on its share of each batch.
    #[allow(clippy::too_many_arguments)]
    pub fn new_on(
        out: &Path,
        config: &RunConfig,
        mut policy: Policy,
        pairs: Vec<TokenPair>,
        held_out: Vec<TokenPair>,
        save_every: usize,
        eval_every: usize,
        start: Start,
        ranks: Arc<dyn Collective>,
    ) -> Result<Self> {
        let main = ranks.is_main();
        let lock = main.then(|| RunLock::acquire(out)).transpose()?;
        if main {
            rundir::prepare(out, start)?;
        }
        ranks.barrier()?; // the others read the folder once it is ready
        let lora = config.model.lora.rank > 0;
        let trainable = policy.prepare(&config.model, config.run.seed)?;
        let mut lp = DpoLoop::new(
            &mut policy,
            pairs,
            &DpoConfig::of_run(config),
            trainable,
            lora,
        )?
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
            save_every,
            eval_every,
            out_dir: out.to_path_buf(),
            config: serde_json::to_value(config)?,
            logs,
            first_eval: None,
            last_eval: None,
            weight_check_every: config.run.weight_check_every,
            ranks,
            _lock: lock,
        })
    }

    /// The held-out pair accuracy now, logged as `eval/rewards/*` at the current step.
    pub fn evaluate_held_out(&mut self) -> Result<()> {
        if self.held_out.is_empty() || !self.ranks.is_main() {
            return Ok(()); // rank 0 evaluates for the run
        }
        let m = self.lp.evaluate(&self.policy, &self.held_out)?;
        self.log(&m)?;
        if self.first_eval.is_none() {
            self.first_eval = Some(m.clone());
        }
        self.last_eval = Some(m);
        Ok(())
    }

    /// One step with its log row, and the held-out evaluation and checkpoint that fall
    /// on it; returns the step's metrics.
    pub fn train_step(&mut self) -> Result<Metrics> {
        let t = std::time::Instant::now();
        let mut m = self.lp.step(&self.policy)?;
        m.insert("perf/step_seconds".into(), t.elapsed().as_secs_f64());
        self.log(&m)?;
        let (step, last) = (self.lp.step, self.lp.done());
        if last || (self.eval_every > 0 && step.is_multiple_of(self.eval_every)) {
            self.evaluate_held_out()?;
        }
        if last || (self.save_every > 0 && step.is_multiple_of(self.save_every)) {
            self.lp.save(&self.out_dir, self.config.clone())?;
        }
        let every = self.weight_check_every;
        if self.ranks.world() > 1 && every > 0 && step.is_multiple_of(every) {
            check_weights(self.ranks.as_ref(), &self.lp.trainable(), step)?;
        }
        Ok(m)
    }

    fn log(&mut self, m: &Metrics) -> Result<()> {
        match &mut self.logs {
            Some(logs) => logs.write(self.lp.step, m),
            None => Ok(()),
        }
    }

    /// Trains to the last step (or SIGINT, which saves and returns `Interrupted`).
    pub fn run(&mut self) -> Result<RunEnd> {
        let total = self.lp.cfg.steps;
        let progress = if self.ranks.is_main() {
            Progress::new("dpo", total as u64, self.lp.step as u64)
        } else {
            Progress::silent()
        };
        if self.lp.step == 0 {
            self.evaluate_held_out()?; // the start's pair accuracy
        }
        while !self.lp.done() {
            let m = self.train_step()?;
            progress.update(
                self.lp.step as u64,
                &format!(
                    "loss {:.3} acc {:.2} margin {:+.3}",
                    m["loss"], m["rewards/accuracies"], m["rewards/margins"]
                ),
            );
            // every rank stops after the same step, or none does
            let stop = any_rank(self.ranks.as_ref(), INTERRUPTED.load(Ordering::SeqCst))?;
            if stop && !self.lp.done() {
                progress.finish();
                let dir = self.lp.save(&self.out_dir, self.config.clone())?;
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
}
