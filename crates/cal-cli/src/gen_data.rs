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
    #[arg(long, short)]
    pub output: Option<PathBuf>,
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
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for ex in data::generate(args.n, args.seed, &cfg) {
        let row = serde_json::json!({"idx": ex.idx, "question": ex.question, "answer": ex.answer});
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    Ok(())
}
