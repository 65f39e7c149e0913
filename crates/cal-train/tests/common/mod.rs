//! A small untrained `tiny`-style policy and generated problems, shared by the
//! training-loop tests.

use cal_core::data::{generate, Example, GenConfig};
use cal_core::reward::{Completion, Reward};
use cal_model::{tokenizer, ModelConfig, Transformer};
use cal_train::policy::Policy;
use candle_core::{DType, Device};

pub fn examples(n: usize) -> Vec<Example> {
    generate(n, 11, &GenConfig::default())
}

/// 2 layers, hidden 32, a 300-token BPE trained on the generated problems.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn policy(seed: u64) -> Policy {
    policy_shaped(seed, 16)
}

/// The same with heads of `head_dim` (2 query heads, 1 KV head, hidden 2 × head_dim).
#[allow(dead_code)] // not every test binary that shares this module uses it
pub fn policy_shaped(seed: u64, head_dim: usize) -> Policy {
    let corpus: Vec<String> = examples(200)
        .iter()
        .map(|e| format!("Question: {}\nAnswer: {}", e.question, e.answer))
        .collect();
    let tok = tokenizer::train_tiny(corpus.into_iter(), 300).unwrap();
    let vocab = tok.tokenizer.get_vocab_size(true);
    let cfg = ModelConfig {
        hidden_size: 2 * head_dim,
        intermediate_size: 4 * head_dim,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim,
        ..ModelConfig::tiny(vocab)
    };
    Policy::new(
        Transformer::init_random(cfg, seed, DType::F32, &Device::Cpu).unwrap(),
        tok,
    )
}

/// Fraction of the completion's characters that are digits: every random completion
/// has some, in varying amounts, so the group advantages are never all zero.
#[allow(dead_code)] // not every test binary that shares this module uses it
pub struct Digits;

impl Reward for Digits {
    fn name(&self) -> &'static str {
        "digits"
    }
    fn score(&self, c: &Completion) -> f64 {
        let n = c.text.chars().count().max(1);
        c.text.chars().filter(char::is_ascii_digit).count() as f64 / n as f64
    }
}
