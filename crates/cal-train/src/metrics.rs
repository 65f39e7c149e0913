//! Log: the metrics of one step, assembled from what each stage returned. Names are
//! `area/name` (TensorBoard groups by the prefix) and are documented in the README.

use crate::optimize::Update;
use crate::rollout::Rollouts;
use crate::score::{Graded, SpanStats};
use cal_core::credit::AdvantageMatrix;
use std::collections::BTreeMap;

/// Everything logged for one step.
pub type Metrics = BTreeMap<String, f64>;

/// What one step's stages produced, for [`step_metrics`].
pub struct StepRecord<'a> {
    pub rollouts: &'a Rollouts,
    pub graded: &'a Graded,
    pub spans: &'a SpanStats,
    pub advantages: &'a AdvantageMatrix,
    pub update: &'a Update,
    pub lr: f64,
    /// Steps skipped so far in the run (non-finite loss).
    pub skipped_total: usize,
}

pub fn step_metrics(s: &StepRecord) -> Metrics {
    let mut m = Metrics::new();
    let mut put = |k: &str, v: f64| {
        m.insert(k.to_string(), v);
    };
    let r = &s.graded.rewards;
    let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / r.len().max(1) as f64;
    put("reward/mean", mean);
    put("reward/std", var.sqrt());
    for (name, v) in &s.graded.by_function {
        put(&format!("reward/{name}"), *v);
    }
    let correct = &s.graded.correct;
    put(
        "reward/accuracy",
        correct.iter().filter(|c| **c).count() as f64 / correct.len().max(1) as f64,
    );
    let groups: Vec<&[bool]> = correct.chunks(s.rollouts.group.max(1)).collect();
    let frac = |f: &dyn Fn(&[bool]) -> bool| {
        groups.iter().filter(|g| f(g)).count() as f64 / groups.len().max(1) as f64
    };
    put("groups/all_wrong_frac", frac(&|g| g.iter().all(|c| !c)));
    put("groups/all_right_frac", frac(&|g| g.iter().all(|c| *c)));
    let u = s.update;
    put("loss/total", u.loss);
    put("loss/kl", u.kl);
    put("loss/clip_fraction", u.clip_fraction);
    put("policy/entropy", u.entropy);
    put(
        "completion/mean_length",
        s.rollouts.completion_tokens() as f64 / s.rollouts.len().max(1) as f64,
    );
    put("optim/grad_norm", u.grad_norm);
    put("optim/lr", s.lr);
    put("optim/iterations", u.iterations as f64);
    put("optim/skipped_steps", s.skipped_total as f64);
    put("optim/skipped_now", f64::from(u8::from(u.skipped)));
    if let Some(e) = &u.engine {
        put("rollout/logprob_abs_diff", e.logprob_abs_diff);
        put("rollout/mismatch_kl", e.kl);
        put("rollout/is_weight_mean", e.is_weight);
    }
    put("credit/fallbacks", s.advantages.fallbacks as f64);
    put("credit/span_credited", s.advantages.span_credited as f64);
    let o = s.spans;
    put("oracle/calls", o.calls as f64);
    put("oracle/cache_hits", o.cache_hits as f64);
    put("oracle/failures", o.failures as f64);
    put("oracle/no_error", o.no_error as f64);
    put("oracle/latency_ms", o.latency_ms / o.calls.max(1) as f64);
    put("oracle/cost_usd", o.cost_usd);
    put("spans/located", o.located as f64);
    put("spans/not_located", o.not_located as f64);
    put("spans/capped", o.capped as f64);
    put(
        "spans/mean_tokens",
        o.span_tokens as f64 / o.located.max(1) as f64,
    );
    m
}

