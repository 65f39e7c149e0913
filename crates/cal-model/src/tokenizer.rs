//! Tokenizers and chat templates.
//!
//! - [`train_tiny`]: a byte-level BPE trained in-process on a corpus (the embedded
//!   default needs no download). Digits are split one by one, as SmolLM2 and Llama 3
//!   do, which makes arithmetic learnable for a tiny model.
//! - [`from_gguf`]: the GPT-2-style byte-level BPE stored in GGUF metadata
//!   (`tokenizer.ggml.tokens` / `merges`), rebuilt as a `tokenizers::Tokenizer`.
//! - [`ChatTemplate`]: Hugging Face Jinja chat templates rendered with minijinja.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer, TokenizerBuilder};

pub const TINY_EOS: &str = "<|endoftext|>";
pub const TINY_PAD: &str = "<|pad|>";

/// A tokenizer with the ids and template a generator needs.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
    pub bos_id: Option<u32>,
    pub chat_template: Option<ChatTemplate>,
}

impl TokenizerBundle {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.id_to_token(id).unwrap_or_default()
    }
}

fn byte_level_pipeline(
    pre: PreTokenizerWrapper,
) -> Result<
    tokenizers::TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, ByteLevel, ByteLevel>,
> {
    let bl = ByteLevel::new(false, false, true);
    TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(Some(bl))
        .with_decoder(Some(bl))
        .build()
        .map_err(|e| anyhow!("building tokenizer: {e}"))
}

/// Trains the `tiny` byte-level BPE on `corpus`.
pub fn train_tiny<I: Iterator<Item = String> + Send>(
    corpus: I,
    vocab_size: usize,
) -> Result<TokenizerBundle> {
    let pre = PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
    ]));
    let mut tok = byte_level_pipeline(pre)?;
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![
            AddedToken::from(TINY_EOS, true),
            AddedToken::from(TINY_PAD, true),
        ])
        .build();
    tok.train(&mut trainer, corpus)
        .map_err(|e| anyhow!("training tokenizer: {e}"))?;
    let tokenizer: Tokenizer = tok.into();
    let eos = tokenizer.token_to_id(TINY_EOS).context("eos token")?;
    let pad = tokenizer.token_to_id(TINY_PAD).context("pad token")?;
    Ok(TokenizerBundle {
        tokenizer,
        eos_ids: vec![eos],
        pad_id: pad,
        bos_id: None,
        chat_template: None,
    })
}

/// GPT-2's pre-tokenizer regex and Qwen2's / Llama 3's variant.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Rebuilds a byte-level BPE tokenizer from GGUF metadata.
pub fn from_gguf(
    md: &HashMap<String, candle_core::quantized::gguf_file::Value>,
) -> Result<TokenizerBundle> {
    let get = |k: &str| {
        md.get(k)
            .ok_or_else(|| anyhow!("GGUF metadata has no `{k}`"))
    };
    let model = get("tokenizer.ggml.model")?.to_string()?.clone();
    if model != "gpt2" {
        bail!("GGUF tokenizer model {model:?} is not supported (only byte-level BPE, `gpt2`)");
    }
    let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
        .to_vec()?
        .iter()
        .map(|v| {
            let s = v.to_string()?;
            let (a, b) = s
                .split_once(' ')
                .ok_or_else(|| candle_core::Error::Msg(format!("bad merge {s:?}")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<candle_core::Result<_>>()?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("GGUF BPE: {e}"))?;
    let pre_name = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let split = |pat: &str| -> Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(pat.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?,
        ))
    };
    let bl_noregex = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false));
    let pre = match pre_name.as_str() {
        // SmolLM / StarCoder: digits one by one, then GPT-2 byte-level.
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
        ])),
        "qwen2" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2_PATTERN)?, bl_noregex]))
        }
        "llama3" | "llama-bpe" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3_PATTERN)?, bl_noregex]))
        }
        _ => PreTokenizerWrapper::Sequence(Sequence::new(vec![split(GPT2_PATTERN)?, bl_noregex])),
    };
    let bl = ByteLevel::new(false, false, true);
    let mut tokenizer: Tokenizer = TokenizerBuilder::new()
        .with_model(bpe)
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(Some(bl))
        .with_decoder(Some(bl))
        .build()
        .map_err(|e| anyhow!("GGUF tokenizer: {e}"))?
        .into();
    // Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(s, t)| AddedToken::from(s.clone(), *t == 3))
        .collect();
    tokenizer.add_special_tokens(&special);
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let eos = id("tokenizer.ggml.eos_token_id").context("GGUF metadata has no eos token id")?;
    let mut eos_ids = vec![eos];
    for extra in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
        if let Some(i) = tokenizer.token_to_id(extra) {
            if !eos_ids.contains(&i) {
                eos_ids.push(i);
            }
        }
    }
    let chat_template = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .map(|s| {
            ChatTemplate::new(
                s.clone(),
                tokens.get(eos as usize).cloned().unwrap_or_default(),
                None,
            )
        });
    let bos_id = id("tokenizer.ggml.bos_token_id");
    Ok(TokenizerBundle {
        tokenizer,
        eos_ids,
        pad_id: id("tokenizer.ggml.padding_token_id").unwrap_or(eos),
        bos_id,
        chat_template,
    })
}

/// A Hugging Face chat template (Jinja).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub eos_token: String,
    pub bos_token: Option<String>,
}

impl ChatTemplate {
    pub fn new(source: String, eos_token: String, bos_token: Option<String>) -> Self {
        Self {
            source,
            eos_token,
            bos_token,
        }
    }

    /// Renders `messages` (role, content) with `add_generation_prompt`.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .context("parsing chat template")?;
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        let out = env
            .get_template("chat")?
            .render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => add_generation_prompt,
                eos_token => self.eos_token,
                bos_token => self.bos_token.clone().unwrap_or_default(),
            })
            .context("rendering chat template")?;
        Ok(out)
    }
}
