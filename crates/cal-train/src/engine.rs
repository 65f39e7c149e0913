//! The rollout-engine seam: who samples a step's completions. [`RolloutBackend`] is
//! what the trainer sees (`complete`, and for an engine that serves its own copy of the
//! weights, `sync` and `check_served` after every optimizer step); [`build`] picks the
//! implementation `rollout.engine` names:
//!
//! - [`Local`]: this process, with the trainer's own weights (nothing to sync);
//! - [`vllm::Vllm`]: vLLM servers, data-parallel replicas behind a failover pool
//!   ([`pool`]), started for the run by [`server`] when no URL is given.
//!
//! A second engine is one file beside `vllm.rs`, one arm in [`build`] and one variant of
//! [`crate::config::RolloutEngine`]. What every served engine shares lives here: the
//! probe whose log-probs must match the trainer's after each sync ([`SyncProbe`],
//! [`judge_served`]), so a server that kept old weights is an error, not a silent
//! off-policy run.

pub mod pool;
pub mod server;
pub mod vllm;

use crate::config::{RolloutConfig, RolloutEngine};
use crate::policy::Policy;
use crate::seed::mix_seed;
use anyhow::Result;
use cal_core::data::Example;
use cal_model::generate::{Generation, SamplingConfig};
use std::path::Path;

/// Sampling settings of one step's requests.
#[derive(Debug, Clone, Copy)]
pub struct EngineSampling {
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
}

/// One prompt per rollout: each example's `g` times, in group order.
pub fn per_rollout(prompts: Vec<Vec<u32>>, g: usize) -> Vec<Vec<u32>> {
    prompts
        .into_iter()
        .flat_map(|p| std::iter::repeat_n(p, g))
        .collect()
}

impl RolloutConfig {
    /// How the local generator samples the rollouts (`share_prompts`: each group's
    /// prompt prefilled once).
    pub fn sampling(&self, share_prompts: bool) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            share_prompts,
            ..SamplingConfig::default()
        }
    }

    /// How a serving engine samples them: a group's `G` completions per request.
    pub fn engine_sampling(&self) -> EngineSampling {
        EngineSampling {
            n: self.num_generations,
            max_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
        }
    }
}

/// Where a step's sampling randomness comes from (`rollout.seeds`).
pub enum StepSeeds<'a> {
    /// The run's RNG, drawn in order over the step's rows: the default.
    Stream(&'a mut rand_chacha::ChaCha8Rng),
    /// One stream per completion, seeded by the run seed, the group's index in the
    /// run's data stream (`index[i]` for prompt `i`) and the completion's place in its
    /// group: any split of a step's groups over processes samples what one would.
    Groups { seed: u64, index: &'a [u64] },
}

impl StepSeeds<'_> {
    /// Per-completion streams of `Groups` (`g` per prompt, in group order).
    fn row_rngs(seed: u64, index: &[u64], g: usize) -> Vec<rand_chacha::ChaCha8Rng> {
        use rand::SeedableRng;
        index
            .iter()
            .flat_map(|&i| (0..g as u64).map(move |j| mix_seed(&[seed, i, j])))
            .map(rand_chacha::ChaCha8Rng::seed_from_u64)
            .collect()
    }

    /// One seed per prompt, for an engine that seeds a group's request.
    pub fn prompt_seeds(&mut self, n: usize) -> Vec<u64> {
        use rand::Rng;
        match self {
            StepSeeds::Stream(rng) => (0..n).map(|_| rng.random::<u32>() as u64).collect(),
            StepSeeds::Groups { seed, index } => index
                .iter()
                .map(|&i| mix_seed(&[*seed, i]) & u64::from(u32::MAX))
                .collect(),
        }
    }
}

/// A step's completions, `G` per prompt in group order, with the engine's log-prob of
/// each token when an engine other than the trainer sampled them.
pub struct Samples {
    pub gens: Vec<Generation>,
    pub engine_logp: Option<Vec<Vec<f32>>>,
}

/// Who samples the rollouts.
pub trait RolloutBackend {
    /// `cfg.num_generations` completions of each prompt (one prompt per example).
    fn complete(
        &mut self,
        policy: &Policy,
        prompts: &[Vec<u32>],
        cfg: &RolloutConfig,
        share_prompts: bool,
        seeds: StepSeeds<'_>,
    ) -> Result<Samples>;

