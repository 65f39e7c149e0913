//! `train` options: command-line flags, an optional TOML file whose keys mirror the
//! flags (flags win), and the seed's defaults.

use anyhow::{bail, Context, Result};
use cal_core::credit::{CreditConfig, CreditMode, GroupAdvantage};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which oracle names the first error of an incorrect rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// OpenAI Chat Completions or any compatible server.
    Openai,
    /// Google Gemini `generateContent`.
    Gemini,
    /// Offline: checks every arithmetic step of the response.
    Calculator,
    /// Offline: first step whose value is not in the reference solution.
    Reference,
}

impl Provider {
    /// The model a provider uses when `--cal-model` is not given.
    pub fn default_model(&self) -> &'static str {
        match self {
            Self::Openai => "gpt-4o-mini",
            Self::Gemini => "gemini-2.0-flash",
            Self::Calculator => "calculator",
            Self::Reference => "reference",
        }
    }
}

/// Flags of `cal-grpo train`. Every field is optional here so that a value given on
/// the command line can be told apart from one given in `--config`; [`resolve`] applies
/// the defaults. The same struct deserialises the TOML file (keys = flag names).
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file whose keys mirror these flags, e.g. `num-generations = 8`; flags win.
    #[arg(long, value_name = "FILE.toml")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Use CAL: ask the oracle for the first error of each wrong answer and penalise
    /// only those tokens (implies `--credit span` unless `--credit` is given).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub use_cal: Option<bool>,

    /// Number of training problems; -1 uses the whole dataset. [default: -1]
    #[arg(long, allow_negative_numbers = true)]
    pub num_samples: Option<i64>,

    /// Completions sampled per prompt (the GRPO group size G). [default: 4]
    #[arg(long)]
    pub num_generations: Option<usize>,

    /// Model the oracle uses (provider default: gpt-4o-mini, gemini-2.0-flash).
    #[arg(long)]
    pub cal_model: Option<String>,

    /// Oracle provider. [default: calculator]
    #[arg(long, value_enum)]
    pub api_provider: Option<Provider>,

    /// Advantage given to each error-span token. [default: -1.0]
    #[arg(long, allow_negative_numbers = true)]
    pub negative_reward: Option<f64>,

    /// At most this many tokens of a located span are penalised (0 = no cap). [default: 64]
    #[arg(long)]
    pub max_error_span: Option<usize>,

    /// Credit mode: outcome (GRPO), span (CAL), span-scaled, prefix.
    /// [default: outcome, or span with --use-cal]
    #[arg(long, value_parser = parse_credit)]
    pub credit: Option<CreditMode>,

    /// Group advantage estimator: grpo, dr-grpo, rloo. [default: grpo]
    #[arg(long, value_parser = parse_advantage)]
    pub advantage: Option<GroupAdvantage>,

    /// Advantage of the tokens before the first error in `--credit prefix`. [default: 0.0]
    #[arg(long, allow_negative_numbers = true)]
    pub prefix_reward: Option<f64>,

    /// Random seed for data order, sampling and initialisation. [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,

    /// Where checkpoints, logs and results go. [default: runs/<baseline|cal>-seed<SEED>]
    #[arg(long)]
    pub output_dir: Option<PathBuf>,

    /// Policy model: `tiny` (embedded), a Hugging Face folder or a `.gguf` file. [default: tiny]
    #[arg(long)]
    pub model: Option<String>,

    /// Training data: `generated` (embedded GSM8K-format problems) or a GSM8K
    /// `.jsonl`/`.parquet` file. [default: generated]
    #[arg(long)]
    pub dataset: Option<String>,

    /// Held-out data for evaluation after training (default: the generated held-out split,
    /// or `test.jsonl` beside a `--dataset` file). [default: auto]
    #[arg(long)]
    pub eval_dataset: Option<String>,

    /// Evaluate on at most this many held-out problems (-1 = all). [default: -1]
    #[arg(long, allow_negative_numbers = true)]
    pub eval_samples: Option<i64>,

    /// Optimizer steps [default: one pass over the training problems]
    #[arg(long)]
    pub steps: Option<usize>,

    /// Prompts per step (each gets --num-generations completions). [default: 8]
    #[arg(long)]
    pub prompts_per_step: Option<usize>,

    /// Peak learning rate. [default: 3e-5 for tiny, 1e-6 otherwise]
    #[arg(long)]
    pub learning_rate: Option<f64>,

    /// KL coefficient β (k3 estimator against the frozen reference). [default: 0.04]
    #[arg(long)]
    pub beta: Option<f64>,

    /// Clip range ε of the surrogate. [default: 0.2]
    #[arg(long)]
    pub epsilon: Option<f64>,

    /// Upper clip range (DAPO's clip-higher). [default: --epsilon]
    #[arg(long)]
    pub epsilon_high: Option<f64>,

    /// token-mean, seq-mean-token-mean or seq-mean-token-sum-norm. [default: token-mean]
    #[arg(long)]
    pub loss_aggregation: Option<String>,

    /// Importance ratio level: token (GRPO) or sequence (GSPO). [default: token]
    #[arg(long)]
    pub importance: Option<String>,

    /// Policy updates per generated batch. [default: 1]
    #[arg(long)]
    pub num_iterations: Option<usize>,

    /// Most new tokens per completion. [default: 96 for tiny, 256 otherwise]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,

    /// Sampling temperature for rollouts. [default: 1.0]
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Checkpoint every N steps (0 = only at the end). [default: 10]
    #[arg(long)]
    pub save_every: Option<usize>,

    /// Continue from the latest checkpoint in --output-dir.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub resume: Option<bool>,

    /// LoRA rank (0 = full fine-tuning). [default: 0]
    #[arg(long)]
    pub lora_rank: Option<usize>,

    /// LoRA alpha. [default: 2 × rank]
    #[arg(long)]
    pub lora_alpha: Option<f64>,

    /// Comma-separated LoRA target modules. [default: q_proj,k_proj,v_proj,o_proj]
    #[arg(long)]
    pub lora_targets: Option<String>,

    /// Dropout on the LoRA input during training forwards, in [0, 1). [default: 0]
    #[arg(long)]
    pub lora_dropout: Option<f64>,

    /// Base URL of an OpenAI-compatible server for the `openai` oracle.
    #[arg(long)]
    pub oracle_base_url: Option<String>,

    /// Stop calling a paid oracle after this many USD (estimated). [default: no cap]
    #[arg(long)]
    pub oracle_max_cost: Option<f64>,

    /// Concurrent oracle requests. [default: 8]
    #[arg(long)]
    pub oracle_concurrency: Option<usize>,

    /// Per-request oracle timeout in seconds. [default: 60]
    #[arg(long)]
    pub oracle_timeout: Option<f64>,

    /// Rows per forward/backward of the loss, gradients accumulated exactly
    /// (0 = the whole batch). Bounds memory on real models. [default: 0 for tiny, 2 otherwise]
    #[arg(long)]
    pub micro_batch: Option<usize>,
}

