//! `cal-grpo summarize DIR...`: one table across finished experiment folders (the
//! chain-length map of `docs/results.md`): each folder's benchmark and warm start, the gains of both
//! arms over the start and CAL − baseline as means over seeds with 95% t intervals, the
//! share of arithmetic steps right at the end, and the all-wrong group fractions.
//!
//! Everything is read back from what `experiment` wrote (`config.toml`, `summary.json`,
//! `before/eval_results.json`, each arm's `metrics.jsonl`); the numbers are computed by
//! [`crate::study`], the same code as the experiment's own summary.

use crate::config::RunConfig;
use crate::evaluate::EvalReport;
use crate::study::compare::Curve;
use crate::study::stats::mean_ci95;
use crate::tiny::TinySpec;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The tiny warm start of an experiment: its SFT steps and its corpus's chain lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SftRecipe {
    pub steps: usize,
    pub chain_steps: (usize, usize),
}

fn show_range((a, b): (usize, usize)) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}–{b}")
    }
}

/// One finished experiment, in points where it is a percentage.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentRow {
    pub dir: PathBuf,
    /// Arithmetic steps per problem of the embedded benchmark (`min..=max`), `None` for
    /// a dataset file.
    pub chain_steps: Option<(usize, usize)>,
    /// The tiny warm start (`None` for another model).
    pub sft: Option<SftRecipe>,
    pub seeds: Vec<u64>,
    pub before: f64,
    pub before_steps_right: Option<f64>,
    pub baseline_gain: Vec<f64>,
    pub cal_gain: Vec<f64>,
    pub cal_minus_baseline: Vec<f64>,
    /// `eval/step_accuracy` at each arm's last evaluation, per seed.
    pub steps_right_baseline: Vec<f64>,
    pub steps_right_cal: Vec<f64>,
    pub all_wrong_baseline: Vec<f64>,
    pub all_wrong_cal: Vec<f64>,
    /// Share of CAL's wrong rollouts in which the oracle located a span, per seed.
    pub cal_located: Vec<f64>,
}

fn last_step_accuracy(metrics: &Path) -> Result<Option<f64>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut last = None;
    for (i, line) in text.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", metrics.display(), i + 1))?;
        if let Some(x) = row.get("eval/step_accuracy").and_then(|v| v.as_f64()) {
            last = Some(100.0 * x);
        }
    }
    Ok(last)
}

/// Reads one experiment folder (an error names the file that is missing or wrong).
pub fn read_experiment(dir: &Path) -> Result<ExperimentRow> {
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "reading {} (is {} an experiment folder?)",
            cfg_path.display(),
            dir.display()
        )
    })?;
    let cfg = RunConfig::from_toml_str(&text, &cfg_path.display().to_string())?;
    let summary_path = dir.join("summary.json");
    let summary: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).with_context(|| {
            format!(
                "reading {} (has the experiment finished?)",
                summary_path.display()
            )
        })?)
        .with_context(|| format!("{}: not an experiment summary", summary_path.display()))?;
    if summary.is_empty() {
        bail!("{}: no seeds", summary_path.display());
    }
    let before = EvalReport::read(&dir.join("before"))?;
    let num = |s: &serde_json::Value, key: &str| -> Result<f64> {
        s.get(key)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("{}: a seed without `{key}`", summary_path.display()))
    };
    let (chain_steps, sft) = if cfg.data.dataset == "generated" {
        // K of the RL and held-out problems; the SFT corpus's may differ
        // (`sft-chain-steps`)
        let k = TinySpec::for_data(&cfg.data).generator;
        let spec = TinySpec::for_run(&cfg.model.tiny, &cfg.data);
        let sft = (cfg.model.name == "tiny").then_some(SftRecipe {
            steps: spec.sft.steps,
            chain_steps: (spec.generator.min_steps, spec.generator.max_steps),
        });
        (Some((k.min_steps, k.max_steps)), sft)
    } else {
        (None, None)
    };
    let mut row = ExperimentRow {
        dir: dir.to_path_buf(),
        chain_steps,
        sft,
        seeds: Vec::new(),
        before: 100.0 * before.accuracy.accuracy,
        before_steps_right: before.step_accuracy.map(|x| 100.0 * x),
        baseline_gain: Vec::new(),
        cal_gain: Vec::new(),
        cal_minus_baseline: Vec::new(),
        steps_right_baseline: Vec::new(),
        steps_right_cal: Vec::new(),
        all_wrong_baseline: Vec::new(),
        all_wrong_cal: Vec::new(),
        cal_located: Vec::new(),
    };
    for s in &summary {
        let seed = num(s, "seed")? as u64;
        let (b0, b, c) = (num(s, "before")?, num(s, "baseline")?, num(s, "cal")?);
        row.seeds.push(seed);
        row.baseline_gain.push(100.0 * (b - b0));
        row.cal_gain.push(100.0 * (c - b0));
        row.cal_minus_baseline.push(100.0 * (c - b));
        row.all_wrong_baseline
            .push(num(s, "baseline_all_wrong_frac")?);
        row.all_wrong_cal.push(num(s, "cal_all_wrong_frac")?);
        row.cal_located.push(num(s, "cal_spans_located_frac")?);
        let sdir = dir.join(format!("seed-{seed}"));
        for (arm, out) in [
            ("baseline", &mut row.steps_right_baseline),
            ("cal", &mut row.steps_right_cal),
        ] {
            if let Some(x) = last_step_accuracy(&sdir.join(arm).join("metrics.jsonl"))? {
                out.push(x);
            }
        }
    }
    Ok(row)
}