    /// Whether it serves its own copy of the weights (synced after every step).
    fn remote(&self) -> bool {
        false
    }

    /// Brings the served weights up to the policy's after optimizer step `step`.
    fn sync(&mut self, _policy: &Policy, _step: usize) -> Result<()> {
        Ok(())
    }

    /// The served weights against the policy's on a fixed completion: the largest mean
    /// |Δlogp| over servers (an error past `rollout.sync-check-tol`) and how far the
    /// policy moved since the last check.
    fn check_served(&mut self, _policy: &Policy) -> Result<(f64, f64)> {
        Ok((0.0, 0.0))
    }
}

/// Sampling in this process, from the trainer's own weights.
pub struct Local;

impl RolloutBackend for Local {
    fn complete(
        &mut self,
        policy: &Policy,
        prompts: &[Vec<u32>],
        cfg: &RolloutConfig,
        share_prompts: bool,
        seeds: StepSeeds<'_>,
    ) -> Result<Samples> {
        let rows = per_rollout(prompts.to_vec(), cfg.num_generations);
        let sampling = cfg.sampling(share_prompts);
        let batch = cfg.generation_batch;
        let gens = match seeds {
            StepSeeds::Stream(rng) => policy.sample(&rows, &sampling, batch, rng)?,
            StepSeeds::Groups { seed, index } => {
                if index.len() != prompts.len() {
                    anyhow::bail!(
                        "{} group indices for {} prompts",
                        index.len(),
                        prompts.len()
                    );
                }
                let mut rngs = StepSeeds::row_rngs(seed, index, cfg.num_generations);
                policy.sample_per_row(&rows, &sampling, batch, &mut rngs)?
            }
        };
        Ok(Samples {
            gens,
            engine_logp: None,
        })
    }
}

/// The engine `cfg.rollout.engine` names, started for `policy` at `step` (a served one
/// gets the weights and is checked; `probe_example` gives its fixed completion). `tag`
/// names this run's weights on a shared server; `out_dir` holds its sync folder unless
/// `rollout.sync-dir` says otherwise. Data-parallel `ranks` share the servers: rank 0
/// syncs them.
#[allow(clippy::too_many_arguments)]
pub fn build(
    cfg: &RolloutConfig,
    policy: &Policy,
    probe_example: &Example,
    step: usize,
    tag: &str,
    out_dir: &Path,
    rt: &tokio::runtime::Runtime,
    ranks: std::sync::Arc<dyn crate::collective::Collective>,
) -> Result<Box<dyn RolloutBackend>> {
    Ok(match cfg.engine {
        RolloutEngine::Local => Box::new(Local),
        RolloutEngine::Vllm => {
            let sync = (cfg.sync_dir.clone()).unwrap_or_else(|| out_dir.join("engine-sync"));
            let probe = SyncProbe::new(policy, probe_example)?;
            Box::new(vllm::Vllm::start(
                cfg,
                sync,
                tag,
                policy,
                probe,
                step,
                rt.handle().clone(),
                ranks,
            )?)
        }
    })
}

/// A fixed completion (the first training problem's prompt and the start of its
/// reference solution) whose log-probs a served engine must give as the trainer does
/// after every sync.
pub struct SyncProbe {
    prompt: Vec<u32>,
    completion: Vec<u32>,
    /// The trainer's log-probs of it at the last check.
    last: Vec<f32>,
}

impl SyncProbe {
    const TOKENS: usize = 24;

    pub fn new(policy: &Policy, example: &Example) -> Result<Self> {
        let mut completion = policy.target_ids(&example.answer)?;
        completion.truncate(Self::TOKENS);
        Ok(Self {
            prompt: policy.prompt_ids(&example.question)?,
            completion,
            last: Vec::new(),
        })
    }

