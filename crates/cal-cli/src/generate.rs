//! `cal-grpo generate`: one completion from a model, for a quick look.

use anyhow::{anyhow, bail, Result};
use cal_model::generate::{generate, SamplingConfig};
use cal_train::policy::PolicySource;
use cal_train::prompt::PromptFormat;
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
    /// Raw prompt text, sent as it is (see --chat); or use --question.
    #[arg(
        long,
        required_unless_present = "question",
        conflicts_with = "question"
    )]
    pub prompt: Option<String>,
    /// Wrap --prompt in the model's chat template (as a user turn).
    #[arg(long)]
    pub chat: bool,
    /// A problem, made into a prompt as `train` and `eval` make theirs: the template,
    /// system prompt, instruction and few-shot examples of --config and the prompt flags.
    #[arg(long)]
    pub question: Option<String>,
    /// Print the prompt exactly as the model gets it (and its token count) and exit.
    #[arg(long)]
    pub show_prompt: bool,
    /// TOML file in the run schema, for its `[data]` prompt keys; flags win.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// The set few-shot examples are drawn from (its training part), as `eval --dataset`.
    #[arg(long)]
    pub dataset: Option<String>,
    #[command(flatten)]
    pub prompt_flags: crate::config::PromptFlags,
    /// Argmax decoding.
    #[arg(long)]
    pub greedy: bool,
    #[command(flatten)]
    pub length: crate::config::LengthFlags,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print token ids, their log-probs under the model, text and offsets as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let model = args.model.to_string_lossy();
    let mut loaded = crate::source::Source::new(&model, args.placement.placement()).fresh()?;
    let layer = crate::config::merge_layers([
        crate::config::flag_layer(&args.prompt_flags)?,
        crate::config::flag_layer(&args.length)?,
    ]);
    let cfg = cal_train::config::RunConfig::resolve(args.config.as_deref(), &layer)?;
    let text = match (&args.prompt, &args.question) {
        (_, Some(q)) => {
            let pool = match &args.dataset {
                Some(d) => crate::eval::few_shot_pool(d, cfg.data.few_shot)?,
                None if cfg.data.few_shot > 0 => {
                    bail!("--few-shot needs --dataset, the set to draw the examples from")
                }
                None => Vec::new(),
            };
            loaded.prompt = PromptFormat::of(&cfg.data, &pool)?;
            loaded.prompt_text(q)?
        }
        (Some(p), None) if args.chat => {
            let tpl = loaded.tok.chat_template.as_ref().ok_or_else(|| {
                anyhow!(
                    "{}: the model has no chat template; drop --chat",
                    args.model.display()
                )
            })?;
            tpl.render(&[("user", p.as_str())], true)?
        }
        (Some(p), None) => p.clone(),
        (None, None) => bail!("generate needs --prompt TEXT or --question TEXT"),
    };
    let tok = &loaded.tok;
    let mut ids = match &args.question {
        Some(q) => loaded.prompt_ids(q)?,
        None => tok.encode(&text)?,
    };
    if let (Some(bos), false, None) = (tok.bos_id, args.chat, &args.question) {
        if ids.first() != Some(&bos) && tok.chat_template.is_none() {
            ids.insert(0, bos);
        }
    }
    if args.show_prompt {
        println!("{text}");
        eprintln!("[{} prompt tokens]", ids.len());
        return Ok(());
    }
    let cfg = SamplingConfig {
        max_new_tokens: cfg.rollout.max_new_tokens,
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
        // each completion token's log-prob under the model, from one teacher-forced
        // pass: what another implementation's logits are checked against
        // (scripts/check_hf_logprobs.py)
        let logprobs: Vec<f32> = if out.ids.is_empty() {
            Vec::new()
        } else {
            let batch = cal_model::generate::build_batch(
                std::slice::from_ref(&ids),
                std::slice::from_ref(&out.ids),
                tok.pad_id,
                &loaded.model.device,
            )?;
            let (lp, _) = cal_model::generate::completion_logprobs(
                &loaded.model,
                &batch,
                cal_model::Forward::INFERENCE,
            )?;
            lp.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?
        };
        println!(
            "{}",
            serde_json::json!({"prompt_ids": ids, "ids": out.ids, "logprobs": logprobs, "text": out.text, "offsets": out.offsets, "finish": out.finish})
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