fn parse_credit(s: &str) -> Result<CreditMode, String> {
    s.parse()
}

fn parse_advantage(s: &str) -> Result<GroupAdvantage, String> {
    s.parse()
}

/// Fully resolved training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub use_cal: bool,
    pub num_samples: i64,
    pub num_generations: usize,
    pub api_provider: Provider,
    pub cal_model: String,
    pub max_error_span: usize,
    pub credit: CreditConfig,
    pub seed: u64,
    pub output_dir: PathBuf,
    pub model: String,
    pub dataset: String,
    pub eval_dataset: Option<String>,
    pub eval_samples: i64,
    pub steps: Option<usize>,
    pub prompts_per_step: usize,
    pub learning_rate: f64,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub loss_aggregation: String,
    pub importance: String,
    pub num_iterations: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub save_every: usize,
    pub resume: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    pub lora_dropout: f64,
    pub oracle_base_url: Option<String>,
    pub oracle_max_cost: Option<f64>,
    pub oracle_concurrency: usize,
    pub oracle_timeout: f64,
    pub micro_batch: usize,
}

/// Reads a `--config` file into [`TrainArgs`]; unknown keys are errors naming the file.
pub fn read_config_file(path: &Path) -> Result<TrainArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

/// Flags over file over defaults, then consistency checks.
pub fn resolve(flags: &TrainArgs) -> Result<TrainConfig> {
    let file = match &flags.config {
        Some(path) => read_config_file(path)?,
        None => TrainArgs::default(),
    };
    macro_rules! pick {
        ($f:ident) => {
            flags.$f.clone().or(file.$f.clone())
        };
    }
    let use_cal = pick!(use_cal).unwrap_or(false);
    let credit_mode = match (pick!(credit), use_cal) {
        (Some(CreditMode::Outcome), true) => {
            bail!("--use-cal needs a span-using credit mode (span, span-scaled or prefix), not `outcome`")
        }
        (Some(mode), _) => mode,
        (None, true) => CreditMode::Span,
        (None, false) => CreditMode::Outcome,
    };
    let num_generations = pick!(num_generations).unwrap_or(4);
    if num_generations < 2 {
        bail!("--num-generations must be at least 2 (GRPO compares completions within a group), got {num_generations}");
    }
    let num_samples = pick!(num_samples).unwrap_or(-1);
    if num_samples < -1 || num_samples == 0 {
        bail!("--num-samples must be -1 (all) or a positive count, got {num_samples}");
    }
    let negative_reward = pick!(negative_reward).unwrap_or(-1.0);
    if !negative_reward.is_finite() {
        bail!("--negative-reward must be finite");
    }
    let api_provider = pick!(api_provider).unwrap_or(Provider::Calculator);
    let seed = pick!(seed).unwrap_or(42);
    let run_kind = if credit_mode.uses_spans() {
        "cal"
    } else {
        "baseline"
    };
    let model = pick!(model).unwrap_or_else(|| "tiny".into());
    let tiny = model == "tiny";
    let epsilon = pick!(epsilon).unwrap_or(0.2);
    let lora_rank = pick!(lora_rank).unwrap_or(0);
    Ok(TrainConfig {
        use_cal: credit_mode.uses_spans(),
        num_samples,
        num_generations,
        api_provider,
        cal_model: pick!(cal_model).unwrap_or_else(|| api_provider.default_model().to_string()),
        max_error_span: pick!(max_error_span).unwrap_or(64),
        credit: CreditConfig {
            mode: credit_mode,
            group: pick!(advantage).unwrap_or(GroupAdvantage::Grpo),
            negative_reward,
            prefix_reward: pick!(prefix_reward).unwrap_or(0.0),
            ..CreditConfig::default()
        },
        seed,
        output_dir: pick!(output_dir)
            .unwrap_or_else(|| PathBuf::from(format!("runs/{run_kind}-seed{seed}"))),
        model: model.clone(),
        dataset: pick!(dataset).unwrap_or_else(|| "generated".into()),
        eval_dataset: pick!(eval_dataset),
        eval_samples: pick!(eval_samples).unwrap_or(-1),
        steps: pick!(steps),
        prompts_per_step: pick!(prompts_per_step).unwrap_or(8).max(1),
        learning_rate: pick!(learning_rate).unwrap_or(if tiny { 3e-5 } else { 1e-6 }),
        beta: pick!(beta).unwrap_or(0.04),
        epsilon,
        epsilon_high: pick!(epsilon_high).unwrap_or(epsilon),
        loss_aggregation: pick!(loss_aggregation).unwrap_or_else(|| "token-mean".into()),
        importance: pick!(importance).unwrap_or_else(|| "token".into()),
        num_iterations: pick!(num_iterations).unwrap_or(1).max(1),
        max_new_tokens: pick!(max_new_tokens).unwrap_or(if tiny { 96 } else { 256 }),
        temperature: pick!(temperature).unwrap_or(1.0),
        save_every: pick!(save_every).unwrap_or(10),
        resume: pick!(resume).unwrap_or(false),
        lora_rank,
        lora_alpha: pick!(lora_alpha).unwrap_or(2.0 * lora_rank as f64),
        lora_targets: pick!(lora_targets)
            .unwrap_or_else(|| "q_proj,k_proj,v_proj,o_proj".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        lora_dropout: pick!(lora_dropout).unwrap_or(0.0),
        oracle_base_url: pick!(oracle_base_url),
        oracle_max_cost: pick!(oracle_max_cost),
        oracle_concurrency: pick!(oracle_concurrency).unwrap_or(8),
        oracle_timeout: pick!(oracle_timeout).unwrap_or(60.0),
        micro_batch: pick!(micro_batch).unwrap_or(if tiny { 0 } else { 2 }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn parse(args: &[&str]) -> Result<TrainConfig> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))?;
        resolve(&cli.train)
    }

    #[test]
    fn seed_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.num_samples, c.credit.negative_reward, c.max_error_span),
            (-1, -1.0, 64)
        );
        assert_eq!(
            (c.credit.mode, c.use_cal, c.api_provider),
            (CreditMode::Outcome, false, Provider::Calculator)
        );
        let c = parse(&[
            "--use-cal",
            "--num-samples",
            "-1",
            "--negative-reward",
            "-0.5",
        ])
        .unwrap();
        assert_eq!(
            (c.credit.mode, c.use_cal, c.credit.negative_reward),
            (CreditMode::Span, true, -0.5)
        );
        assert_eq!(c.output_dir, PathBuf::from("runs/cal-seed42"));
        let c = parse(&[
            "--use-cal",
            "--credit",
            "prefix",
            "--api-provider",
            "gemini",
        ])
        .unwrap();
        assert_eq!(
            (c.credit.mode, c.cal_model.as_str()),
            (CreditMode::Prefix, "gemini-2.0-flash")
        );
    }

    #[test]
    fn contradictions_are_errors() {
        assert!(parse(&["--use-cal", "--credit", "outcome"]).is_err());
        assert!(parse(&["--num-generations", "1"]).is_err());
        assert!(parse(&["--num-samples", "0"]).is_err());
        assert!(parse(&["--credit", "nope"]).is_err());
    }

    #[test]
    fn config_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "use-cal = true\nnum-generations = 8\nmax-error-span = 16\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p]).unwrap();
        assert_eq!(
            (c.use_cal, c.num_generations, c.max_error_span),
            (true, 8, 16)
        );
        let c = parse(&["--config", p, "--num-generations", "2"]).unwrap();
        assert_eq!(c.num_generations, 2);
        std::fs::write(&path, "num-generationz = 8\n").unwrap();
        let err = format!("{:#}", parse(&["--config", p]).unwrap_err());
        assert!(
            err.contains("c.toml") && err.contains("num-generationz"),
            "{err}"
        );
    }
}