    /// The servers against the trainer now: `served(prompt, completion, expected,
    /// previous)` asks them and judges the answer ([`judge_served`]), giving the largest
    /// mean |Δlogp|; also how far the trainer moved on the probe since the last check
    /// (the check tells stale weights apart only when that is larger).
    pub fn check(
        &mut self,
        policy: &Policy,
        served: impl FnOnce(&[u32], &[u32], &[f32], Option<&[f32]>) -> Result<f64>,
    ) -> Result<(f64, f64)> {
        let m = &policy.model;
        let batch = cal_model::generate::build_batch(
            std::slice::from_ref(&self.prompt),
            std::slice::from_ref(&self.completion),
            policy.tok.pad_id,
            &m.device,
        )?;
        let (lp, _) =
            cal_model::generate::completion_logprobs(m, &batch, cal_model::Forward::INFERENCE)?;
        let expected: Vec<f32> = lp.flatten_all()?.to_vec1()?;
        let previous = (!self.last.is_empty()).then_some(self.last.as_slice());
        let diff = served(&self.prompt, &self.completion, &expected, previous)?;
        let shift = previous.map_or(0.0, |p| {
            let s: f64 = p
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum();
            s / p.len().max(1) as f64
        });
        self.last = expected;
        Ok((diff, shift))
    }
}

/// Mean |a − b| (a NaN counts as infinitely far).
fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x as f64 - *y as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .sum();
    s / a.len().max(1) as f64
}

/// Does a server that gave log-probs `got` serve the weights that give `expected`?
/// Its mean |Δ| must be within `tol` (0: no bound), and when the step moved the
/// trainer measurably (from `previous`), it must be nearer the new log-probs than the
/// old: that catches stale weights even when the step was too small to cross `tol`.
/// `Ok` is the mean |Δ|.
pub fn judge_served(
    got: &[f32],
    expected: &[f32],
    previous: Option<&[f32]>,
    tol: f64,
) -> std::result::Result<f64, String> {
    if got.len() != expected.len() {
        return Err(format!(
            "{} log-probs for {} tokens",
            got.len(),
            expected.len()
        ));
    }
    let diff = mean_abs_diff(got, expected);
    if tol > 0.0 && diff > tol {
        return Err(format!(
            "mean |logp_server - logp_trainer| = {diff:.4} on a fixed completion, above \
             rollout.sync-check-tol = {tol}"
        ));
    }
    if let Some(prev) = previous {
        let (moved, to_old) = (mean_abs_diff(expected, prev), mean_abs_diff(got, prev));
        if moved > 1e-3 && to_old <= diff {
            return Err(format!(
                "on a fixed completion it is nearer the weights before the step (mean |Δlogp| \
                 {to_old:.4}) than after it ({diff:.4}); the step moved them by {moved:.4}"
            ));
        }
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_serves_the_new_weights_passes() {
        let (prev, new) = ([-1.0, -2.0, -3.0], [-1.5, -1.5, -2.5]);
        let got = [-1.5001, -1.4999, -2.5];
        let d = judge_served(&got, &new, Some(&prev), 0.05).unwrap();
        assert!(d < 1e-3, "{d}");
    }

    #[test]
    fn stale_weights_are_caught_below_the_tolerance() {
        // a small step: old and new within tol of each other, the server on the old
        let (prev, new) = ([-1.0, -2.0], [-1.01, -2.01]);
        let err = judge_served(&prev, &new, Some(&prev), 0.05).unwrap_err();
        assert!(err.contains("nearer the weights before the step"), "{err}");
        // a step too small to tell apart is not an error
        let (prev, new) = ([-1.0, -2.0], [-1.0001, -2.0]);
        assert!(judge_served(&prev, &new, Some(&prev), 0.05).is_ok());
    }

    #[test]
    fn other_weights_beyond_the_tolerance_are_an_error() {
        let err = judge_served(&[-1.0, -1.0], &[-1.2, -0.9], None, 0.05).unwrap_err();
        assert!(
            err.contains("0.1500") && err.contains("sync-check-tol"),
            "{err}"
        );
        // 0 turns the bound off; NaN is never within it
        assert!(judge_served(&[-1.0], &[-1.2], None, 0.0).is_ok());
        assert!(judge_served(&[f32::NAN], &[-1.2], None, 1.0).is_err());
        assert!(judge_served(&[-1.0], &[-1.0, -2.0], None, 1.0).is_err());
    }
}
