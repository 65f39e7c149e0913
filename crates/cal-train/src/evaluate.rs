//! Evaluation: generate on a test split and grade ([`evaluate`]), and the one results
//! file every command writes and `compare` reads ([`EvalReport`]).

use crate::log::Progress;
use crate::policy::Policy;
use anyhow::{Context, Result};
use cal_core::data::Example;
use cal_core::evaluate::{accuracy, grade_example, Accuracy, GradedExample};
use cal_model::generate::SamplingConfig;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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

impl EvalConfig {
    /// Greedy held-out evaluation of a run: at the rollouts' length, with its seed.
    pub fn of_run(cfg: &crate::config::RunConfig) -> Self {
        Self {
            max_new_tokens: cfg.rollout.max_new_tokens,
            seed: cfg.run.seed,
            ..Self::default()
        }
    }
}

impl Default for EvalConfig {
    /// Greedy, at the rollouts' default length.
    fn default() -> Self {
        Self {
            max_new_tokens: crate::config::RolloutConfig::default().max_new_tokens,
            samples: 1,
            greedy: true,
            temperature: 0.7,
            batch_size: 32,
            seed: 0,
        }
    }
}

/// The `eval/*` scalars a training loop logs for a held-out evaluation of `total`
/// problems: accuracy (strict, flexible, and the one reported) and, when the responses
/// have arithmetic statements, the share of them that hold.
pub fn held_out_metrics(graded: &[GradedExample], total: usize) -> BTreeMap<String, f64> {
    let a = accuracy(graded, total);
    let mut m = BTreeMap::from([
        ("eval/accuracy".to_string(), a.accuracy),
        ("eval/strict_accuracy".to_string(), a.strict_accuracy),
        ("eval/flexible_accuracy".to_string(), a.flexible_accuracy),
    ]);
    if let Some(st) = step_accuracy(graded) {
        m.insert("eval/step_accuracy".into(), st);
    }
    m
}

/// The results of one evaluation: `eval_results.json` (with the per-example rows also
/// in `eval_examples.jsonl`), written by `eval` (model or `--predictions`), `train` and
/// `experiment`, read by `compare` and by `experiment` when it reuses a finished arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Label in comparisons: `baseline`, `cal`, a model or a predictions file.
    pub name: String,
    /// What produced the responses (a model, a predictions file or a run folder).
    #[serde(default)]
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    pub accuracy: Accuracy,
    /// Responses per item (k); `pass_at_k` is the fraction of items with a right one.
    #[serde(default = "one")]
    pub samples: usize,
    #[serde(default)]
    pub pass_at_k: f64,
    /// Fraction of the responses' arithmetic statements (`a op b = c`) that hold: the
    /// per-step accuracy of multi-step problems. `None` when no response has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_accuracy: Option<f64>,
    pub examples: Vec<GradedExample>,
    /// The configuration that produced it (a run's, or the evaluation's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// The prompt settings the model was asked with (template, system prompt,
    /// instruction, few-shot examples); `compare` warns when two reports differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<crate::prompt::PromptFormat>,
}

fn one() -> usize {
    1
}

/// Fraction of items (by dataset idx) with at least one correct response.
pub fn pass_at_k(examples: &[GradedExample]) -> f64 {
    let mut items: BTreeMap<u64, bool> = BTreeMap::new();
    for e in examples {
        *items.entry(e.idx).or_default() |= e.correct;
    }
    items.values().filter(|c| **c).count() as f64 / items.len().max(1) as f64
}

/// Fraction of the arithmetic statements in the responses that hold (see
/// [`cal_oracle::arith::claims`]).
pub fn step_accuracy(examples: &[GradedExample]) -> Option<f64> {
    let (mut holds, mut total) = (0usize, 0usize);
    for e in examples {
        for c in cal_oracle::arith::claims(&e.response) {
            total += 1;
            holds += usize::from(c.holds);
        }
    }
    (total > 0).then(|| holds as f64 / total as f64)
}

impl EvalReport {
    pub const FILE: &'static str = "eval_results.json";
    pub const EXAMPLES_FILE: &'static str = "eval_examples.jsonl";

    /// A report of graded responses; accuracy, k and pass@k are derived from them.
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        examples: Vec<GradedExample>,
        dataset_size: usize,
    ) -> Self {
        let mut per_item: BTreeMap<u64, usize> = BTreeMap::new();
        for e in &examples {
            *per_item.entry(e.idx).or_default() += 1;
        }
        Self {
            name: name.into(),
            source: source.into(),
            dataset: None,
            accuracy: accuracy(&examples, dataset_size),
            samples: per_item.values().copied().max().unwrap_or(1),
            pass_at_k: pass_at_k(&examples),
            step_accuracy: step_accuracy(&examples),
            examples,
            config: None,
            prompt: None,
        }
    }

    /// Writes `eval_results.json` and `eval_examples.jsonl` into `dir`; returns the
    /// results file.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let rows = dir.join(Self::EXAMPLES_FILE);
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&rows).with_context(|| format!("creating {}", rows.display()))?,
        );
        for e in &self.examples {
            writeln!(w, "{}", serde_json::to_string(e)?)?;
        }
        w.flush()?;
        let file = dir.join(Self::FILE);
        std::fs::write(&file, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(file)
    }

    /// Reads a results file, or the one in a run folder (`eval_results.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(Self::FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mut r: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not an evaluation report (write one with `cal-grpo eval`)",
                file.display()
            )
        })?;
        if r.name.is_empty() {
            r.name = file
                .parent()
                .and_then(|p| p.file_name())
                .map_or("run".into(), |n| n.to_string_lossy().into_owned());
        }
        Ok(r)
    }

    /// The accuracy lines printed after an evaluation.
    pub fn summary(&self) -> String {
        let a = &self.accuracy;
        let mut s = format!(
            "strict-match     {:6.2}%  ({}/{})\nflexible-extract {:6.2}%  ({}/{})",
            100.0 * a.strict_accuracy,
            a.strict_correct,
            a.total,
            100.0 * a.flexible_accuracy,
            a.flexible_correct,
            a.total
        );
        if let Some(st) = self.step_accuracy {
            s.push_str(&format!("\narithmetic steps {:6.2}%  right", 100.0 * st));
        }
        if self.samples > 1 {
            s.push_str(&format!(
                "\npass@{}           {:6.2}%  ({} items)",
                self.samples,
                100.0 * self.pass_at_k,
                a.items_covered
            ));
        }
        s
    }
}

/// Generates `cfg.samples` responses per example (greedy or sampled) and grades them;
/// [`EvalReport::new`] summarises.
pub fn evaluate(
    policy: &Policy,
    examples: &[Example],
    cfg: &EvalConfig,
    label: &str,
) -> Result<Vec<GradedExample>> {
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
            graded.extend(g);
        }
        let done = ((ci + 1) * bs).min(examples.len());
        let acc = graded.iter().filter(|g| g.correct).count() as f64 / graded.len().max(1) as f64;
        progress.update(done as u64, &format!("acc {:.1}%", 100.0 * acc));
    }
    progress.finish();
    Ok(graded)
}
