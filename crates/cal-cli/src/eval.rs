//! `cal-grpo eval`: grade precomputed responses (`--predictions`) or a model's
//! generations against a dataset; both write the same [`EvalReport`].

use crate::config::PlacementFlags;
use crate::source::Source;
use anyhow::{bail, Result};
use cal_core::data;
use cal_core::evaluate::{grade_predictions, load_predictions};
use cal_model::Placement;
use cal_train::evaluate::{evaluate, EvalConfig, EvalReport};
use cal_train::policy::PolicySource;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// JSONL of responses: rows with `response` and `idx` or `question` (several rows
    /// per item give pass@k).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// GSM8K-format dataset (`.jsonl` or `.parquet`) holding the gold answers.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Directory for `eval_examples.jsonl` and `eval_results.json`
    /// [default: next to the predictions file, as `<stem>.eval/`; runs/eval for --model].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Model to generate with instead of --predictions: `tiny`, a Hugging Face folder or
    /// a `.gguf` file.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub placement: PlacementFlags,
    /// Completions per problem (1 = greedy; k > 1 samples at --temperature and reports
    /// pass@k), as `train --num-generations` (`--samples` is the old name).
    #[arg(
        long = "num-generations",
        visible_alias = "samples",
        default_value_t = 1
    )]
    pub samples: usize,
    /// Sampling temperature when --num-generations > 1.
    #[arg(long, default_value_t = EvalConfig::default().temperature)]
    pub temperature: f64,
    /// Evaluate the first N problems (-1 = all), as `train --eval-samples`
    /// (`--num-samples` is the old name).
    #[arg(
        long = "eval-samples",
        visible_alias = "num-samples",
        value_name = "N",
        default_value_t = -1,
        allow_negative_numbers = true
    )]
    pub num_samples: i64,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = EvalConfig::default().seed)]
    pub seed: u64,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let (report, out_dir) = match (&args.predictions, &args.model) {
        (Some(_), Some(_)) => bail!("eval takes --predictions or --model, not both"),
        (None, None) => bail!("eval needs --predictions FILE.jsonl or --model PATH"),
        (None, Some(model)) => {
            let out = args
                .output_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/eval"));
            let cfg = EvalConfig {
                max_new_tokens: args.max_new_tokens,
                samples: args.samples.max(1),
                greedy: args.samples <= 1,
                temperature: args.temperature,
                seed: args.seed,
                ..EvalConfig::default()
            };
            let placement = args.placement.placement();
            let r = eval_model(
                model,
                placement,
                &args.dataset,
                &cfg,
                args.num_samples,
                &out,
            )?;
            (r, out)
        }
        (Some(pred_path), None) => {
            let dataset = data::load(&args.dataset)?;
            let preds = load_predictions(pred_path)?;
            let graded = grade_predictions(&dataset, &preds, pred_path)?;
            let name = pred_path
                .file_stem()
                .map_or("predictions".into(), |s| s.to_string_lossy().into_owned());
            let mut r =
                EvalReport::new(name, pred_path.display().to_string(), graded, dataset.len());
            r.dataset = Some(args.dataset.display().to_string());
            let out = args
                .output_dir
                .clone()
                .unwrap_or_else(|| default_out_dir(pred_path));
            r.write(&out)?;
            (r, out)
        }
    };
    let a = &report.accuracy;
    println!(
        "graded {} responses covering {} of {} dataset items",
        a.total, a.items_covered, a.dataset_size
    );
    println!("{}", report.summary());
    println!(
        "per-example: {}\nresults:     {}",
        out_dir.join(EvalReport::EXAMPLES_FILE).display(),
        out_dir.join(EvalReport::FILE).display()
    );
    Ok(())
}

fn default_out_dir(pred_path: &Path) -> PathBuf {
    let stem = pred_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("predictions");
    pred_path.with_file_name(format!("{stem}.eval"))
}

/// `eval --model`: generate on the dataset, grade, write the report.
fn eval_model(
    model: &str,
    placement: Placement,
    dataset: &Path,
    cfg: &EvalConfig,
    num_samples: i64,
    out: &Path,
) -> Result<EvalReport> {
    let policy = Source::new(model, placement).fresh()?;
    let examples = data::select(data::load(dataset)?, num_samples, None);
    let graded = evaluate(&policy, &examples, cfg, "eval")?;
    let mut report = EvalReport::new(model, model, graded, examples.len());
    report.dataset = Some(dataset.display().to_string());
    report.config = Some(serde_json::to_value(cfg)?);
    report.write(out)?;
    Ok(report)
}
