//! `cal-grpo oracle-bench`: how well an oracle locates first errors on labeled
//! responses; and `cal-grpo plant-errors`, which makes such labels from reference
//! solutions (GSM8K's or generated ones) with one step corrupted and carried forward.

use crate::config::OracleFlags;
use anyhow::{anyhow, bail, Context, Result};
use cal_core::data::planted::{self, Slip};
use cal_core::locate::LocateConfig;
use cal_oracle::bench::{parse_labels, summarize, Answer, BenchReport, Case, Scored};
use cal_oracle::{locate_error, OracleRequest};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct OracleBenchArgs {
    /// Labeled responses (JSONL: question, reference, response, first_error or null,
    /// optional first_error_start), e.g. from `cal-grpo plant-errors`.
    #[arg(long)]
    pub labels: PathBuf,
    #[command(flatten)]
    pub oracle: OracleFlags,
    /// Only the first N labels (-1 = all).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub limit: i64,
    /// `tokenizer.json` for token-level overlap.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Write the numbers as JSON (fractions in [0, 1]) to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: &OracleBenchArgs) -> Result<()> {
    let mut cases = read_labels(&args.labels)?;
    if args.limit >= 0 {
        cases.truncate(args.limit as usize);
    }
    if cases.is_empty() {
        bail!("--limit {}: no labels left", args.limit);
    }
    let tok = match &args.tokenizer {
        Some(p) => {
            Some(tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    let t0 = std::time::Instant::now();
    let report = bench(&args.oracle.spec()?, &cases, tok.as_ref())?;
    print!("{}", report.table());
    eprintln!(
        "{} labels in {:.1}s",
        cases.len(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = &args.output {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("written to {}", p.display());
    }
    Ok(())
}

/// Runs `spec`'s oracle over labeled cases, every request at once (a remote oracle
/// holds its own concurrency limit), and scores its answers; `tok` adds token overlap.
pub fn bench(
    spec: &cal_oracle::OracleSpec,
    cases: &[Case],
    tok: Option<&tokenizers::Tokenizer>,
) -> Result<BenchReport> {
    let oracle = spec.build().map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new()?;
    let outcomes = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, c) in cases.iter().enumerate() {
            let (oracle, req) = (
                oracle.clone(),
                OracleRequest {
                    question: c.label.question.clone(),
                    reference: c.label.reference.clone(),
                    response: c.label.response.clone(),
                },
            );
            set.spawn(async move {
                (
                    i,
                    locate_error(oracle.as_ref(), &req, &LocateConfig::default()).await,
                )
            });
        }
        let mut out = vec![None; cases.len()];
        while let Some(r) = set.join_next().await {
            let (i, o) = r?;
            out[i] = Some(o);
        }
        anyhow::Ok(out)
    })?;
    let scored: Vec<Scored> = outcomes
        .into_iter()
        .map(|o| {
            let o = o.expect("every request answered");
            Scored {
                answer: Answer::of(&o),
                usage: o.usage().cloned(),
            }
        })
        .collect();
    let offsets = |text: &str| {
        let enc = tok?.encode(text, false).ok()?;
        Some(enc.get_offsets().to_vec())
    };
    Ok(summarize(
        oracle.provider(),
        oracle.model(),
        cases,
        &scored,
        tok.is_some().then_some(&offsets as _),
    ))
}

/// Reads a labels file (an error names the file, or the line of a bad row).
pub fn read_labels(path: &std::path::Path) -> Result<Vec<Case>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cases = parse_labels(&text, path).map_err(anyhow::Error::msg)?;
    if cases.is_empty() {
        bail!("{}: no labels", path.display());
    }
    Ok(cases)
}

#[derive(Debug, Args)]
pub struct PlantArgs {
    /// Reference solutions with `<<a op b = c>>` notes: a GSM8K file, or `generated`
    /// (the embedded benchmark's chains).
    #[arg(long)]
    pub dataset: String,
    /// Labeled responses to write (those with an error; solutions that cannot be
    /// rewritten step by step are passed over).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Share of correct responses mixed in, to measure false alarms.
    #[arg(long, default_value_t = 0.2)]
    pub correct_share: f64,
    /// Comma-separated kinds of error: result, operand, operation (drawn in turn).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "result,operand,operation"
    )]
    pub kinds: Vec<String>,
    /// With `generated`: the embedded benchmark's chains of exactly K steps (the problems
    /// `experiment --chain-steps K` trains on), instead of the default 2–3 step stories.
    #[arg(long)]
    pub chain_steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The JSONL file to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn plant(args: &PlantArgs) -> Result<()> {
    let kinds: Vec<Slip> = args
        .kinds
        .iter()
        .map(|k| {
            Slip::ALL
                .into_iter()
                .find(|s| s.name() == k)
                .ok_or_else(|| anyhow!("unknown kind `{k}` (result, operand, operation)"))
        })
        .collect::<Result<_>>()?;
    if !(0.0..1.0).contains(&args.correct_share) {
        bail!("--correct-share must be in [0, 1)");
    }
    let examples = if args.dataset == "generated" {
        let generator = match args.chain_steps {
            Some(k) => {
                let data = cal_train::config::DataSection {
                    style: cal_core::data::Style::Chain,
                    steps: Some(k),
                    ..Default::default()
                };
                cal_train::tiny::TinySpec::for_data(&data).generator
            }
            None => cal_core::data::GenConfig::default(),
        };
        cal_core::data::generate(args.n * 2, args.seed, &generator)
    } else if args.chain_steps.is_some() {
        bail!("--chain-steps applies to --dataset generated only");
    } else {
        cal_core::data::sets::load_part(&args.dataset, cal_core::data::sets::Split::All)?.examples
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
    let n_correct =
        (args.n as f64 * args.correct_share / (1.0 - args.correct_share)).round() as usize;
    let (mut errors, mut correct, mut passed) = (0, 0, 0);
    let mut out = String::new();
    for (j, &i) in order.iter().enumerate() {
        if errors >= args.n && correct >= n_correct {
            break;
        }
        let ex = &examples[i];
        // correct responses come from other problems than the planted ones
        let label =
            if correct < n_correct && (errors >= args.n || rng.random_bool(args.correct_share)) {
                correct += 1;
                planted::correct(ex)
            } else if errors < args.n {
                match planted::plant(ex, kinds[j % kinds.len()], &mut rng) {
                    Some(l) => {
                        errors += 1;
                        l
                    }
                    None => {
                        passed += 1;
                        continue;
                    }
                }
            } else {
                continue;
            };
        out.push_str(&serde_json::to_string(&label)?);
        out.push('\n');
    }
    std::fs::write(&args.output, out)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "{} responses with a planted error and {} correct ones written to {} ({} solutions passed over: a step not of the form `a op b = <<a op b = c>>c`, or without notes a true `a op b = c`)",
        errors,
        correct,
        args.output.display(),
        passed
    );
    if errors < args.n {
        eprintln!(
            "warning: only {errors} of the {} asked for: the dataset has no more",
            args.n
        );
    }
    Ok(())
}
