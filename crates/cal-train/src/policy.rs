//! A policy = model + tokenizer + the way a question becomes a prompt.

use crate::config::LoraSection;
use anyhow::Result;
use cal_model::generate::{generate, Generation, SamplingConfig};
use cal_model::tokenizer::TokenizerBundle;
use cal_model::Transformer;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How questions are turned into prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptStyle {
    /// `Question: ...\nAnswer:` (the `tiny` model and base models).
    Plain,
    /// The model's chat template with one user turn.
    Chat,
}

/// The instruction appended to the question for chat models: it asks for the format
/// the grader (`####`) and the calculator oracle (`a op b = c`) read best.
pub const CHAT_INSTRUCTION: &str =
    "Solve the problem step by step. Write every calculation as an equation like 3 * 4 = 12. \
     End with a final line of the form '#### <number>'.";

/// Where a run's starting policy comes from (the embedded `tiny`, a folder, a GGUF
/// file): every run of an experiment takes a fresh copy of the same start.
pub trait PolicySource {
    /// A fresh copy of the starting policy.
    fn fresh(&self) -> Result<Policy>;
    fn describe(&self) -> String;
}

pub struct Policy {
    pub model: Transformer,
    pub tok: TokenizerBundle,
    pub style: PromptStyle,
}

impl Policy {
    pub fn new(model: Transformer, tok: TokenizerBundle) -> Self {
        let style = if tok.chat_template.is_some() {
            PromptStyle::Chat
        } else {
            PromptStyle::Plain
        };
        Self { model, tok, style }
    }

    pub fn prompt_text(&self, question: &str) -> Result<String> {
        Ok(match (self.style, &self.tok.chat_template) {
            (PromptStyle::Chat, Some(t)) => {
                let msg = format!("{question}\n{CHAT_INSTRUCTION}");
                t.render(&[("user", msg.as_str())], true)?
            }
            _ => format!("Question: {question}\nAnswer:"),
        })
    }

    pub fn prompt_ids(&self, question: &str) -> Result<Vec<u32>> {
        let mut ids = self.tok.encode(&self.prompt_text(question)?)?;
        if let (PromptStyle::Plain, Some(bos)) = (self.style, self.tok.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Supervised target for a worked solution, ending in the stop token.
    pub fn target_ids(&self, solution: &str) -> Result<Vec<u32>> {
        let text = match self.style {
            PromptStyle::Plain => format!(" {solution}"),
            PromptStyle::Chat => solution.to_string(),
        };
        let mut ids = self.tok.encode(&text)?;
        ids.push(self.tok.eos_ids[0]);
        Ok(ids)
    }

    /// Adds the configured LoRA adapters (none when `lora.rank` is 0) and says which
    /// parameters train: the adapters alone with LoRA, every weight without. One place
    /// for RL and SFT, so both train the same parameters for the same configuration.
    pub fn attach_lora(&mut self, lora: &LoraSection, seed: u64) -> Result<fn(&str) -> bool> {
        fn adapters(name: &str) -> bool {
            name.contains(".lora_")
        }
        fn all(_: &str) -> bool {
            true
        }
        Ok(match lora.adapters() {
            Some(l) => {
                self.model.add_lora(l, seed)?;
                adapters
            }
            None => all,
        })
    }

    /// Samples one completion per prompt, in batches of at most `batch`.
    pub fn sample(
        &self,
        prompts: &[Vec<u32>],
        cfg: &SamplingConfig,
        batch: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<Generation>> {
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(batch.max(1)) {
            out.extend(generate(&self.model, &self.tok, chunk, cfg, rng)?);
        }
        Ok(out)
    }
}
