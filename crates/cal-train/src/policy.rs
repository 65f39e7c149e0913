//! A policy = model + tokenizer + the way a question becomes a prompt.

use crate::config::LoraSection;
use anyhow::Result;
use cal_model::generate::{generate, generate_per_row, Generation, SamplingConfig};
use cal_model::tokenizer::TokenizerBundle;
use cal_model::Transformer;
use rand::Rng;

pub use crate::prompt::{PromptFormat, PromptStyle, DEFAULT_INSTRUCTION as CHAT_INSTRUCTION};

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
    /// Template, system prompt, instruction and few-shot examples ([`PromptFormat`]).
    pub prompt: PromptFormat,
}

impl Policy {
    pub fn new(model: Transformer, tok: TokenizerBundle) -> Self {
        let style = if tok.chat_template.is_some() {
            PromptStyle::Chat
        } else {
            PromptStyle::Plain
        };
        Self {
            model,
            tok,
            style,
            prompt: PromptFormat::default(),
        }
    }

    /// The policy with the run's prompt settings.
    pub fn with_prompt(mut self, prompt: PromptFormat) -> Self {
        self.prompt = prompt;
        self
    }

    pub fn prompt_text(&self, question: &str) -> Result<String> {
        self.prompt
            .render(question, self.style, self.tok.chat_template.as_ref())
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

    /// Readies the model for training as `model` configures it: the base quantized
    /// (QLoRA, `model.quantize-base`; it needs adapters), then the adapters attached
    /// ([`Policy::attach_lora`]). Returns which parameters train.
    pub fn prepare(
        &mut self,
        model: &crate::config::ModelSection,
        seed: u64,
    ) -> Result<fn(&str) -> bool> {
        if model.quantize_base.on() && model.lora.rank == 0 {
            anyhow::bail!(
                "--quantize-base {:?} freezes the base: it needs LoRA adapters (--lora-rank)",
                model.quantize_base
            );
        }
        if model.quantize_base == crate::config::QuantizeBase::Keep
            && self.model.quantized.is_empty()
        {
            anyhow::bail!(
                "--quantize-base keep: this model was not loaded with its quantized blocks \
                 kept (keep needs a .gguf model, loaded by train, sft, dpo, eval or export)"
            );
        }
        if let Some(q) = model.quantize_base.ggml() {
            let bytes = self.model.quantize_base(q)?;
            tracing::info!("base quantized to {q:?}: {:.1} MB", bytes as f64 / 1e6);
        }
        self.attach_lora(&model.lora, seed)
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

    /// [`Policy::sample`] with one random stream per prompt (`rngs[i]` samples prompt
    /// `i`): each completion is the same whatever batch or process samples it.
    pub fn sample_per_row<R: Rng>(
        &self,
        prompts: &[Vec<u32>],
        cfg: &SamplingConfig,
        batch: usize,
        rngs: &mut [R],
    ) -> Result<Vec<Generation>> {
        let mut out = Vec::with_capacity(prompts.len());
        let batch = batch.max(1);
        for (chunk, r) in prompts.chunks(batch).zip(rngs.chunks_mut(batch)) {
            out.extend(generate_per_row(&self.model, &self.tok, chunk, cfg, r)?);
        }
        Ok(out)
    }
}
