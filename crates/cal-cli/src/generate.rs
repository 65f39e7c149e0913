//! `cal-grpo generate`: one completion from a model, for a quick look.

use anyhow::{anyhow, Result};
use cal_model::generate::{generate, SamplingConfig};
use cal_train::policy::PolicySource;
use clap::Args;
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// `tiny`, a Hugging Face model folder, a `.gguf` file, or `random:CONFIG.json`.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub placement: crate::config::PlacementFlags,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (as a user turn).
    #[arg(long)]
    pub chat: bool,
    /// Argmax decoding.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print token ids, text and offsets as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let model = args.model.to_string_lossy();
    let loaded = crate::source::Source::new(&model, args.placement.placement()).fresh()?;
    let tok = &loaded.tok;
    let text = if args.chat {
        let tpl = tok.chat_template.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: the model has no chat template; drop --chat",
                args.model.display()
            )
        })?;
        tpl.render(&[("user", args.prompt.as_str())], true)?
    } else {
        args.prompt.clone()
    };
    let mut ids = tok.encode(&text)?;
    if let (Some(bos), false) = (tok.bos_id, args.chat) {
        if ids.first() != Some(&bos) && tok.chat_template.is_none() {
            ids.insert(0, bos);
        }
    }
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        greedy: args.greedy,
        top_k: args.top_k,
        top_p: args.top_p,
        ..SamplingConfig::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let t0 = std::time::Instant::now();
    let out = generate(&loaded.model, tok, &[ids.clone()], &cfg, &mut rng)?.remove(0);
    let secs = t0.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"prompt_ids": ids, "ids": out.ids, "text": out.text, "offsets": out.offsets, "finish": out.finish})
        );
    } else {
        println!("{}", out.text);
        eprintln!(
            "[{} tokens in {:.2}s, {:.1} tok/s]",
            out.ids.len(),
            secs,
            out.ids.len() as f64 / secs
        );
    }
    Ok(())
}
