//! `cal-grpo summarize DIR...`: one row per finished experiment folder (its chain
//! length and warm start, both arms' gains and CAL − baseline over seeds).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct SummarizeArgs {
    /// Experiment folders (`--output-dir` of `experiment`), one row each.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
}

pub fn run(args: &SummarizeArgs) -> Result<()> {
    let rows = args
        .dirs
        .iter()
        .map(|d| cal_train::study::summarize::read_experiment(d))
        .collect::<Result<Vec<_>>>()?;
    print!("{}", cal_train::study::summarize::table(&rows));
    Ok(())
}
