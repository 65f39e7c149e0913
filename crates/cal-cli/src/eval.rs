//! `cal-grpo eval`: grade precomputed responses (`--predictions`) or a model's
//! generations against a dataset; both write the same [`EvalReport`].

use crate::config::{flag_layer, merge_layers, LengthFlags, PlacementFlags, PromptFlags};
use crate::source::Source;
use anyhow::{bail, Result};
use cal_core::data::sets::{load_part, SetKind, SetPart, SetSpec, Split};
use cal_core::data::{self, Example, Style};
use cal_core::evaluate::{grade_predictions, load_predictions};
use cal_model::Placement;
use cal_train::config::RunConfig;
use cal_train::evaluate::{evaluate, EvalConfig, EvalReport};
use cal_train::policy::PolicySource;
use cal_train::prompt::PromptFormat;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// JSONL of responses: rows with `response` and `idx` or `question` (several rows
    /// per item give pass@k).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// The problems and gold answers: a GSM8K `.jsonl`/`.parquet` file, or a set by name
    /// as it ships (`asdiv:PATH`, `svamp:PATH`, `mawps:PATH`, `gsm-hard:PATH`; a plain
    /// path is recognised by its fields).
    #[arg(long)]
    pub dataset: String,
    /// Which part of a set without its own split is graded with --model: `held-out`
    /// (its seeded 30%, the part `train` holds out), `train` or `all`. GSM8K files are
    /// graded whole.
    #[arg(long, default_value = "held-out")]
    pub split: Split,
    /// TOML file in the run schema; `eval` reads its prompt keys (`[data]`
    /// prompt-template, system-prompt, instruction, few-shot); flags win.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub prompt: PromptFlags,
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
    #[command(flatten)]
    pub quantize: crate::config::QuantizeFlags,
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
    #[command(flatten)]
    pub length: LengthFlags,
    #[arg(long, default_value_t = EvalConfig::default().seed)]
    pub seed: u64,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let layer = merge_layers([
        flag_layer(&args.prompt)?,
        flag_layer(&args.length)?,
        flag_layer(&args.quantize)?,
    ]);
    let cfg = RunConfig::resolve(args.config.as_deref(), &layer)?;
    if args.print_config {
        return crate::train::print_config(&cfg);
    }
    let (report, out_dir) = match (&args.predictions, &args.model) {
        (Some(_), Some(_)) => bail!("eval takes --predictions or --model, not both"),
        (None, None) => bail!("eval needs --predictions FILE.jsonl or --model PATH"),
        (None, Some(model)) => {
            let out = args
                .output_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/eval"));
            let ecfg = EvalConfig {
                samples: args.samples.max(1),
                greedy: args.samples <= 1,
                temperature: args.temperature,
                seed: args.seed,
                ..EvalConfig::of_run(&cfg)
            };
            let placement = args.placement.placement();
            let r = eval_model(
                model,
                placement,
                (&args.dataset, args.split),
                &ecfg,
                &cfg,
                args.num_samples,
                &out,
            )?;
            (r, out)
        }
        (Some(pred_path), None) => {
            let dataset = if args.dataset == "generated" {
                generated_part(&cfg, args.split, -1).examples
            } else {
                load_part(&args.dataset, Split::All)?.examples
            };
            let preds = load_predictions(pred_path)?;
            let graded = grade_predictions(&dataset, &preds, pred_path)?;
            let name = pred_path
                .file_stem()
                .map_or("predictions".into(), |s| s.to_string_lossy().into_owned());
            let mut r =
                EvalReport::new(name, pred_path.display().to_string(), graded, dataset.len());
            r.dataset = Some(args.dataset.clone());
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

/// `eval --model`: generate on the dataset's part, grade, write the report (with the
/// prompt it asked with).
fn eval_model(
    model: &str,
    placement: Placement,
    (spec, split): (&str, Split),
    ecfg: &EvalConfig,
    run: &RunConfig,
    num_samples: i64,
    out: &Path,
) -> Result<EvalReport> {
    let part = if spec == "generated" {
        generated_part(run, split, num_samples)
    } else {
        load_part(spec, split)?
    };
    let examples = data::select(part.examples, num_samples, None);
    eprintln!(
        "{spec}: {}: {} problems graded{}",
        part.note,
        examples.len(),
        match part.skipped {
            0 => String::new(),
            n => format!(" ({n} rows skipped: answer not a number)"),
        }
    );
    let pool = if spec == "generated" {
        generated_part(run, Split::Train, -1).examples
    } else {
        few_shot_pool(spec, run.data.few_shot)?
    };
    let prompt = PromptFormat::of(&run.data, &pool)?;
    let mut policy = Source::new(model, placement)
        .quantized(run.model.quantize_base)
        .fresh()?
        .with_prompt(prompt);
    if let Some(q) = run.model.quantize_base.ggml() {
        policy.model.quantize_base(q)?;
    }
    let graded = evaluate(&policy, &examples, ecfg, "eval")?;
    let mut report = EvalReport::new(model, model, graded, examples.len());
    report.dataset = Some(format!("{spec} ({})", part.note));
    report.config = Some(serde_json::to_value(ecfg)?);
    report.prompt = Some(policy.prompt.clone());
    report.write(out)?;
    Ok(report)
}

/// `--dataset generated`, `train`'s default: the embedded problems of the run's
/// configuration (`data.style`, `data.steps`), split as `train` splits them: held-out
/// (the default), train, or both.
fn generated_part(run: &RunConfig, split: Split, num_samples: i64) -> SetPart {
    let mut d = run.data.clone();
    d.eval_samples = num_samples;
    let (train, test) = cal_train::tiny::TinySpec::run_splits(&run.model.tiny, &d);
    let (examples, which) = match split {
        Split::HeldOut => (test, "held-out"),
        Split::Train => (train, "train"),
        Split::All => ([train, test].concat(), "train and held-out"),
    };
    SetPart {
        kind: SetKind::Gsm8k,
        rows: examples.len(),
        examples,
        skipped: 0,
        note: format!(
            "the embedded {} problems, {which}",
            match d.style {
                Style::Story => "story",
                Style::Chain => "chain",
            }
        ),
    }
}

/// Where few-shot examples come from: the training part of the set, never the problems
/// graded. A GSM8K file's is the `train.jsonl` beside it.
pub fn few_shot_pool(spec: &str, k: usize) -> Result<Vec<Example>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let part = load_part(spec, Split::Train)?;
    if !part.kind.has_own_split() {
        return Ok(part.examples);
    }
    let p = SetSpec::parse(spec).path;
    let train = p.with_file_name("train.jsonl");
    if train == p || !train.exists() {
        bail!(
            "--few-shot {k} needs a training split: no train.jsonl beside {} to draw examples from",
            p.display()
        );
    }
    Ok(data::load(&train)?)
}
