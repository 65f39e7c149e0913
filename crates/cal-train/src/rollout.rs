//! Generate: `G` completions per prompt from the current policy, in this process or on
//! a serving engine ([`crate::engine`]).

use crate::config::RolloutConfig;
use crate::engine::{EngineSampling, VllmEngine};
use crate::policy::Policy;
use anyhow::{bail, Result};
use cal_core::data::Example;
use cal_model::generate::{Generation, SamplingConfig};
use rand::Rng;

/// One step's samples: rollout `i` answers `examples[i / group]` with prompt
/// `prompts[i]`. Later stages add grades, spans and advantages by row index.
pub struct Rollouts {
    pub examples: Vec<Example>,
    pub prompts: Vec<Vec<u32>>,
    pub gens: Vec<Generation>,
    /// The group size `G`.
    pub group: usize,
    /// The sampling engine's log-prob of each completion token, when an engine other
    /// than the trainer sampled (the importance weights correct for the difference).
    pub engine_logp: Option<Vec<Vec<f32>>>,
}

impl Rollouts {
    /// Checks that the parts line up (`G` completions per example, one prompt each).
    pub fn new(
        examples: Vec<Example>,
        prompts: Vec<Vec<u32>>,
        gens: Vec<Generation>,
        group: usize,
    ) -> Result<Self> {
        if gens.len() != examples.len() * group || prompts.len() != gens.len() {
            bail!(
                "{} completions and {} prompts for {} examples × {group} generations",
                gens.len(),
                prompts.len(),
                examples.len()
            );
        }
        Ok(Self {
            examples,
            prompts,
            gens,
            group,
            engine_logp: None,
        })
    }

    pub fn len(&self) -> usize {
        self.gens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gens.is_empty()
    }

    /// The problem rollout `i` answers.
    pub fn example(&self, i: usize) -> &Example {
        &self.examples[i / self.group]
    }

    /// Completion tokens of the whole step.
    pub fn completion_tokens(&self) -> usize {
        self.gens.iter().map(|g| g.ids.len()).sum()
    }
}

/// Each example's prompt, tokenised once.
fn prompt_ids(policy: &Policy, examples: &[Example]) -> Result<Vec<Vec<u32>>> {
    examples
        .iter()
        .map(|e| policy.prompt_ids(&e.question))
        .collect()
}

/// One prompt per rollout: each example's `g` times, in group order.
fn per_rollout(prompts: Vec<Vec<u32>>, g: usize) -> Vec<Vec<u32>> {
    prompts
        .into_iter()
        .flat_map(|p| std::iter::repeat_n(p, g))
        .collect()
}

/// Samples `cfg.num_generations` completions for each example (`share_prompts`: each
/// group's prompt prefilled once, its keys and values copied to the group's rows).
pub fn generate(
    policy: &Policy,
    examples: Vec<Example>,
    cfg: &RolloutConfig,
    share_prompts: bool,
    rng: &mut impl Rng,
) -> Result<Rollouts> {
    let g = cfg.num_generations;
    let prompts = per_rollout(prompt_ids(policy, &examples)?, g);
    let sampling = SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        share_prompts,
        ..SamplingConfig::default()
    };
    let gens = policy.sample(&prompts, &sampling, cfg.generation_batch, rng)?;
    Rollouts::new(examples, prompts, gens, g)
}

/// [`generate`] on a serving engine: one request per example asks for its `G`
/// completions (seeded from the run's RNG), returned as token ids with the engine's
/// log-probs.
pub fn generate_on_engine(
    engine: &VllmEngine,
    rt: &tokio::runtime::Runtime,
    policy: &Policy,
    examples: Vec<Example>,
    cfg: &RolloutConfig,
    rng: &mut impl Rng,
) -> Result<Rollouts> {
    let g = cfg.num_generations;
    let prompts = prompt_ids(policy, &examples)?;
    let seeds: Vec<u64> = prompts.iter().map(|_| rng.random::<u32>() as u64).collect();
    let sampling = EngineSampling {
        n: g,
        max_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
    };
    let replies = rt.block_on(engine.complete(&prompts, &seeds, sampling, &policy.tok))?;
    let mut gens = Vec::with_capacity(prompts.len() * g);
    let mut logq = Vec::with_capacity(prompts.len() * g);
    for c in replies.into_iter().flatten() {
        gens.push(c.generation);
        logq.push(c.logprobs);
    }
    let mut r = Rollouts::new(examples, per_rollout(prompts, g), gens, g)?;
    r.engine_logp = Some(logq);
    Ok(r)
}
