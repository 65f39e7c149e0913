//! `cal-grpo dpo`: preference optimisation (DPO, IPO, ORPO) on a TRL-format pairs file,
//! full or LoRA, on the training harness, the model exported into the run folder (with
//! LoRA, also its adapter in PEFT's format under `adapter/`).

use crate::config::{self, LoraFlags, PlacementFlags};
use crate::source::Source;
use anyhow::{bail, Context, Result};
use cal_core::data::preference::load_pairs;
use cal_model::load;
use cal_train::config::RunConfig;
use cal_train::dpo::{tokenize_pairs, DpoRun};
use cal_train::policy::PolicySource;
use cal_train::preference::{PairCredit, PrefLoss};
use cal_train::rundir::Start;
use cal_train::trainer::RunEnd;
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Flags of `cal-grpo dpo`. Each sets one key of the run configuration (its clap id).
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct DpoArgs {
    /// TOML file in the nested schema (`[dpo] beta = 0.2`); flags win.
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
    /// Start over in an --output-dir that holds another run (moved aside, not deleted).
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// A Hugging Face folder or a `.gguf` file.
    #[arg(long, id = "model.name")]
    pub model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub placement: PlacementFlags,
    /// Preference pairs in TRL's format (`prompt`, `chosen`, `rejected`; strings or chat
    /// messages), `.jsonl` or `.parquet`; `cal-grpo make-pairs` writes one.
    #[arg(long, id = "data.dataset")]
    pub dataset: Option<String>,
    /// Held-out pairs for the pair accuracy [default: `dpo.eval-pairs` pairs held out of
    /// --dataset].
    #[arg(long, id = "data.eval-dataset")]
    pub eval_dataset: Option<String>,
    /// The loss: sigmoid (DPO), ipo or orpo.
    #[arg(long, id = "dpo.loss", value_enum)]
    pub loss: Option<PrefLoss>,
    /// β of DPO and IPO (ORPO: the weight λ of its odds-ratio term).
    #[arg(long, id = "dpo.beta")]
    pub beta: Option<f64>,
    /// Which tokens a pair's log-probs sum: full, or first-error (the first differing
    /// step of each answer, Step-DPO).
    #[arg(long, id = "dpo.pair-credit", value_enum)]
    pub pair_credit: Option<PairCredit>,
    /// Optimizer steps.
    #[arg(long, id = "dpo.steps")]
    pub steps: Option<usize>,
    /// Pairs per step.
    #[arg(long, id = "dpo.batch-size")]
    pub batch_size: Option<usize>,
    /// Peak learning rate, with a linear warmup over the first tenth.
    #[arg(long, id = "dpo.learning-rate")]
    pub learning_rate: Option<f64>,
    /// Most tokens of prompt and answer together (answers are cut at the end).
    #[arg(long, id = "dpo.max-length")]
    pub max_length: Option<usize>,
    /// Most prompt tokens (prompts keep their end).
    #[arg(long, id = "dpo.max-prompt-length")]
    pub max_prompt_length: Option<usize>,
    /// Pairs held out of --dataset when no --eval-dataset is given.
    #[arg(long, id = "dpo.eval-pairs")]
    pub eval_pairs: Option<usize>,
    /// Padded tokens per forward/backward (0 = whole batches); a pair is never split.
    #[arg(long, id = "dpo.micro-batch-tokens")]
    pub micro_batch_tokens: Option<usize>,
    /// Held-out pair accuracy every N steps (0 = at the start and the end only).
    #[arg(long, id = "eval.every")]
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, id = "checkpoint.save-every")]
    pub save_every: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,
    /// The run folder: checkpoints, logs and the trained model.
    #[arg(long, id = "run.output-dir")]
    pub output_dir: Option<PathBuf>,
    /// Data order, held-out draw and initialisation.
    #[arg(long, id = "run.seed")]
    pub seed: Option<u64>,
    /// Data parallel: compare the ranks' weight checksums every this many steps (0 =
    /// never).
    #[arg(long, id = "run.weight-check-every")]
    pub weight_check_every: Option<usize>,
}

/// `dpo`'s own defaults, below a `--config` file.
pub fn defaults() -> serde_json::Value {
    json!({"run": {"output-dir": "runs/dpo"}, "eval": {"every": 0}, "checkpoint": {"save-every": 50}})
}

impl DpoArgs {
    /// Defaults → model profile → `dpo`'s own defaults → `--config` → flags.
    pub fn resolve(&self) -> Result<RunConfig> {
        let layer = config::flag_layer(self)?;
        RunConfig::resolve_layers(self.config.as_deref(), &defaults(), &layer)
    }
}

