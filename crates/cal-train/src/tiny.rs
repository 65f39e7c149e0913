//! The embedded default: a `tiny` policy trained from scratch in-process on generated
//! GSM8K-format problems (tokenizer + SFT), cached on disk so that later runs start in
//! seconds. Nothing is downloaded.

use crate::adamw::OptimConfig;
use crate::policy::Policy;
use crate::sft::{sft, SftConfig, SftReport};
use anyhow::{Context, Result};
use cal_core::data::{generate, misconception, Example, GenConfig, Style};
use cal_model::{load, tokenizer, ModelConfig, Transformer};
use candle_core::{DType, Device};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Bumped when the recipe changes in a way the spec does not capture.
const RECIPE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinySpec {
    pub generator: GenConfig,
    pub train_problems: usize,
    pub test_problems: usize,
    pub data_seed: u64,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Train on solutions without `<<a*b=c>>` notes: 40% fewer tokens, and the
    /// calculator oracle checks the visible `a * b = c` statements just as well.
    pub strip_notes: bool,
    /// Chance that an SFT demonstration step that carries or borrows is worked with
    /// its classic misconception ([`cal_core::data::misconception`]); 0 = clean data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub misconception_rate: f64,
    pub sft: SftConfig,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            generator: GenConfig {
                min_steps: 2,
                max_steps: 3,
                max_operand: 20,
                max_factor: 5,
                mul_div: true,
                style: Style::Story,
                max_value: None,
            },
            train_problems: 4000,
            test_problems: 200,
            data_seed: 1234,
            vocab_size: 400,
            hidden_size: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            strip_notes: false,
            misconception_rate: 0.0,
            sft: SftConfig {
                steps: 400,
                batch_size: 32,
                optim: OptimConfig {
                    lr: 3e-3,
                    weight_decay: 0.01,
                    warmup_steps: 20,
                    min_lr_ratio: 0.05,
                    ..OptimConfig::default()
                },
                seed: 7,
                micro_batch_tokens: 0,
            },
        }
    }
}

impl TinySpec {
    /// The embedded benchmark of a run: `[data]`'s wording and steps, `[model.tiny]`'s
    /// overrides of the recipe.
    pub fn for_run(tiny: &crate::config::TinySection, data: &crate::config::DataSection) -> Self {
        let mut spec = Self::for_data(data);
        if let Some(n) = tiny.sft_steps {
            spec.sft.steps = n;
        }
        if let Some(lr) = tiny.sft_learning_rate {
            spec.sft.optim.lr = lr;
        }
        if let Some(n) = tiny.train_problems {
            spec.train_problems = n;
        }
        if let Some(h) = tiny.hidden_size {
            spec.hidden_size = h;
        }
        if let Some(l) = tiny.layers {
            spec.layers = l;
        }
        if let Some(r) = tiny.misconception_rate {
            spec.misconception_rate = r;
        }
        if let Some(v) = tiny.max_value {
            spec.generator.max_value = Some(v);
        }
        if let Ok(Some((min, max))) = tiny.sft_chain_range() {
            spec.generator.min_steps = min;
            spec.generator.max_steps = max;
        }
        spec
    }

    /// The RL problems of a run (train, held out). Without `sft-chain-steps` they are
    /// the SFT corpus's own ([`TinySpec::splits`], as always). With it, they are drawn
    /// the same way at the run's K, and no held-out question is one the SFT trained on.
    pub fn run_splits(
        tiny: &crate::config::TinySection,
        data: &crate::config::DataSection,
    ) -> (Vec<Example>, Vec<Example>) {
        let mut sft = Self::for_run(tiny, data);
        // Held-out problems come from their own seed and never feed SFT, so a run may ask
        // for more of them (`--eval-samples 1000`) without a new warm start: the spec (and
        // its cache key) keeps its 200, and problem i is the same whatever the count.
        if let Ok(n) = usize::try_from(data.eval_samples) {
            sft.test_problems = sft.test_problems.max(n);
        }
        if tiny.sft_chain_steps.is_none() {
            return sft.splits();
        }
        let k = Self::for_data(data).generator;
        let mut rl = sft.clone();
        rl.generator.min_steps = k.min_steps;
        rl.generator.max_steps = k.max_steps;
        let (sft_train, _) = sft.splits();
        let seen: HashSet<&str> = sft_train.iter().map(|e| e.question.as_str()).collect();
        rl.splits_excluding(&seen)
    }

