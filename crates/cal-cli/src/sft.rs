//! `cal-grpo sft`: supervised fine-tuning on reference solutions (the warm start of a
//! real model), full or LoRA, on the training harness (checkpoints and `--resume`,
//! `metrics.jsonl`, TensorBoard, a held-out curve), exported as a Hugging Face folder
//! into the run folder itself, so `--model <output-dir>` loads it.

use crate::config::{self, LoraFlags, PlacementFlags};
use crate::source::Source;
use anyhow::{Context, Result};
use cal_core::data;
use cal_model::load;
use cal_train::collective::Collective;
use cal_train::config::RunConfig;
use cal_train::policy::{PolicySource, PromptFormat};
use cal_train::rundir::Start;
use cal_train::sft::{CrossEntropy, RunSpec, SftConfig, SftHarness, SftRun};
use cal_train::tiny::{self, TinySpec};
use cal_train::trainer::RunEnd;
use clap::Args;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// Flags of `cal-grpo sft`. Each sets one key of the run configuration (its clap id), over
/// `sft`'s own defaults and a `--config` file, as `train`'s do.
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
    /// Continue from the latest checkpoint in --output-dir.
    #[arg(long, conflicts_with = "overwrite")]
    #[serde(skip)]
    pub resume: bool,
    /// Start over in an --output-dir that holds another run: that run is moved to
    /// `<output-dir>.replaced-<time>` first (nothing is deleted).
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// `tiny` (export the embedded default) or a model path.
    #[arg(long, id = "model.name")]
    pub model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub placement: PlacementFlags,
    /// GSM8K-format training file (`generated` for the embedded problems).
    #[arg(long, id = "data.dataset")]
    pub dataset: Option<String>,
    /// Training problems, drawn with --seed; -1 uses the whole dataset.
    #[arg(long, id = "data.num-samples", allow_negative_numbers = true)]
    pub num_samples: Option<i64>,
    /// Optimizer steps.
    #[arg(long, id = "sft.steps")]
    pub steps: Option<usize>,
    /// Examples per step.
    #[arg(long, id = "sft.batch-size")]
    pub batch_size: Option<usize>,
    /// Peak learning rate, with a linear warmup over the first tenth.
    #[arg(long, id = "sft.learning-rate")]
    pub learning_rate: Option<f64>,
    /// Padded tokens per forward/backward; a batch that does not fit is split into
    /// length-sorted micro-batches, gradients accumulated exactly (0 = whole batches).
    #[arg(long, id = "sft.micro-batch-tokens")]
    pub micro_batch_tokens: Option<usize>,
    /// Held-out data for the curve (default: the dataset's held-out part, or
    /// `test.jsonl` beside it).
    #[arg(long, id = "data.eval-dataset")]
    pub eval_dataset: Option<String>,
    /// Held-out problems evaluated (-1 = all).
    #[arg(long, id = "data.eval-samples", allow_negative_numbers = true)]
    pub eval_samples: Option<i64>,
    /// Greedy held-out accuracy every N steps, before the first and after the last
    /// (0 = no curve).
    #[arg(long, id = "eval.every")]
    pub eval_every: Option<usize>,
    /// Leave out the curve's step-0 point (the pretrained model, the same for every
    /// recipe on the same held-out problems and prompt).
    #[arg(long, requires = "eval.every")]
    #[serde(skip)]
    pub skip_start_eval: bool,
    /// Most tokens generated per held-out answer.
    #[arg(long, id = "rollout.max-new-tokens")]
    pub max_new_tokens: Option<usize>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, id = "checkpoint.save-every")]
    pub save_every: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: config::PromptFlags,
    /// The run folder: checkpoints, logs, and the fine-tuned model as a Hugging Face
    /// folder [default: runs/sft].
    #[arg(long, id = "run.output-dir")]
    pub output_dir: Option<PathBuf>,
    /// Data order and initialisation.
    #[arg(long, id = "run.seed")]
    pub seed: Option<u64>,
    /// Data parallel: compare the ranks' weight checksums every this many steps (0 =
    /// never).
    #[arg(long, id = "run.weight-check-every")]
    pub weight_check_every: Option<usize>,
    /// Write no merged model at the end (a LoRA run still writes its adapter to
    /// OUTPUT/adapter): a QLoRA base of billions of parameters merged is tens of GB in f32.
    #[arg(long)]
    #[serde(skip)]
    pub no_export: bool,
}

/// `sft`'s own defaults, below a `--config` file.
pub fn defaults() -> serde_json::Value {
    json!({"run": {"output-dir": "runs/sft"}, "eval": {"every": 0}, "checkpoint": {"save-every": 50}})
}