/// How a step's metric reads over the ranks: counts add up, a stage takes as long as
/// its slowest rank, everything else (means over equal shares) is averaged.
fn merge_rule(key: &str) -> Merge {
    const SUMS: &[&str] = &[
        "oracle/",
        "credit/",
        "spans/located",
        "spans/not_located",
        "spans/capped",
        "perf/micro_batches",
        "perf/padded_tokens",
        "perf/tokens_per_second",
        "tokens/trained",
        "dpo/pairs",
        "dpo/groups_",
    ];
    if key == "oracle/latency_ms" {
        Merge::Mean
    } else if SUMS.iter().any(|p| key.starts_with(p)) {
        Merge::Sum
    } else if key.starts_with("perf/") && key.ends_with("seconds") {
        Merge::Max
    } else {
        Merge::Mean
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Merge {
    Sum,
    Max,
    Mean,
}

/// One step's metrics from every rank's: see [`merge_rule`]. A key some ranks lack is
/// merged over the ranks that have it.
pub fn merge_metrics(parts: &[Metrics]) -> Metrics {
    let mut out = Metrics::new();
    let keys: std::collections::BTreeSet<&String> = parts.iter().flat_map(|m| m.keys()).collect();
    for k in keys {
        let vals: Vec<f64> = parts.iter().filter_map(|m| m.get(k).copied()).collect();
        let v = match merge_rule(k) {
            Merge::Sum => vals.iter().sum(),
            Merge::Max => vals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Merge::Mean => vals.iter().sum::<f64>() / vals.len() as f64,
        };
        out.insert(k.clone(), v);
    }
    // online DPO's per-pair means (`rewards/*`, `logps/*`): weighted by each rank's pairs
    let weighted = |k: &str| k.starts_with("rewards/") || k.starts_with("logps/");
    for (k, v) in out.iter_mut().filter(|(k, _)| weighted(k)) {
        let (sum, n) = parts
            .iter()
            .filter_map(|m| Some((m.get(k)?, m.get("dpo/pairs")?)))
            .fold((0.0, 0.0), |(s, n), (x, w)| (s + x * w, n + w));
        if n > 0.0 {
            *v = sum / n;
        }
    }
    // the spread of the rewards over the whole step (equal shares): the mean over the
    // ranks of each one's second moment, less the square of the whole mean
    let all = |k: &str| {
        parts
            .iter()
            .map(|m| m.get(k).copied())
            .collect::<Option<Vec<f64>>>()
    };
    if let (Some(mean), Some(std)) = (all("reward/mean"), all("reward/std")) {
        let n = parts.len() as f64;
        let m2 = mean
            .iter()
            .zip(&std)
            .map(|(m, s)| s * s + m * m)
            .sum::<f64>()
            / n;
        let mu = mean.iter().sum::<f64>() / n;
        out.insert("reward/std".into(), (m2 - mu * mu).max(0.0).sqrt());
    }
    out
}

/// The step's metrics over all ranks, on rank 0 (the others keep their own: they log
/// nothing).
pub fn reduce_metrics(
    c: &dyn crate::collective::Collective,
    m: Metrics,
) -> anyhow::Result<Metrics> {
    if c.world() == 1 {
        return Ok(m);
    }
    let parts = c.gather_bytes(&serde_json::to_vec(&m)?)?;
    if !c.is_main() {
        return Ok(m);
    }
    let parts: Vec<Metrics> = parts
        .iter()
        .map(|b| serde_json::from_slice(b))
        .collect::<std::result::Result<_, _>>()?;
    Ok(merge_metrics(&parts))
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    #[test]
    fn metrics_merge_by_kind() {
        let m = |pairs: &[(&str, f64)]| -> Metrics {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let a = m(&[
            ("reward/accuracy", 0.5),
            ("oracle/calls", 3.0),
            ("perf/step_seconds", 2.0),
            ("oracle/latency_ms", 10.0),
        ]);
        let b = m(&[
            ("reward/accuracy", 0.25),
            ("oracle/calls", 4.0),
            ("perf/step_seconds", 3.0),
            ("oracle/latency_ms", 30.0),
            ("x", 1.0),
        ]);
        let got = merge_metrics(&[a, b]);
        assert_eq!(got["reward/accuracy"], 0.375);
        assert_eq!(got["oracle/calls"], 7.0);
        assert_eq!(got["perf/step_seconds"], 3.0);
        assert_eq!(got["oracle/latency_ms"], 20.0);
        assert_eq!(got["x"], 1.0);
        // rewards {0, 1} on one rank and {1, 1} on the other: the whole step's std of
        // {0, 1, 1, 1} is sqrt(3)/4
        let a = m(&[("reward/mean", 0.5), ("reward/std", 0.5)]);
        let b = m(&[("reward/mean", 1.0), ("reward/std", 0.0)]);
        let got = merge_metrics(&[a, b]);
        assert!((got["reward/std"] - 3f64.sqrt() / 4.0).abs() < 1e-12);
        // online DPO: 3 pairs with margin 1 on one rank, 1 pair with margin 5 on the
        // other: the step's mean margin is 2, its pair count 4
        let a = m(&[("dpo/pairs", 3.0), ("rewards/margins", 1.0)]);
        let b = m(&[("dpo/pairs", 1.0), ("rewards/margins", 5.0)]);
        let c = m(&[("dpo/pairs", 0.0), ("dpo/groups_all_wrong", 2.0)]);
        let got = merge_metrics(&[a, b, c]);
        assert_eq!(got["rewards/margins"], 2.0);
        assert_eq!(got["dpo/pairs"], 4.0);
        assert_eq!(got["dpo/groups_all_wrong"], 2.0);
    }
}