    /// The embedded benchmark of a run's `[data]`: the generator's wording and steps.
    pub fn for_data(data: &crate::config::DataSection) -> Self {
        let mut spec = Self::default();
        spec.generator.style = data.style;
        if data.style == Style::Chain {
            // A chain problem is about a third of a story's tokens: three times the SFT
            // steps fit the same time, and the arithmetic needs them.
            spec.sft.steps *= 3;
            // Two-digit values keep the arithmetic learnable in minutes; demonstrations
            // that show a classic carry/borrow misconception on 60% of the steps where
            // it can show give a warm start that has both the bug and the rule, which
            // is what RL can act on (`docs/design.md`, "The embedded benchmark";
            // measured in `docs/results.md`).
            spec.generator.max_value = Some(99);
            spec.misconception_rate = 0.6;
        }
        if let Some(k) = data.steps {
            spec.generator.min_steps = k;
            spec.generator.max_steps = k;
        }
        spec
    }

    pub fn model_config(&self, vocab: usize) -> ModelConfig {
        let head_dim = self.hidden_size / self.heads;
        ModelConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.hidden_size * 8 / 3 / 16 * 16,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim,
            ..ModelConfig::tiny(vocab)
        }
    }

    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(self).unwrap());
        h.update(RECIPE_VERSION.to_le_bytes());
        format!("{:x}", h.finalize())[..16].to_string()
    }

    /// Train and held-out problems; held-out questions never appear in train.
    pub fn splits(&self) -> (Vec<Example>, Vec<Example>) {
        self.splits_excluding(&HashSet::new())
    }

    /// [`TinySpec::splits`], with no held-out question in `exclude` either.
    fn splits_excluding(&self, exclude: &HashSet<&str>) -> (Vec<Example>, Vec<Example>) {
        let train = generate(self.train_problems, self.data_seed, &self.generator);
        let mut seen: HashSet<&str> = train.iter().map(|e| e.question.as_str()).collect();
        seen.extend(exclude);
        let test: Vec<Example> = generate(
            self.test_problems * 2,
            self.data_seed ^ 0x005e_ed0f_7e57,
            &self.generator,
        )
        .into_iter()
        .filter(|e| !seen.contains(e.question.as_str()))
        .take(self.test_problems)
        .collect();
        (train, test)
    }
}

pub struct TinyPolicy {
    pub policy: Policy,
    pub dir: PathBuf,
    /// `None` when loaded from the cache.
    pub sft: Option<SftReport>,
}

