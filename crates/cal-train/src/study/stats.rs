//! Statistics across seeds: the mean CAL − GRPO difference with a t interval, and the
//! sample-efficiency ratio (the fraction of GRPO's steps that CAL needs to reach GRPO's
//! final held-out accuracy) with a bootstrap interval. Pure functions of per-seed
//! numbers and held-out curves, so they are tested without a model.

use rand::{Rng, SeedableRng};

/// Two-sided 97.5% quantiles of Student's t for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Mean and 95% t interval of `xs` (`None` with fewer than two values).
pub fn mean_ci95(xs: &[f64]) -> Option<(f64, f64, f64)> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let t = T975.get(n - 2).copied().unwrap_or(1.960);
    let half = t * sd / (n as f64).sqrt();
    Some((mean, mean - half, mean + half))
}

/// The first step at which `curve` (step, accuracy) reaches `target` (within 1e-9), or
/// `None` if it never does.
pub fn steps_to_reach(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    curve
        .iter()
        .find(|&&(_, acc)| acc + 1e-9 >= target)
        .map(|&(s, _)| s)
}

/// The sample-efficiency ratio of one seed: steps for `cal` to reach `baseline`'s final
/// held-out accuracy, over `baseline`'s steps (< 1: CAL needs fewer rollouts). `None`
/// when the baseline has no curve, or ended at or below where it started (there is
/// no gain to reach, and CAL would "reach" it at step 0); `Some(INFINITY)` when CAL
/// never reaches it.
pub fn efficiency_ratio(baseline: &[(f64, f64)], cal: &[(f64, f64)]) -> Option<f64> {
    let &(steps, target) = baseline.last()?;
    let start = baseline.first()?.1;
    if steps <= 0.0 || target <= start + 1e-9 {
        return None;
    }
    Some(steps_to_reach(cal, target).map_or(f64::INFINITY, |s| s / steps))
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Median of per-seed ratios with a percentile-bootstrap 95% interval (seeded). Seeds
/// where CAL never got there count as infinite: the median stays meaningful as long
/// as fewer than half of them are.
pub fn median_ci95(xs: &[f64], resamples: usize, seed: u64) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    let m = median(&mut v);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut meds: Vec<f64> = (0..resamples)
        .map(|_| {
            let mut s: Vec<f64> = (0..xs.len())
                .map(|_| xs[rng.random_range(0..xs.len())])
                .collect();
            median(&mut s)
        })
        .collect();
    meds.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| meds[((p * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Some((m, q(0.025), q(0.975)))
}

/// `1.23` or `never` for a ratio.
pub fn show_ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "never".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_matches_a_hand_computation() {
        // mean 2, sd 1, n 3: half-width 4.303 / sqrt(3)
        let (m, lo, hi) = mean_ci95(&[1.0, 2.0, 3.0]).unwrap();
        assert!((m - 2.0).abs() < 1e-12);
        assert!((hi - m - 4.303 / 3f64.sqrt()).abs() < 1e-9 && (m - lo - (hi - m)).abs() < 1e-12);
        assert!(mean_ci95(&[1.0]).is_none());
    }

    #[test]
    fn ratio_is_steps_to_the_baseline_final_over_its_steps() {
        let base = [(0.0, 0.2), (10.0, 0.3), (20.0, 0.4), (40.0, 0.5)];
        let cal = [(0.0, 0.2), (10.0, 0.45), (20.0, 0.5), (40.0, 0.6)];
        assert_eq!(efficiency_ratio(&base, &cal), Some(0.5));
        let slow = [(0.0, 0.2), (40.0, 0.49)];
        assert_eq!(efficiency_ratio(&base, &slow), Some(f64::INFINITY));
        assert_eq!(efficiency_ratio(&[], &cal), None);
        // a baseline that ended below its start set no target
        let fell = [(0.0, 0.3), (10.0, 0.35), (20.0, 0.25)];
        assert_eq!(efficiency_ratio(&fell, &cal), None);
    }

    #[test]
    fn bootstrap_median_brackets_and_tolerates_a_never() {
        let xs = [0.5, 0.6, 0.7, 0.8, f64::INFINITY];
        let (m, lo, hi) = median_ci95(&xs, 2000, 1).unwrap();
        assert_eq!(m, 0.7);
        assert!(lo <= m && m <= hi && lo >= 0.5);
        let same = median_ci95(&[0.4; 5], 100, 1).unwrap();
        assert_eq!(same, (0.4, 0.4, 0.4));
    }
}
