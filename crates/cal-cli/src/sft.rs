//! `cal-grpo sft`: supervised fine-tuning on reference solutions (the warm start of a
//! real model), full or LoRA, exported as a Hugging Face folder.

use crate::config::{self, LoraFlags, PlacementFlags};
use crate::source::Source;
use anyhow::{Context, Result};
use cal_core::data;
use cal_model::load;
use cal_train::config::RunConfig;
use cal_train::policy::{PolicySource, PromptFormat};
use cal_train::tiny::{self, TinySpec};
use clap::Args;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

/// Flags of `cal-grpo sft`. Each sets one key of the run configuration (the table in
/// [`SFT_FLAGS`]), over `sft`'s own defaults and a `--config` file, as `train`'s do.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct SftArgs {
    /// TOML file in the nested schema (`[sft] steps = 500`); flags win.
    #[arg(long, value_name = "FILE.toml")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit (feed it back with --config).
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// `tiny` (export the embedded default) or a model path.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub placement: PlacementFlags,
    /// GSM8K-format training file (`generated` for the embedded problems).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Training problems, drawn with --seed; -1 uses the whole dataset.
    #[arg(long, allow_negative_numbers = true)]
    pub num_samples: Option<i64>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Examples per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate, with a linear warmup over the first tenth.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Padded tokens per forward/backward; a batch that does not fit is split into
    /// length-sorted micro-batches, gradients accumulated exactly (0 = whole batches).
    #[arg(long)]
    pub micro_batch_tokens: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: config::PromptFlags,
    /// Where the fine-tuned model is exported (Hugging Face folder) [default:
    /// runs/sft/model].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Data order and initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `sft` flag → key of the run configuration.
pub const SFT_FLAGS: &[(&str, &str)] = &[
    ("model", "model.name"),
    ("device", "model.device"),
    ("dtype", "model.dtype"),
    ("dataset", "data.dataset"),
    ("num_samples", "data.num-samples"),
    ("prompt_template", "data.prompt-template"),
    ("system_prompt", "data.system-prompt"),
    ("instruction", "data.instruction"),
    ("few_shot", "data.few-shot"),
    ("few_shot_seed", "data.few-shot-seed"),
    ("steps", "sft.steps"),
    ("batch_size", "sft.batch-size"),
    ("learning_rate", "sft.learning-rate"),
    ("micro_batch_tokens", "sft.micro-batch-tokens"),
    ("lora_rank", "model.lora.rank"),
    ("lora_alpha", "model.lora.alpha"),
    ("lora_targets", "model.lora.targets"),
    ("lora_dropout", "model.lora.dropout"),
    ("output_dir", "run.output-dir"),
    ("seed", "run.seed"),
];

/// `sft`'s own defaults, below a `--config` file.
pub fn defaults() -> serde_json::Value {
    json!({"run": {"output-dir": "runs/sft/model"}})
}

impl SftArgs {
    /// Defaults → model profile → `sft`'s own defaults → `--config` → flags.
    pub fn resolve(&self) -> Result<RunConfig> {
        let layer = config::flag_layer(self, SFT_FLAGS)?;
        RunConfig::resolve_layers(self.config.as_deref(), &defaults(), &layer)
    }
}

pub fn run(args: &SftArgs) -> Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        return crate::train::print_config(&cfg);
    }
    let placement = cfg.model.placement();
    let out = cfg.output_dir();
    // One writer per output folder (the export is written file by file).
    let _lock = cal_train::rundir::RunLock::acquire(&out)?;
    if cfg.model.name == "tiny" {
        let (dev, dtype) = placement.resolve()?;
        let tp = tiny::tiny_policy(
            &TinySpec::default(),
            &cal_train::cache::cache_root(),
            &dev,
            dtype,
        )?;
        load::export_hf(&tp.policy.model, &tp.policy.tok, &out)?;
        println!(
            "tiny policy (cached SFT recipe) exported to {}",
            out.display()
        );
        return Ok(());
    }
    let policy = Source::new(&cfg.model.name, placement).fresh()?;
    let examples = if cfg.data.dataset == "generated" {
        TinySpec::default().splits().0
    } else {
        // the train part: SFT never sees a set's held-out problems
        data::sets::load_part(&cfg.data.dataset, data::sets::Split::Train)?.examples
    };
    // SFT teaches the answers behind the prompt an RL run on the same set uses: its
    // few-shot examples are drawn from the training part in file order, as `train` does
    let prompt = PromptFormat::of(&cfg.data, &examples)?;
    let examples = data::select(examples, cfg.data.num_samples, Some(cfg.run.seed));
    let mut policy = policy.with_prompt(prompt);
    let trainable = policy.attach_lora(&cfg.model.lora, cfg.run.seed)?;
    let r = cal_train::sft::sft(
        &mut policy,
        &examples,
        &cal_train::sft::SftConfig::of_run(&cfg),
        trainable,
    )?;
    load::export_hf(&policy.model, &policy.tok, &out)
        .with_context(|| format!("exporting to {}", out.display()))?;
    println!(
        "SFT {} steps: loss {:.3} → {:.3} in {:.0}s; model exported to {}",
        r.steps,
        r.first_loss,
        r.last_loss,
        r.seconds,
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sft: SftArgs,
    }

    fn parse(args: &[&str]) -> RunConfig {
        let cli = Cli::try_parse_from(std::iter::once("sft").chain(args.iter().copied())).unwrap();
        cli.sft.resolve().unwrap()
    }

    #[test]
    fn sft_defaults_and_flags_reach_their_keys() {
        let c = parse(&[]);
        assert_eq!(
            (c.sft.steps, c.sft.batch_size, c.sft.learning_rate),
            (200, 8, 2e-5)
        );
        assert_eq!(c.sft.micro_batch_tokens, 2048);
        assert_eq!(c.output_dir(), PathBuf::from("runs/sft/model"));
        let c = parse(&[
            "--model",
            "m.gguf",
            "--steps",
            "5",
            "--batch-size",
            "2",
            "--learning-rate",
            "1e-3",
            "--lora-rank",
            "4",
            "--output-dir",
            "out",
            "--seed",
            "7",
            "--num-samples",
            "9",
        ]);
        assert_eq!(
            (c.sft.steps, c.sft.batch_size, c.sft.learning_rate),
            (5, 2, 1e-3)
        );
        assert_eq!((c.model.lora.rank, c.model.lora.alpha), (4, Some(8.0)));
        assert_eq!((c.run.seed, c.data.num_samples), (7, 9));
        assert_eq!(c.output_dir(), PathBuf::from("out"));
        let recipe = cal_train::sft::SftConfig::of_run(&c);
        assert_eq!(
            (recipe.optim.lr, recipe.optim.warmup_steps, recipe.seed),
            (1e-3, 0, 7)
        );
        // every row of the table names a flag of the command
        let cmd = <Cli as clap::CommandFactory>::command();
        for (id, _) in SFT_FLAGS {
            assert!(
                cmd.get_arguments().any(|a| a.get_id() == *id),
                "no flag {id}"
            );
        }
    }
}
