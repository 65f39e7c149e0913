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
