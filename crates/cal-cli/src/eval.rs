//! `cal-grpo eval`: grade precomputed responses (`--predictions`) against a dataset.

use anyhow::{bail, Context, Result};
use cal_core::data;
use cal_core::evaluate::{accuracy, grade_predictions, load_predictions};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// JSONL of responses: rows with `response` and `idx` or `question`.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// GSM8K-format dataset (`.jsonl` or `.parquet`) holding the gold answers.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Directory for `eval_examples.jsonl` and `eval_results.json`
    /// [default: next to the predictions file, as `<stem>.eval/`].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Model to generate with instead of --predictions: `tiny`, a Hugging Face folder or
    /// a `.gguf` file.
    #[arg(long)]
    pub model: Option<String>,
    /// Samples per question (1 = greedy; k > 1 samples at T = 0.7 and reports pass@k).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Evaluate the first N problems (-1 = all).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub num_samples: i64,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let Some(pred_path) = &args.predictions else {
        if let Some(model) = &args.model {
            let out = args
                .output_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/eval"));
            crate::run::eval_model(
                model,
                &args.dataset,
                args.samples,
                args.num_samples,
                args.max_new_tokens,
                &out,
            )?;
            return Ok(());
        }
        bail!("eval needs --predictions FILE.jsonl or --model PATH");
    };
    let dataset = data::load(&args.dataset)?;
    let preds = load_predictions(pred_path)?;
    let graded = grade_predictions(&dataset, &preds, pred_path)?;
    let acc = accuracy(&graded, dataset.len());

    let out_dir = args
        .output_dir
        .clone()
        .unwrap_or_else(|| default_out_dir(pred_path));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let examples_path = out_dir.join("eval_examples.jsonl");
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&examples_path)
            .with_context(|| format!("creating {}", examples_path.display()))?,
    );
    for g in &graded {
        writeln!(w, "{}", serde_json::to_string(g)?)?;
    }
    w.flush()?;
    let results = serde_json::json!({
        "dataset": args.dataset,
        "predictions": pred_path,
        "accuracy": acc,
    });
    let results_path = out_dir.join("eval_results.json");
    std::fs::write(&results_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", results_path.display()))?;

    let pct = |x: f64| 100.0 * x;
    println!(
        "graded {} responses covering {} of {} dataset items",
        acc.total, acc.items_covered, acc.dataset_size
    );
    println!(
        "strict-match     {:6.2}%  ({}/{})",
        pct(acc.strict_accuracy),
        acc.strict_correct,
        acc.total
    );
    println!(
        "flexible-extract {:6.2}%  ({}/{})",
        pct(acc.flexible_accuracy),
        acc.flexible_correct,
        acc.total
    );
    println!(
        "per-example: {}\nresults:     {}",
        examples_path.display(),
        results_path.display()
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
