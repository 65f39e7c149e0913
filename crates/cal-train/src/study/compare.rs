//! Baseline vs CAL on the same test items: accuracy table, paired bootstrap interval,
//! McNemar's exact test, a verdict that claims no more than the interval supports, and
//! the training curves of both runs as a PNG.

use anyhow::{bail, Context, Result};
use cal_core::evaluate::GradedExample;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub name_a: String,
    pub name_b: String,
    pub n: usize,
    pub correct_a: usize,
    pub correct_b: usize,
    pub acc_a: f64,
    pub acc_b: f64,
    /// `acc_b − acc_a` in points (percentage points).
    pub diff_points: f64,
    /// Relative change `(acc_b − acc_a) / acc_a` in percent (None when acc_a = 0).
    pub relative_percent: Option<f64>,
    pub ci95_points: (f64, f64),
    /// Items right only in A / only in B.
    pub only_a: usize,
    pub only_b: usize,
    pub mcnemar_p: f64,
    pub verdict: String,
}

/// Per-item correctness keyed by dataset idx (first sample of each item).
fn by_item(examples: &[GradedExample]) -> BTreeMap<u64, bool> {
    let mut m = BTreeMap::new();
    for e in examples {
        m.entry(e.idx).or_insert(e.correct);
    }
    m
}

/// Two-sided exact binomial test on the discordant pairs (McNemar).
pub fn mcnemar_exact(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    if n == 0 {
        return 1.0;
    }
    let k = only_a.min(only_b);
    // P(X <= k) for X ~ Bin(n, 1/2), in log space for large n
    let ln_choose = |n: usize, k: usize| -> f64 {
        (1..=k)
            .map(|i| ((n - k + i) as f64).ln() - (i as f64).ln())
            .sum()
    };
    let tail: f64 = (0..=k)
        .map(|i| (ln_choose(n, i) - n as f64 * 2f64.ln()).exp())
        .sum();
    (2.0 * tail).min(1.0)
}

/// Paired bootstrap 95% interval of `mean(b) − mean(a)` in points.
pub fn paired_bootstrap(a: &[bool], b: &[bool], resamples: usize, seed: u64) -> (f64, f64) {
    let n = a.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut diffs: Vec<f64> = (0..resamples)
        .map(|_| {
            let mut d = 0i64;
            for _ in 0..n {
                let i = rng.random_range(0..n);
                d += i64::from(b[i]) - i64::from(a[i]);
            }
            100.0 * d as f64 / n as f64
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    let q = |p: f64| diffs[((p * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    (q(0.025), q(0.975))
}

pub fn compare(
    name_a: &str,
    a: &[GradedExample],
    name_b: &str,
    b: &[GradedExample],
) -> Result<Comparison> {
    let (ma, mb) = (by_item(a), by_item(b));
    if ma.keys().ne(mb.keys()) {
        bail!("{name_a} and {name_b} were evaluated on different test items; a paired comparison needs the same ones");
    }
    let va: Vec<bool> = ma.values().copied().collect();
    let vb: Vec<bool> = mb.values().copied().collect();
    let n = va.len();
    let (ca, cb) = (
        va.iter().filter(|x| **x).count(),
        vb.iter().filter(|x| **x).count(),
    );
    let only_a = va.iter().zip(&vb).filter(|(x, y)| **x && !**y).count();
    let only_b = va.iter().zip(&vb).filter(|(x, y)| !**x && **y).count();
    let (acc_a, acc_b) = (ca as f64 / n.max(1) as f64, cb as f64 / n.max(1) as f64);
    let diff = 100.0 * (acc_b - acc_a);
    let ci = paired_bootstrap(&va, &vb, 10_000, 0);
    let p = mcnemar_exact(only_a, only_b);
    let verdict = if ci.0 > 0.0 {
        format!(
            "{name_b} is better than {name_a} by {diff:+.1} points (95% CI [{:+.1}, {:+.1}], McNemar p = {p:.3}) on these {n} items.",
            ci.0, ci.1
        )
    } else if ci.1 < 0.0 {
        format!(
            "{name_b} is worse than {name_a} by {diff:+.1} points (95% CI [{:+.1}, {:+.1}], McNemar p = {p:.3}) on these {n} items.",
            ci.0, ci.1
        )
    } else {
        format!(
            "No significant difference: {name_b} − {name_a} = {diff:+.1} points, but the 95% CI [{:+.1}, {:+.1}] includes 0 (McNemar p = {p:.3}, {n} items).",
            ci.0, ci.1
        )
    };
    Ok(Comparison {
        name_a: name_a.into(),
        name_b: name_b.into(),
        n,
        correct_a: ca,
        correct_b: cb,
        acc_a,
        acc_b,
        diff_points: diff,
        relative_percent: (acc_a > 0.0).then(|| 100.0 * (acc_b - acc_a) / acc_a),
        ci95_points: ci,
        only_a,
        only_b,
        mcnemar_p: p,
        verdict,
    })
}

impl Comparison {
    /// The comparison as a Markdown table.
    pub fn table(&self) -> String {
        let rel = self
            .relative_percent
            .map_or("n/a".to_string(), |r| format!("{r:+.1}%"));
        format!(
            "| run | test accuracy | correct / total |\n|---|---|---|\n\
             | {} | {:.2}% | {} / {} |\n| {} | {:.2}% | {} / {} |\n\
             | difference | {:+.2} points ({rel} relative) | 95% CI [{:+.2}, {:+.2}], McNemar p = {:.3} |\n\n{}\n",
            self.name_a,
            100.0 * self.acc_a,
            self.correct_a,
            self.n,
            self.name_b,
            100.0 * self.acc_b,
            self.correct_b,
            self.n,
            self.diff_points,
            self.ci95_points.0,
            self.ci95_points.1,
            self.mcnemar_p,
            self.verdict
        )
    }
}

/// Reads one metric's curve from a run's `metrics.jsonl`.
pub fn read_curve(run_dir: &Path, metric: &str) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[metric].as_f64()?)))
        .collect()
}

pub(crate) fn font_bytes() -> Option<&'static [u8]> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ];
    let bytes = candidates.iter().find_map(|p| std::fs::read(p).ok())?;
    Some(Box::leak(bytes.into_boxed_slice()))
}

