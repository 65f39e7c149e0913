//! Model-based evaluation: generate on a test split, grade, summarise.

use crate::log::Progress;
use crate::policy::Policy;
use anyhow::Result;
use cal_core::data::Example;
use cal_core::evaluate::{accuracy, grade_example, Accuracy, GradedExample};
use cal_model::generate::SamplingConfig;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub max_new_tokens: usize,
    /// Samples per question; 1 with `greedy` is the standard metric, k > 1 gives pass@k.
    pub samples: usize,
    pub greedy: bool,
    pub temperature: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            samples: 1,
            greedy: true,
            temperature: 0.7,
            batch_size: 32,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub accuracy: Accuracy,
    /// Fraction of questions with at least one correct sample (= accuracy when k = 1).
    pub pass_at_k: f64,
    pub samples: usize,
    pub examples: Vec<GradedExample>,
}

pub fn evaluate(
    policy: &Policy,
    examples: &[Example],
    cfg: &EvalConfig,
    label: &str,
) -> Result<EvalResult> {
    let sampling = SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        greedy: cfg.greedy,
        temperature: cfg.temperature,
        ..SamplingConfig::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let k = cfg.samples.max(1);
    let mut graded = Vec::with_capacity(examples.len() * k);
    let progress = Progress::new(label, examples.len() as u64, 0);
    let bs = (cfg.batch_size / k).max(1);
    let mut correct_any = 0;
    for (ci, chunk) in examples.chunks(bs).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .flat_map(|e| std::iter::repeat_n(e, k))
            .map(|e| policy.prompt_ids(&e.question))
            .collect::<Result<_>>()?;
        let gens = policy.sample(&prompts, &sampling, cfg.batch_size, &mut rng)?;
        for (i, ex) in chunk.iter().enumerate() {
            let g: Vec<GradedExample> = gens[i * k..(i + 1) * k]
                .iter()
                .map(|g| grade_example(ex, &g.text))
                .collect();
            correct_any += usize::from(g.iter().any(|x| x.correct));
            graded.extend(g);
        }
        let done = ((ci + 1) * bs).min(examples.len());
        let acc = graded.iter().filter(|g| g.correct).count() as f64 / graded.len().max(1) as f64;
        progress.update(done as u64, &format!("acc {:.1}%", 100.0 * acc));
    }
    progress.finish();
    Ok(EvalResult {
        accuracy: accuracy(&graded, examples.len()),
        pass_at_k: correct_any as f64 / examples.len().max(1) as f64,
        samples: k,
        examples: graded,
    })
}