/// Loads the SFT-warmed tiny policy from the cache onto `dev` in `dtype`, or trains
/// (there) and caches it.
pub fn tiny_policy(spec: &TinySpec, root: &Path, dev: &Device, dtype: DType) -> Result<TinyPolicy> {
    let dir = root.join(format!("tiny-{}", spec.key()));
    if dir.join("model.safetensors").exists() {
        let loaded = load::load_hf(&dir, dtype, dev)?;
        let mut policy = Policy::new(loaded.model, loaded.tokenizer);
        policy.style = crate::policy::PromptStyle::Plain;
        return Ok(TinyPolicy {
            policy,
            dir,
            sft: None,
        });
    }
    let (mut train, _) = spec.splits();
    if spec.strip_notes {
        for e in train.iter_mut() {
            e.answer = cal_core::data::gsm8k::strip_notes(&e.answer);
        }
    }
    if spec.misconception_rate > 0.0 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.sft.seed ^ 0xb065);
        for e in train.iter_mut() {
            *e = misconception::demonstrate(e, spec.misconception_rate, &mut rng);
        }
    }
    let corpus: Vec<String> = train
        .iter()
        .map(|e| format!("Question: {}\nAnswer: {}", e.question, e.answer))
        .collect();
    let tok = tokenizer::train_tiny(corpus.into_iter(), spec.vocab_size)?;
    let vocab = tok.tokenizer.get_vocab_size(true);
    let model = Transformer::init_random(spec.model_config(vocab), spec.sft.seed, dtype, dev)?;
    let mut policy = Policy::new(model, tok);
    eprintln!(
        "training the tiny policy from scratch ({} parameters, vocab {vocab}) on {} generated problems; cached in {}",
        policy.model.cfg.num_params(),
        train.len(),
        dir.display()
    );
    let report = sft(&mut policy, &train, &spec.sft, |_| true)?;
    let tmp = root.join(format!(".tiny-{}.tmp{}", spec.key(), std::process::id()));
    load::export_hf(&policy.model, &policy.tok, &tmp)?;
    std::fs::write(
        tmp.join("tiny_spec.json"),
        serde_json::to_string_pretty(spec)?,
    )?;
    std::fs::write(
        tmp.join("sft_report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    // Atomic publish: a concurrent or killed run never sees a half-written cache.
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).with_context(|| format!("publishing {}", dir.display())),
    }
    Ok(TinyPolicy {
        policy,
        dir,
        sft: Some(report),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataSection, TinySection};

    fn steps(e: &Example) -> usize {
        e.answer.lines().filter(|l| l.contains(" = ")).count()
    }

    #[test]
    fn one_warm_start_serves_runs_at_several_chain_lengths() {
        let at = |k| DataSection {
            style: Style::Chain,
            steps: Some(k),
            ..DataSection::default()
        };
        // without sft-chain-steps: the SFT corpus's own problems, as always
        let plain = TinySection::default();
        let (a, b) = TinySpec::run_splits(&plain, &at(4));
        let (c, d) = TinySpec::for_run(&plain, &at(4)).splits();
        assert_eq!((a, b), (c, d));
        // with it: one SFT recipe (one cache key) for every K ...
        let mixed = TinySection {
            sft_chain_steps: Some("2-6".into()),
            ..TinySection::default()
        };
        let sft = TinySpec::for_run(&mixed, &at(4));
        assert_eq!((sft.generator.min_steps, sft.generator.max_steps), (2, 6));
        assert_eq!(sft.key(), TinySpec::for_run(&mixed, &at(6)).key());
        let (sft_train, _) = sft.splits();
        assert!((2..=6).all(|k| sft_train.iter().any(|e| steps(e) == k)));
        // ... and RL problems at the run's K, none held out that the SFT trained on
        for k in [2, 6] {
            let (train, test) = TinySpec::run_splits(&mixed, &at(k));
            assert_eq!(test.len(), sft.test_problems);
            assert!(train.iter().chain(&test).all(|e| steps(e) == k), "K = {k}");
            let seen: HashSet<&str> = sft_train.iter().map(|e| e.question.as_str()).collect();
            assert!(test.iter().all(|e| !seen.contains(e.question.as_str())));
        }
    }

    #[test]
    fn more_held_out_problems_keep_the_first_ones_and_the_warm_start() {
        let data = |n: i64| DataSection {
            style: Style::Chain,
            steps: Some(4),
            eval_samples: n,
            ..DataSection::default()
        };
        let tiny = TinySection::default();
        let (train, test) = TinySpec::run_splits(&tiny, &data(-1));
        let (train_big, test_big) = TinySpec::run_splits(&tiny, &data(1000));
        assert_eq!(test.len(), 200);
        assert_eq!(test_big.len(), 1000);
        assert_eq!(test_big[..200], test[..]);
        assert_eq!(train_big, train);
        let trained: HashSet<&str> = train.iter().map(|e| e.question.as_str()).collect();
        assert!(test_big
            .iter()
            .all(|e| !trained.contains(e.question.as_str())));
        // the warm start's cache key does not see the held-out size
        assert_eq!(
            TinySpec::for_run(&tiny, &data(1000)).key(),
            TinySpec::for_run(&tiny, &data(-1)).key()
        );
    }
}
