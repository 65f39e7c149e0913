//! `cal-grpo export`: any model this project loads (`tiny`, a Hugging Face folder, a
//! `.gguf` file, `random:CONFIG.json`), optionally with a PEFT adapter merged in,
//! written as a Hugging Face folder that `transformers` and serving engines load.

use crate::config::PlacementFlags;
use crate::source::Source;
use anyhow::{bail, Context, Result};
use cal_model::load;
use cal_train::policy::PolicySource;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// `tiny`, a Hugging Face folder, a `.gguf` file or `random:CONFIG.json`.
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) to
    /// merge into the weights, e.g. a LoRA run's `adapter/`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The folder to write; it must not hold another model.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Write a tied model's output projection as its own `lm_head.weight`: what a vLLM
    /// server needs when a fully fine-tuned run reloads its weights in place.
    #[arg(long)]
    pub untie_embeddings: bool,
    /// The base as a QLoRA run holds it: the decoder layers' linear weights quantized
    /// (q4_0, q4_1, q8_0) and written back dequantized, with `--adapter` merged into
    /// that. A QLoRA adapter was trained over this base, not over the f32 original.
    #[arg(long, value_enum)]
    pub quantize_base: Option<cal_train::config::QuantizeBase>,
    #[command(flatten)]
    pub placement: PlacementFlags,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let out = &args.output_dir;
    let _lock = cal_train::rundir::RunLock::acquire(out)?;
    for f in [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ] {
        if out.join(f).exists() {
            bail!(
                "{} already holds a model ({f}); choose another --output-dir",
                out.display()
            );
        }
    }
    let qb = args.quantize_base.unwrap_or_default();
    let mut policy = Source::new(&args.model, args.placement.placement())
        .quantized(qb)
        .fresh()?;
    if let Some(q) = qb.ggml() {
        policy.model.quantize_base(q)?; // a no-op for a random base drawn quantized
    }
    if let Some(a) = &args.adapter {
        cal_model::peft::load_adapter(&mut policy.model, a)
            .with_context(|| format!("adapter {}", a.display()))?;
    }
    load::export_hf_with(&policy.model, &policy.tok, out, args.untie_embeddings)?;
    println!(
        "{}{} exported to {} ({} parameters)",
        args.model,
        args.adapter
            .as_ref()
            .map_or(String::new(), |a| format!(" + adapter {}", a.display())),
        out.display(),
        policy.model.cfg.num_params()
    );
    Ok(())
}
