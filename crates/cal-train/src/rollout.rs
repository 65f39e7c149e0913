//! Generate: `G` completions per prompt from the current policy.

use crate::config::RolloutConfig;
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

/// Samples `cfg.num_generations` completions for each example.
pub fn generate(
    policy: &Policy,
    examples: Vec<Example>,
    cfg: &RolloutConfig,
    rng: &mut impl Rng,
) -> Result<Rollouts> {
    let g = cfg.num_generations;
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .flat_map(|e| std::iter::repeat_n(e, g))
        .map(|e| policy.prompt_ids(&e.question))
        .collect::<Result<_>>()?;
    let sampling = SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        ..SamplingConfig::default()
    };
    let gens = policy.sample(&prompts, &sampling, cfg.generation_batch, rng)?;
    Rollouts::new(examples, prompts, gens, g)
}
