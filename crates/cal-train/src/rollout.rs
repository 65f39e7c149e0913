//! Generate: `G` completions per prompt from the current policy, in this process or on
//! a serving engine ([`crate::engine`]).

use crate::config::RolloutConfig;
use crate::engine::{per_rollout, RolloutBackend, StepSeeds};
use crate::policy::Policy;
use anyhow::{bail, Result};
use cal_core::data::Example;
use cal_model::generate::Generation;

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

/// Samples `cfg.num_generations` completions for each example on `engine`
/// (`share_prompts`: locally, each group's prompt prefilled once, its keys and values
/// copied to the group's rows).
pub fn generate(
    engine: &mut dyn RolloutBackend,
    policy: &Policy,
    examples: Vec<Example>,
    cfg: &RolloutConfig,
    share_prompts: bool,
    seeds: StepSeeds<'_>,
) -> Result<Rollouts> {
    let g = cfg.num_generations;
    let prompts = prompt_ids(policy, &examples)?;
    let samples = engine.complete(policy, &prompts, cfg, share_prompts, seeds)?;
    let mut r = Rollouts::new(examples, per_rollout(prompts, g), samples.gens, g)?;
    r.engine_logp = samples.engine_logp;
    Ok(r)
}