impl SftArgs {
    /// Defaults → model profile → `sft`'s own defaults → `--config` → flags.
    pub fn resolve(&self) -> Result<RunConfig> {
        let layer = config::flag_layer(self)?;
        RunConfig::resolve_layers(self.config.as_deref(), &defaults(), &layer)
    }

    fn start(&self) -> Start {
        Start::from_flags(self.resume, self.overwrite)
    }
}

/// `ranks`: the processes of a data-parallel run (one by default): each takes an equal
/// share of every batch; rank 0 writes, evaluates and exports.
pub fn run(args: &SftArgs, ranks: Arc<dyn Collective>) -> Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        return crate::train::print_config(&cfg);
    }
    let placement = cfg.model.placement();
    let out = cfg.output_dir();
    if cfg.model.name == "tiny" {
        if ranks.world() > 1 {
            anyhow::bail!("`sft --model tiny` exports the cached recipe: run it in one process");
        }
        // One writer per output folder (the export is written file by file).
        let _lock = cal_train::rundir::RunLock::acquire(&out)?;
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
    let policy = Source::new(&cfg.model.name, placement)
        .quantized(cfg.model.quantize_base)
        .fresh()?;
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
    let held_out = if cfg.eval.every > 0 {
        crate::source::datasets(&cfg)?.1
    } else {
        Vec::new()
    };
    eprintln!(
        "sft: {} steps × {} examples from {} training problems{}; output {}",
        cfg.sft.steps,
        cfg.sft.batch_size,
        examples.len(),
        if held_out.is_empty() {
            String::new()
        } else {
            format!(
                ", held-out curve on {} problems every {} steps",
                held_out.len(),
                cfg.eval.every
            )
        },
        out.display()
    );
    let harness = SftHarness {
        save_every: cfg.checkpoint.save_every,
        eval_every: cfg.eval.every,
        skip_start_eval: args.skip_start_eval,
        eval: cal_train::evaluate::EvalConfig::of_run(&cfg),

        weight_check_every: cfg.run.weight_check_every,
    };
    let spec = RunSpec {
        config: &cfg,
        cfg: SftConfig::of_run(&cfg),
        objective: Box::new(CrossEntropy),
        ranks: ranks.clone(),
    };
    let policy = policy.with_prompt(prompt);
    let mut run = SftRun::with_objective(
        &out,
        spec,
        policy,
        &examples,
        held_out,
        harness,
        args.start(),
    )?;
    let (end, r) = run.run()?;
    if end == RunEnd::Interrupted {
        std::process::exit(130);
    }
    if !ranks.is_main() {
        return Ok(()); // rank 0 exports for the run
    }
    if run.policy.model.lora.is_some() {
        // the adapter alone, in PEFT's format: `export --adapter` merges it
        cal_model::peft::export_adapter(&run.policy.model, &out.join("adapter"))?;
    }
    if !args.no_export {
        load::export_hf(&run.policy.model, &run.policy.tok, &out)
            .with_context(|| format!("exporting to {}", out.display()))?;
    }
    let curve = match &run.last_eval {
        Some((_, g)) => format!(
            "; held-out accuracy {:.1}%",
            100.0 * cal_core::evaluate::accuracy(g, g.len()).accuracy
        ),
        None => String::new(),
    };
    let wrote = match (args.no_export, run.policy.model.lora.is_some()) {
        (false, false) => format!("model exported to {}", out.display()),
        (false, true) => format!("model and PEFT adapter exported to {}", out.display()),
        (true, true) => format!("PEFT adapter exported to {}", out.join("adapter").display()),
        (true, false) => format!("checkpoints in {}", out.join("checkpoints").display()),
    };
    println!(
        "SFT {} steps: loss {:.3} → {:.3} in {:.0}s{curve}; {wrote}",
        r.steps, r.first_loss, r.last_loss, r.seconds,
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
        assert_eq!(c.output_dir(), PathBuf::from("runs/sft"));
        // no held-out curve unless asked for; a checkpoint every 50 steps
        assert_eq!((c.eval.every, c.checkpoint.save_every), (0, 50));
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
            "--eval-every",
            "25",
            "--eval-samples",
            "40",
            "--eval-dataset",
            "held.jsonl",
            "--save-every",
            "5",
            "--max-new-tokens",
            "99",
        ]);
        assert_eq!((c.eval.every, c.checkpoint.save_every), (25, 5));
        assert_eq!(
            (c.data.eval_samples, c.data.eval_dataset.as_deref()),
            (40, Some("held.jsonl"))
        );
        assert_eq!(c.rollout.max_new_tokens, 99);
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
        // every flag reaches its key and back (the list read off the parser)
        let cmd = <Cli as clap::CommandFactory>::command();
        config::tests::round_trip(&cmd, &|args| {
            let cli = Cli::try_parse_from(std::iter::once("t".to_string()).chain(args.to_vec()))?;
            cli.sft.resolve()
        });
    }
}