/// `ranks`: the processes of a data-parallel run (one by default): each takes an equal
/// share of every batch of pairs; rank 0 writes, evaluates and exports.
pub fn run(
    args: &DpoArgs,
    ranks: std::sync::Arc<dyn cal_train::collective::Collective>,
) -> Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        return crate::train::print_config(&cfg);
    }
    if cfg.data.dataset == "generated" || cfg.model.name == "tiny" {
        bail!(
            "dpo needs --model (a Hugging Face folder or .gguf file) and --dataset PAIRS.jsonl \
             (TRL's format; `cal-grpo make-pairs` writes one)"
        );
    }
    let out = cfg.output_dir();
    let mut set = load_pairs(Path::new(&cfg.data.dataset))?;
    let (train, held_out) = match &cfg.data.eval_dataset {
        Some(path) => (set.pairs, load_pairs(Path::new(path))?.pairs),
        None => {
            // a seeded draw, the same for every run with this seed and file
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.run.seed);
            set.pairs.shuffle(&mut rng);
            let n = cfg.dpo.eval_pairs.min(set.pairs.len() / 2);
            let train = set.pairs.split_off(n);
            (train, set.pairs)
        }
    };
    let policy = Source::new(&cfg.model.name, cfg.model.placement())
        .quantized(cfg.model.quantize_base)
        .fresh()?;
    let d = &cfg.dpo;
    let tokenize = |pairs| {
        tokenize_pairs(
            &policy,
            pairs,
            d.pair_credit,
            d.max_length,
            d.max_prompt_length,
        )
    };
    let (train_t, stats) = tokenize(&train)?;
    let (held_t, _) = tokenize(&held_out)?;
    eprintln!(
        "dpo ({:?}, β {}, {:?} credit): {} steps × {} pairs from {} training pairs, {} held out; \
         {} identical pairs skipped, {} truncated{}; output {}",
        d.loss,
        d.beta,
        d.pair_credit,
        d.steps,
        d.batch_size,
        train_t.len(),
        held_t.len(),
        set.identical_skipped,
        stats.truncated,
        if d.pair_credit == PairCredit::FirstError {
            format!(
                ", {} without a differing step (credited in full)",
                stats.no_step
            )
        } else {
            String::new()
        },
        out.display()
    );
    let start = Start::from_flags(args.resume, args.overwrite);
    let main = ranks.is_main();
    let mut run = DpoRun::new_on(
        &out,
        &cfg,
        policy,
        train_t,
        held_t,
        cfg.checkpoint.save_every,
        cfg.eval.every,
        start,
        ranks,
    )?;
    if run.run()? == RunEnd::Interrupted {
        std::process::exit(130);
    }
    if !main {
        return Ok(()); // rank 0 exports for the run
    }
    load::export_hf(&run.policy.model, &run.policy.tok, &out)
        .with_context(|| format!("exporting to {}", out.display()))?;
    if cfg.model.lora.rank > 0 {
        cal_model::peft::export_adapter(&run.policy.model, &out.join("adapter"))?;
    }
    let acc = |m: &Option<cal_train::metrics::Metrics>| {
        m.as_ref()
            .and_then(|m| m.get("eval/rewards/accuracies").copied())
    };
    match (acc(&run.first_eval), acc(&run.last_eval)) {
        (Some(a), Some(b)) => println!(
            "held-out pair accuracy {:.1}% → {:.1}% ({} pairs); model exported to {}",
            100.0 * a,
            100.0 * b,
            held_out.len(),
            out.display()
        ),
        _ => println!("model exported to {}", out.display()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dpo: DpoArgs,
    }

    #[test]
    fn dpo_flags_reach_their_keys_and_back() {
        let cli = Cli::try_parse_from(["dpo"]).unwrap();
        let c = cli.dpo.resolve().unwrap();
        assert_eq!(
            (c.dpo.beta, c.dpo.loss, c.dpo.steps),
            (0.1, PrefLoss::Sigmoid, 100)
        );
        assert_eq!(c.output_dir(), PathBuf::from("runs/dpo"));
        let cmd = <Cli as clap::CommandFactory>::command();
        config::tests::round_trip(&cmd, &|args| {
            let cli = Cli::try_parse_from(std::iter::once("dpo".to_string()).chain(args.to_vec()))?;
            cli.dpo.resolve()
        });
    }
}
