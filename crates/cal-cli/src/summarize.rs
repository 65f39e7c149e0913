//! `cal-grpo summarize DIR...`: one row per finished experiment folder (its chain
//! length and warm start, both arms' gains and CAL − baseline over seeds); with
//! `--bench-labels`, also the noise map: each folder's own oracle (noise included) run
//! over labeled responses, and CAL − baseline against its exact match (`--plot`); with
//! `--curves`, every folder's held-out accuracy curves in one PNG.

use anyhow::{Context, Result};
use cal_train::config::RunConfig;
use cal_train::study::compare;
use cal_train::study::noise_map::{self, MapPoint};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct SummarizeArgs {
    /// Experiment folders (`--output-dir` of `experiment`), one row each.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Labeled responses (`plant-errors`): run each folder's oracle over them and map
    /// CAL − baseline against the oracle's exact match.
    #[arg(long)]
    pub bench_labels: Option<PathBuf>,
    /// Draw the map as a PNG (needs --bench-labels).
    #[arg(long, requires = "bench_labels")]
    pub plot: Option<PathBuf>,
    /// Draw every folder's held-out accuracy curves (GRPO and CAL, one thin line per
    /// seed and the mean in bold) into one PNG; a baseline reused by a later folder is
    /// drawn once.
    #[arg(long)]
    pub curves: Option<PathBuf>,
}

/// The configuration an experiment folder was run with.
fn config_of(dir: &Path) -> Result<RunConfig> {
    let path = dir.join("config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    RunConfig::from_toml_str(&text, &path.display().to_string())
}

pub fn run(args: &SummarizeArgs) -> Result<()> {
    let rows = args
        .dirs
        .iter()
        .map(|d| cal_train::study::summarize::read_experiment(d))
        .collect::<Result<Vec<_>>>()?;
    print!("{}", cal_train::study::summarize::table(&rows));
    if let Some(out) = &args.curves {
        let cfg = config_of(&rows[0].dir)?;
        let per_step = cfg.rollout.prompts_per_step * cfg.rollout.num_generations;
        let read = |d: &Path| compare::read_curve(d, "eval/accuracy");
        let arms = cal_train::study::summarize::held_out_arms(&rows, read);
        compare::plot_held_out(&arms, per_step, out)?;
        println!("held-out curves written to {}", out.display());
    }
    let Some(labels) = &args.bench_labels else {
        return Ok(());
    };
    let cases = crate::oracle_bench::read_labels(labels)?;
    let mut points = Vec::new();
    for row in rows {
        let spec = config_of(&row.dir)?.oracle;
        let report = crate::oracle_bench::bench(&spec, &cases, None)
            .with_context(|| format!("benchmarking the oracle of {}", row.dir.display()))?;
        let mut oracle = spec.provider.name().to_string();
        if !spec.noise.is_zero() {
            oracle += &format!(", {}", String::from(spec.noise));
        }
        points.push(MapPoint {
            dir: row.dir,
            oracle,
            exact_match: report.exact_match,
            located: report.located,
            located_in_training: row.cal_located,
            cal_minus_baseline: row.cal_minus_baseline,
        });
    }
    println!(
        "\nThe noise map ({} labels from {}):\n",
        cases.len(),
        labels.display()
    );
    print!("{}", noise_map::table(&points));
    if let Some(out) = &args.plot {
        noise_map::plot(&points, out)?;
        println!("plot written to {}", out.display());
    }
    Ok(())
}
