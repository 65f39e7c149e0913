//! `cal-grpo gen-data`: the seeded GSM8K-format problem generator, as JSONL.

use anyhow::{Context, Result};
use cal_core::data::{self, GenConfig};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct GenDataArgs {
    /// How many problems.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fewest arithmetic steps per problem.
    #[arg(long, default_value_t = GenConfig::default().min_steps)]
    pub min_steps: usize,
    /// Most arithmetic steps per problem.
    #[arg(long, default_value_t = GenConfig::default().max_steps)]
    pub max_steps: usize,
    /// Largest starting quantity / addend.
    #[arg(long, default_value_t = GenConfig::default().max_operand)]
    pub max_operand: u64,
    /// Largest multiplier / divisor.
    #[arg(long, default_value_t = GenConfig::default().max_factor)]
    pub max_factor: u64,
    /// Largest intermediate value [default: bounded by --max-operand and --max-factor].
    #[arg(long)]
    pub max_value: Option<u64>,
    /// Wording: `story` (GSM8K-like word problems) or `chain` (bare steps).
    #[arg(long, value_enum, default_value = "story")]
    pub style: data::Style,
    /// Output file (default: stdout).
    #[arg(long, short, conflicts_with = "splits")]
    pub output: Option<PathBuf>,
    /// Named splits that share no question (compared as normalised text), e.g.
    /// `sft=3000,rl=2000,test=600`: one `NAME.jsonl` each in --output-dir, with
    /// `splits.json` recording the knobs. --n is then ignored.
    #[arg(long, value_name = "NAME=N,...", requires = "output_dir")]
    pub splits: Option<String>,
    /// Folder of the --splits files.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

/// `sft=3000,rl=2000,test=600` → names and sizes, in order.
pub fn parse_splits(spec: &str) -> Result<Vec<(String, usize)>> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .with_context(|| format!("--splits: `{part}` is not NAME=N"))?;
        let name = name.trim();
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "--splits: `{name}` is not a file name (letters, digits, - and _)"
        );
        anyhow::ensure!(
            out.iter().all(|(n, _)| n != name),
            "--splits: `{name}` is named twice"
        );
        let n: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--splits: `{part}`: the size is not a number"))?;
        anyhow::ensure!(n > 0, "--splits: `{part}`: the size must be at least 1");
        out.push((name.to_string(), n));
    }
    anyhow::ensure!(!out.is_empty(), "--splits: no split named");
    Ok(out)
}

/// Writes `examples` as GSM8K JSONL rows to `path`, or to stdout when `None`.
fn write_jsonl(path: Option<&std::path::Path>, examples: &[data::Example]) -> Result<()> {
    let mut out: Box<dyn Write> = match path {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for ex in examples {
        let row = serde_json::json!({"idx": ex.idx, "question": ex.question, "answer": ex.answer});
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(args: &GenDataArgs) -> Result<()> {
    anyhow::ensure!(
        args.min_steps >= 1 && args.min_steps <= args.max_steps,
        "need 1 <= --min-steps <= --max-steps"
    );
    let cfg = GenConfig {
        min_steps: args.min_steps,
        max_steps: args.max_steps,
        max_operand: args.max_operand,
        max_factor: args.max_factor,
        mul_div: true,
        style: args.style,
        max_value: args.max_value,
    };
    if let (Some(spec), Some(dir)) = (&args.splits, &args.output_dir) {
        let splits = parse_splits(spec)?;
        let sizes: Vec<usize> = splits.iter().map(|s| s.1).collect();
        let parts =
            data::generate_disjoint(&sizes, args.seed, &cfg).map_err(|e| anyhow::anyhow!(e))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for ((name, _), part) in splits.iter().zip(&parts) {
            write_jsonl(Some(&dir.join(format!("{name}.jsonl"))), part)?;
        }
        let manifest = serde_json::json!({
            "seed": args.seed,
            "generator": cfg,
            "splits": splits.iter().map(|(n, k)| serde_json::json!({"name": n, "problems": k})).collect::<Vec<_>>(),
            "disjoint": "no normalised question (lower case, letters and digits) is in two splits",
        });
        std::fs::write(
            dir.join("splits.json"),
            serde_json::to_string_pretty(&manifest)?,
        )?;
        eprintln!(
            "{} problems in {} disjoint splits written to {}",
            sizes.iter().sum::<usize>(),
            splits.len(),
            dir.display()
        );
        return Ok(());
    }
    write_jsonl(
        args.output.as_deref(),
        &data::generate(args.n, args.seed, &cfg),
    )
}
