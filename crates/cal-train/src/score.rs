//! Score: grade (and reward) → locate → map → credit. Everything between the samples and the loss,
//! as pure functions of the rollouts (the oracle call itself runs in
//! [`crate::trainer::Trainer`], concurrently with the reference pass).

use crate::rollout::Rollouts;
use anyhow::Result;
use cal_core::advantage::TokenMatrix;
use cal_core::credit::{token_advantages, AdvantageMatrix, CreditConfig, RolloutCredit};
use cal_core::grade::grade as grade_answer;
use cal_core::map::map_span;
use cal_core::reward::{Completion, RewardFns};
use cal_oracle::{OracleRequest, SpanOutcome};
use std::ops::Range;

/// Outcome of each rollout.
pub struct Graded {
    /// Whether the final answer is right: what the oracle is asked about.
    pub correct: Vec<bool>,
    /// The weighted sum of the reward functions (correctness alone by default).
    pub rewards: Vec<f64>,
    /// Each reward function's name and its mean score over the step.
    pub by_function: Vec<(&'static str, f64)>,
}

impl Graded {
    /// Rows whose final answer is wrong: the ones the oracle is asked about.
    pub fn wrong(&self) -> Vec<usize> {
        (0..self.correct.len())
            .filter(|&i| !self.correct[i])
            .collect()
    }
}

/// Grade: compares each completion's final answer with its problem's, and scores it
/// with the reward functions.
pub fn grade(r: &Rollouts, fns: &RewardFns) -> Graded {
    let correct: Vec<bool> = (0..r.len())
        .map(|i| grade_answer(&r.gens[i].text, &r.example(i).final_answer).correct)
        .collect();
    let mut sums = vec![0.0; fns.fns.len()];
    let rewards = (0..r.len())
        .map(|i| {
            let c = Completion {
                text: &r.gens[i].text,
                tokens: r.gens[i].ids.len(),
                gold: &r.example(i).final_answer,
            };
            let scores = fns.scores(&c);
            for (s, x) in sums.iter_mut().zip(&scores) {
                *s += x;
            }
            scores.iter().zip(&fns.fns).map(|(x, (_, w))| w * x).sum()
        })
        .collect();
    let n = r.len().max(1) as f64;
    let by_function = fns
        .fns
        .iter()
        .zip(sums)
        .map(|((f, _), s)| (f.name(), s / n))
        .collect();
    Graded {
        correct,
        rewards,
        by_function,
    }
}

/// Locate: one oracle request per row in `rows`.
pub fn oracle_requests(r: &Rollouts, rows: &[usize]) -> Vec<OracleRequest> {
    rows.iter()
        .map(|&i| OracleRequest {
            question: r.example(i).question.clone(),
            reference: r.example(i).answer.clone(),
            response: r.gens[i].text.clone(),
        })
        .collect()
}

/// Counters of the locate and map stages of one step.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SpanStats {
    pub calls: usize,
    pub cache_hits: usize,
    pub failures: usize,
    pub no_error: usize,
    /// The oracle's segment was found in the response and covers at least one token.
    pub located: usize,
    /// The segment was not found, or covers no token.
    pub not_located: usize,
    pub capped: usize,
    pub span_tokens: usize,
    pub latency_ms: f64,
    pub cost_usd: f64,
}

/// Token spans of the first errors, by row (`None`: correct, or no usable span).
pub struct Spans {
    pub spans: Vec<Option<Range<usize>>>,
    pub stats: SpanStats,
}

/// Map: each located segment (a byte range of the response) → the completion tokens
/// it covers, capped at `max_error_span` tokens. `outcomes[k]` answers row `rows[k]`.
pub fn map_spans(
    r: &Rollouts,
    rows: &[usize],
    outcomes: &[SpanOutcome],
    max_error_span: usize,
) -> Spans {
    let mut spans = vec![None; r.len()];
    let mut s = SpanStats::default();
    for (&i, outcome) in rows.iter().zip(outcomes) {
        s.calls += 1;
        if let Some(u) = outcome.usage() {
            s.cache_hits += usize::from(u.cached);
            s.latency_ms += u.latency.as_secs_f64() * 1e3;
            s.cost_usd += u.cost_usd;
        }
        match outcome {
            SpanOutcome::Located { .. } => {}
            SpanOutcome::NoError { .. } => s.no_error += 1,
            SpanOutcome::NotLocated { .. } => s.not_located += 1,
            SpanOutcome::Failed { failure } => {
                s.failures += 1;
                tracing::warn!("oracle failed ({}): {failure}", failure.kind());
            }
        }
        let Some(bytes) = outcome.range() else {
            continue;
        };
        match map_span(&r.gens[i].offsets, bytes, max_error_span) {
            Some(ts) => {
                s.located += 1;
                s.capped += usize::from(ts.capped);
                s.span_tokens += ts.len();
                spans[i] = Some(ts.range());
            }
            None => s.not_located += 1,
        }
    }
    Spans { spans, stats: s }
}

/// What credit assignment needs of each row, `T` the longest completion of the step
/// (completions are right-padded, as in the loss batches).
pub fn rollout_credits(r: &Rollouts, graded: &Graded, spans: &Spans) -> Vec<RolloutCredit> {
    let width = r.gens.iter().map(|g| g.ids.len()).max().unwrap_or(0).max(1);
    (0..r.len())
        .map(|i| {
            let n = r.gens[i].ids.len();
            RolloutCredit {
                reward: graded.rewards[i],
                correct: graded.correct[i],
                mask: (0..width).map(|t| t < n).collect(),
                span: spans.spans[i].clone(),
            }
        })
        .collect()
}

/// Credit: outcome rewards and spans → the `[B, T]` token advantages of a group
/// estimator (grpo, dr-grpo, rloo), the credit mode overriding span rows.
pub fn credit(
    r: &Rollouts,
    graded: &Graded,
    spans: &Spans,
    cfg: &CreditConfig,
) -> Result<AdvantageMatrix> {
    let rollouts = rollout_credits(r, graded, spans);
    Ok(token_advantages(&rollouts, r.group, cfg)?)
}

/// Token rewards `[B, T]` (the outcome reward on each last token, the credit mode's
/// span rewards on incorrect rollouts: [`cal_core::advantage::token_rewards`]), the
/// row-major completion mask, and how many incorrect rollouts were shaped from a span
/// and how many fell back to the outcome alone (span modes only).
pub fn token_rewards(
    r: &Rollouts,
    graded: &Graded,
    spans: &Spans,
    cfg: &CreditConfig,
) -> (TokenMatrix, Vec<bool>, usize, usize) {
    let rollouts = rollout_credits(r, graded, spans);
    let (rewards, shaped) = cal_core::advantage::token_rewards(&rollouts, cfg);
    let wrong = rollouts.iter().filter(|x| !x.correct).count();
    let fallbacks = if cfg.mode.uses_spans() {
        wrong - shaped
    } else {
        0
    };
    let mask = rollouts
        .iter()
        .flat_map(|x| x.mask.iter().copied())
        .collect();
    (rewards, mask, shaped, fallbacks)
}