/// `m [lo, hi]` over seeds, or the one value.
fn mean_ci(xs: &[f64]) -> String {
    match mean_ci95(xs) {
        Some((m, lo, hi)) => format!("{m:+.1} [{lo:+.1}, {hi:+.1}]"),
        None if xs.len() == 1 => format!("{:+.1}", xs[0]),
        None => "–".into(),
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn range(xs: &[f64]) -> String {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() {
        "–".into()
    } else {
        format!("{lo:.2}–{hi:.2}")
    }
}

/// The table, one row per experiment, as Markdown.
pub fn table(rows: &[ExperimentRow]) -> String {
    let mut s = String::from(
        "| experiment | K | SFT steps | seeds | before RL (steps right) | baseline − before | CAL − before | CAL − baseline (95% t CI) | steps right at the end, base / CAL (CAL − base) | all-wrong groups (base / CAL) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let k = r.chain_steps.map_or("–".into(), show_range);
        // the SFT corpus's K only where it is not the run's own
        let sft = match r.sft {
            Some(s) if Some(s.chain_steps) != r.chain_steps => {
                format!("{} (K {})", s.steps, show_range(s.chain_steps))
            }
            Some(s) => s.steps.to_string(),
            None => "–".into(),
        };
        let before = match r.before_steps_right {
            Some(st) => format!("{:.1}% ({st:.1}%)", r.before),
            None => format!("{:.1}%", r.before),
        };
        let steps = if r.steps_right_baseline.len() == r.seeds.len()
            && r.steps_right_cal.len() == r.seeds.len()
        {
            let d: Vec<f64> = r
                .steps_right_cal
                .iter()
                .zip(&r.steps_right_baseline)
                .map(|(c, b)| c - b)
                .collect();
            format!(
                "{:.1} / {:.1}% ({})",
                mean(&r.steps_right_baseline),
                mean(&r.steps_right_cal),
                mean_ci(&d)
            )
        } else {
            "–".into()
        };
        s.push_str(&format!(
            "| {} | {k} | {sft} | {} | {before} | {} | {} | {} | {steps} | {} / {} |\n",
            r.dir.display(),
            r.seeds.len(),
            mean_ci(&r.baseline_gain),
            mean_ci(&r.cal_gain),
            mean_ci(&r.cal_minus_baseline),
            range(&r.all_wrong_baseline),
            range(&r.all_wrong_cal),
        ));
    }
    s.push_str(
        "\nIn points: means over seeds with 95% t intervals. \"steps right\": the share of the held-out problems' arithmetic steps done right (`eval/step_accuracy`), before RL and at each arm's last evaluation.\n",
    );
    s
}

/// The arms `summarize --curves` draws, each with its per-seed run folders: every
/// folder's CAL arm (`CAL, <folder name>`) and its baseline, except a baseline whose
/// held-out curves repeat one already listed (an arm reused by a later experiment, as
/// `bench/noise_map.sh` and `bench/real_model_rl.sh` do). `curve` reads a run folder's
/// `eval/accuracy` curve.
pub fn held_out_arms(
    rows: &[ExperimentRow],
    curve: impl Fn(&Path) -> Curve,
) -> Vec<(String, Vec<PathBuf>)> {
    let name = |r: &ExperimentRow| {
        r.dir.file_name().map_or_else(
            || r.dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    };
    let seed_dirs = |r: &ExperimentRow, arm: &str| -> Vec<PathBuf> {
        let dirs = r.seeds.iter();
        dirs.map(|s| r.dir.join(format!("seed-{s}")).join(arm))
            .collect()
    };
    let mut baselines: Vec<(String, Vec<PathBuf>, Vec<Curve>)> = Vec::new();
    for r in rows {
        let dirs = seed_dirs(r, "baseline");
        let curves: Vec<Curve> = dirs.iter().map(|d| curve(d)).collect();
        if !baselines.iter().any(|b| b.2 == curves) {
            baselines.push((name(r), dirs, curves));
        }
    }
    let one = baselines.len() == 1;
    let mut arms: Vec<(String, Vec<PathBuf>)> = baselines
        .into_iter()
        .map(|(n, dirs, _)| {
            (
                if one {
                    "GRPO".into()
                } else {
                    format!("GRPO, {n}")
                },
                dirs,
            )
        })
        .collect();
    arms.extend(
        rows.iter()
            .map(|r| (format!("CAL, {}", name(r)), seed_dirs(r, "cal"))),
    );
    arms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ExperimentRow {
        ExperimentRow {
            dir: "runs/k4".into(),
            chain_steps: Some((4, 4)),
            sft: Some(SftRecipe {
                steps: 900,
                chain_steps: (4, 4),
            }),
            seeds: vec![42, 43, 44],
            before: 40.0,
            before_steps_right: Some(69.2),
            baseline_gain: vec![1.0, 2.0, 3.0],
            cal_gain: vec![4.0, 5.0, 6.0],
            cal_minus_baseline: vec![3.0, 3.0, 3.0],
            steps_right_baseline: vec![70.0, 71.0, 72.0],
            steps_right_cal: vec![73.0, 74.0, 75.0],
            all_wrong_baseline: vec![0.30, 0.32, 0.31],
            all_wrong_cal: vec![0.28, 0.29, 0.30],
            cal_located: vec![0.64, 0.65, 0.65],
        }
    }

    #[test]
    fn a_row_has_means_intervals_and_ranges() {
        let t = table(&[row()]);
        // mean 2, sd 1, t(2) = 4.303: half-width 4.303 / sqrt(3) = 2.484
        assert!(t.contains("| runs/k4 | 4 | 900 | 3 | 40.0% (69.2%) | +2.0 [-0.5, +4.5] | +5.0 [+2.5, +7.5] | +3.0 [+3.0, +3.0] | 71.0 / 74.0% (+3.0 [+3.0, +3.0]) | 0.30–0.32 / 0.28–0.30 |"), "{t}");
    }

    #[test]
    fn one_seed_and_missing_step_accuracy_still_make_a_row() {
        let mut r = row();
        r.seeds = vec![42];
        r.baseline_gain = vec![5.0];
        r.cal_gain = vec![10.0];
        r.cal_minus_baseline = vec![5.0];
        r.steps_right_baseline.clear();
        // an SFT corpus of other chain lengths than the run's shows in its column
        r.chain_steps = Some((6, 6));
        r.sft = Some(SftRecipe {
            steps: 1200,
            chain_steps: (2, 6),
        });
        let t = table(&[r]);
        assert!(
            t.contains("| 6 | 1200 (K 2–6) | 1 |") && t.contains("| +5.0 | +10.0 | +5.0 | – |"),
            "{t}"
        );
    }

    #[test]
    fn a_reused_baseline_is_drawn_once() {
        let mut reference = row();
        reference.dir = "runs/real-model/reference".into();
        reference.seeds = vec![42, 43];
        let mut calculator = reference.clone();
        calculator.dir = "runs/real-model/calculator".into();
        // the calculator folder's baselines are copies: the same curves
        let curve = |d: &Path| -> Curve {
            let cal = d.ends_with("cal");
            let calc = d.starts_with("runs/real-model/calculator");
            vec![
                (0.0, 0.2),
                (
                    6.0,
                    if cal && calc {
                        0.3
                    } else if cal {
                        0.25
                    } else {
                        0.22
                    },
                ),
            ]
        };
        let arms = held_out_arms(&[reference.clone(), calculator.clone()], curve);
        let names: Vec<&str> = arms.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(names, ["GRPO", "CAL, reference", "CAL, calculator"]);
        assert_eq!(
            arms[0].1,
            [
                PathBuf::from("runs/real-model/reference/seed-42/baseline"),
                PathBuf::from("runs/real-model/reference/seed-43/baseline"),
            ]
        );
        // baselines that differ (a separate run) are both drawn, named by folder
        let curve2 = |d: &Path| -> Curve {
            vec![(
                0.0,
                if d.starts_with("runs/real-model/calculator") {
                    0.1
                } else {
                    0.2
                },
            )]
        };
        let arms = held_out_arms(&[reference, calculator], curve2);
        let names: Vec<&str> = arms.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "GRPO, reference",
                "GRPO, calculator",
                "CAL, reference",
                "CAL, calculator"
            ]
        );
    }
}
