//! The noise map: CAL − GRPO on held-out answers against how well the oracle locates
//! first errors, one point per experiment folder. The x value is the exact-match rate
//! of the folder's own oracle (noise included) on a labeled bench, measured by the
//! caller (`cal-grpo summarize --bench-labels`), so the map never takes a number typed
//! in by hand; the y value is CAL − baseline over the folder's seeds with its 95% t
//! interval, from [`crate::study::summarize`].

use crate::study::stats::mean_ci95;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// One experiment folder on the map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapPoint {
    pub dir: PathBuf,
    /// The oracle as configured: provider, and its noise if any.
    pub oracle: String,
    /// On the bench: share of the responses with an error whose labeled first error the
    /// oracle returned, and share it located at all (fractions).
    pub exact_match: f64,
    pub located: f64,
    /// In training: share of CAL's wrong rollouts the oracle located, per seed.
    pub located_in_training: Vec<f64>,
    /// CAL − baseline on held-out answers, in points, per seed.
    pub cal_minus_baseline: Vec<f64>,
}

impl MapPoint {
    /// Mean and 95% t interval of CAL − baseline (the mean alone for one seed).
    pub fn gain(&self) -> (f64, Option<(f64, f64)>) {
        match mean_ci95(&self.cal_minus_baseline) {
            Some((m, lo, hi)) => (m, Some((lo, hi))),
            None => (
                self.cal_minus_baseline.first().copied().unwrap_or(0.0),
                None,
            ),
        }
    }
}

/// The map as a Markdown table, best oracle first.
pub fn table(points: &[MapPoint]) -> String {
    let mut rows: Vec<&MapPoint> = points.iter().collect();
    rows.sort_by(|a, b| b.exact_match.total_cmp(&a.exact_match));
    let mut s = String::from(
        "| oracle | bench exact match | bench located | located in training | seeds | CAL − baseline (95% t CI) | experiment |\n|---|---|---|---|---|---|---|\n",
    );
    for p in rows {
        let gain = match p.gain() {
            (m, Some((lo, hi))) => format!("{m:+.1} [{lo:+.1}, {hi:+.1}]"),
            (m, None) => format!("{m:+.1}"),
        };
        let trained = if p.located_in_training.is_empty() {
            "–".into()
        } else {
            let m = p.located_in_training.iter().sum::<f64>() / p.located_in_training.len() as f64;
            format!("{:.1}%", 100.0 * m)
        };
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1}% | {trained} | {} | {gain} | {} |\n",
            p.oracle,
            100.0 * p.exact_match,
            100.0 * p.located,
            p.cal_minus_baseline.len(),
            p.dir.display()
        ));
    }
    s.push_str(
        "\nCAL − baseline: held-out answers, in points, mean over seeds with a 95% t interval. Bench: the oracle, noise included, on the labels given.\n",
    );
    s
}

/// Draws the map: one point per folder at (bench exact match, CAL − baseline) with its
/// interval as an error bar, each labelled with its oracle, and the zero line.
pub fn plot(points: &[MapPoint], out: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::study::compare::register_sans_serif()?;
    let bars: Vec<(f64, f64, f64, f64)> = points
        .iter()
        .map(|p| {
            let (m, ci) = p.gain();
            let (lo, hi) = ci.unwrap_or((m, m));
            (100.0 * p.exact_match, m, lo, hi)
        })
        .collect();
    let lo = bars.iter().map(|b| b.2).fold(-1.0, f64::min) - 1.0;
    let hi = bars.iter().map(|b| b.3).fold(1.0, f64::max) + 1.0;
    let root = BitMapBackend::new(out, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "CAL − GRPO against the oracle's exact match",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..100.0, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("oracle's exact match of the first error on the bench (%)")
        .y_desc("CAL − GRPO, held-out answers (points, 95% CI)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(0.0, 0.0), (100.0, 0.0)],
        BLACK.mix(0.5).stroke_width(1),
    ))?;
    // error bars as paths: a vertical line and two caps of ±0.6 exact-match points
    chart.draw_series(bars.iter().flat_map(|&(x, _, lo, hi)| {
        [
            vec![(x, lo), (x, hi)],
            vec![(x - 0.6, lo), (x + 0.6, lo)],
            vec![(x - 0.6, hi), (x + 0.6, hi)],
        ]
        .map(|p| PathElement::new(p, BLUE.stroke_width(2)))
    }))?;
    chart.draw_series(
        bars.iter()
            .map(|&(x, m, _, _)| Circle::new((x, m), 4, BLUE.filled())),
    )?;
    chart.draw_series(points.iter().zip(&bars).map(|(p, &(x, m, _, _))| {
        Text::new(
            p.oracle.clone(),
            (x + 1.2, m),
            ("sans-serif", 14).into_font(),
        )
    }))?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(oracle: &str, em: f64, gains: &[f64]) -> MapPoint {
        MapPoint {
            dir: format!("runs/{oracle}").into(),
            oracle: oracle.into(),
            exact_match: em,
            located: em + 0.03,
            located_in_training: vec![0.9, 0.92],
            cal_minus_baseline: gains.to_vec(),
        }
    }

    #[test]
    fn rows_go_best_oracle_first_with_intervals() {
        let t = table(&[
            point("reference, shift=0.5", 0.47, &[1.0, 2.0, 3.0]),
            point("reference", 0.93, &[4.0]),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[2].starts_with("| reference | 93.0% | 96.0% | 91.0% | 1 | +4.0 |"),
            "{t}"
        );
        // mean 2, sd 1, t(2) = 4.303: half-width 2.484
        assert!(
            lines[3].contains("| 47.0% | 50.0% | 91.0% | 3 | +2.0 [-0.5, +4.5] |"),
            "{t}"
        );
    }

    #[test]
    fn the_plot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("map.png");
        if crate::study::compare::font_bytes().is_none() {
            eprintln!("no font on this machine: plot not drawn");
            return;
        }
        plot(
            &[
                point("reference", 0.93, &[2.0, 4.0, 5.0]),
                point("reference, miss=0.5", 0.45, &[-1.0, 0.5, 1.0]),
            ],
            &out,
        )
        .unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