/// Registers a system TrueType font as plotters' "sans-serif" (plots need one).
pub(crate) fn register_sans_serif() -> Result<()> {
    let font =
        font_bytes().context("no TrueType font found for the plot (install fonts-dejavu-core)")?;
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot register font"))
}

/// One line of a plot.
struct Series {
    name: Option<String>,
    points: Vec<(f64, f64)>,
    color: usize,
    width: u32,
}

/// Draws `series` to `out` (PNG).
fn draw(series: &[Series], caption: &str, x_desc: &str, y_desc: &str, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_sans_serif()?;
    let max_x = series
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let max_y = series
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .fold(0.05, f64::max)
        * 1.1;
    let root = BitMapBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for s in series {
        let c = colors[s.color % colors.len()];
        let style = if s.width > 1 {
            c.stroke_width(s.width)
        } else {
            c.mix(0.35).stroke_width(1)
        };
        let drawn = chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?;
        if let Some(name) = &s.name {
            let w = s.width;
            drawn.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(w))
            });
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws the 5-step moving average of a per-step training metric of each run.
pub fn plot_curves(runs: &[(String, PathBuf)], metric: &str, out: &Path) -> Result<()> {
    let series: Vec<Series> = runs
        .iter()
        .enumerate()
        .map(|(i, (name, dir))| {
            let raw = read_curve(dir, metric);
            // moving average over 5 steps: single steps are noisy
            let points = (0..raw.len())
                .map(|i| {
                    let w = &raw[i.saturating_sub(4)..=i];
                    (
                        raw[i].0,
                        w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
                    )
                })
                .collect();
            Series {
                name: Some(name.clone()),
                points,
                color: i,
                width: 2,
            }
        })
        .collect();
    let caption = format!("{metric} (5-step moving average)");
    draw(&series, &caption, "step", metric, out)
}

/// `(step, value)` points.
pub type Curve = Vec<(f64, f64)>;

/// Mean over runs of a curve logged at the same steps (steps every run has).
pub fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let Some(first) = curves.first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter_map(|&(step, _)| {
            let ys: Vec<f64> = curves
                .iter()
                .filter_map(|c| c.iter().find(|p| p.0 == step).map(|p| p.1))
                .collect();
            (ys.len() == curves.len()).then(|| (step, ys.iter().sum::<f64>() / ys.len() as f64))
        })
        .collect()
}

/// Held-out accuracy (`eval/accuracy`, logged with `--eval-every`) against step for
/// each arm: one thin line per seed (run folder) and the mean in bold.
/// `rollouts_per_step` labels the axis in rollouts too. Returns the mean curves.
pub fn plot_held_out(
    arms: &[(String, Vec<PathBuf>)],
    rollouts_per_step: usize,
    out: &Path,
) -> Result<Vec<(String, Curve)>> {
    let mut series = Vec::new();
    let mut means = Vec::new();
    for (color, (arm, dirs)) in arms.iter().enumerate() {
        let curves: Vec<Vec<(f64, f64)>> = dirs
            .iter()
            .map(|d| read_curve(d, "eval/accuracy"))
            .filter(|c| !c.is_empty())
            .collect();
        if curves.is_empty() {
            bail!("no eval/accuracy logged for {arm} (train with --eval-every N)");
        }
        for c in &curves {
            series.push(Series {
                name: None,
                points: c.clone(),
                color,
                width: 1,
            });
        }
        let mean = mean_curve(&curves);
        series.push(Series {
            name: Some(format!("{arm} (mean of {})", curves.len())),
            points: mean.clone(),
            color,
            width: 3,
        });
        means.push((arm.clone(), mean));
    }
    let x = format!("step ({rollouts_per_step} rollouts per step)");
    draw(
        &series,
        "held-out accuracy (greedy)",
        &x,
        "eval/accuracy",
        out,
    )?;
    Ok(means)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_binomial_tables() {
        // 10 discordant pairs split 1/9: two-sided p = 2 * (1 + 10) / 1024
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // large n: symmetric and small for a lopsided split
        assert!(mcnemar_exact(100, 160) < 0.001);
        assert!((mcnemar_exact(100, 160) - mcnemar_exact(160, 100)).abs() < 1e-15);
    }

    #[test]
    fn mean_curve_keeps_common_steps() {
        let a = vec![(0.0, 0.1), (4.0, 0.3), (8.0, 0.5)];
        let b = vec![(0.0, 0.3), (4.0, 0.5)];
        assert_eq!(mean_curve(&[a, b]), vec![(0.0, 0.2), (4.0, 0.4)]);
        assert!(mean_curve(&[]).is_empty());
    }

    #[test]
    fn bootstrap_brackets_the_difference() {
        let a: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect(); // 50%
        let b: Vec<bool> = (0..200).map(|i| i % 4 != 3).collect(); // 75%
        let (lo, hi) = paired_bootstrap(&a, &b, 2000, 1);
        assert!(lo > 0.0 && lo < 25.0 && hi > 25.0, "({lo}, {hi})");
        let (lo, hi) = paired_bootstrap(&a, &a, 500, 1);
        assert_eq!((lo, hi), (0.0, 0.0));
    }
}
