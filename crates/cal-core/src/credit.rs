//! Credit assignment: outcome rewards and located error spans → a `[B, T]` matrix of
//! token advantages.
//!
//! Rollouts come in groups of `G` consecutive rows (the `G` samples of one prompt).
//! First a *group advantage* `Â_i` is computed from the outcome rewards (see
//! [`Estimator`]); then a [`CreditMode`] decides, per token, what advantage that
//! token carries. Masked (padding / prompt) positions are always exactly `0`.
//!
//! The token matrix goes into the loss as is; it is never summed back into a
//! sequence reward (that would turn span credit back into outcome credit with another
//! scalar, erasing the very signal the oracle was asked for).
//!
//! ```
//! use cal_core::credit::*;
//! // One prompt, G = 2: a correct answer and a wrong one whose error is tokens 1..3.
//! let rollouts = [
//!     RolloutCredit { reward: 1.0, correct: true, mask: vec![true; 4], span: None },
//!     RolloutCredit { reward: 0.0, correct: false, mask: vec![true; 4], span: Some(1..3) },
//! ];
//! let cfg = CreditConfig { mode: CreditMode::Span, ..CreditConfig::default() };
//! let adv = token_advantages(&rollouts, 2, &cfg).unwrap();
//! assert_eq!(adv.row(1), &[0.0, -1.0, -1.0, 0.0]);
//! assert!(adv.row(0).iter().all(|a| *a > 0.0));
//! ```

use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::str::FromStr;

/// The advantage estimator, chosen by name (`--advantage`). The first three compare
/// the outcome rewards of a group (and the credit mode then overrides the advantages
/// of an incorrect rollout's tokens, as the table in `docs/design.md` says); the last
/// two read token rewards ([`crate::advantage`]), so span credit reaches them as
/// rewards on the span tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    /// GRPO: `Â_i = (r_i − mean_g r) / (std_g r + eps)`, with the sample standard
    /// deviation (`n − 1`, as TRL's `torch.std`). Equal rewards give `Â = 0`, not NaN.
    Grpo,
    /// Dr. GRPO: `Â_i = r_i − mean_g r` (no std normalisation, no length bias).
    DrGrpo,
    /// RLOO: `Â_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_g r)`.
    Rloo,
    /// GAE(γ, λ) over token rewards and a critic's values (PPO only).
    Gae,
    /// REINFORCE++: discounted token returns, whitened over the batch (no critic).
    #[serde(rename = "reinforce++")]
    #[cfg_attr(feature = "clap", value(name = "reinforce++"))]
    ReinforcePlusPlus,
}

impl Estimator {
    pub const ALL: [Estimator; 5] = [
        Self::Grpo,
        Self::DrGrpo,
        Self::Rloo,
        Self::Gae,
        Self::ReinforcePlusPlus,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Grpo => "grpo",
            Self::DrGrpo => "dr-grpo",
            Self::Rloo => "rloo",
            Self::Gae => "gae",
            Self::ReinforcePlusPlus => "reinforce++",
        }
    }

    /// Whether it compares the rollouts of a group ([`group_advantages`]).
    pub fn is_group(&self) -> bool {
        matches!(self, Self::Grpo | Self::DrGrpo | Self::Rloo)
    }
}

/// Which tokens of a rollout carry which advantage (the table in `docs/design.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CreditMode {
    /// Baseline GRPO: `Â_i` on every completion token.
    Outcome,
    /// CAL: an incorrect rollout with a span gets `negative_reward` on span tokens and
    /// 0 elsewhere; correct rollouts and incorrect ones without a span get `Â_i`.
    Span,
    /// As `Span` but `negative_reward / |S|` on the span (a mean over the span
    /// rather than a per-token penalty, so long spans are not blamed more).
    SpanScaled,
    /// First-error (VPPO-like): `prefix_reward` before the span, `negative_reward` from
    /// the span's first token to the end of the completion.
    Prefix,
}

impl CreditMode {
    pub const ALL: [CreditMode; 4] = [Self::Outcome, Self::Span, Self::SpanScaled, Self::Prefix];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Outcome => "outcome",
            Self::Span => "span",
            Self::SpanScaled => "span-scaled",
            Self::Prefix => "prefix",
        }
    }

    /// Whether this mode uses oracle spans at all.
    pub fn uses_spans(&self) -> bool {
        !matches!(self, Self::Outcome)
    }
}

impl FromStr for CreditMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown credit mode {s:?} (expected outcome, span, span-scaled or prefix)")
            })
    }
}

impl FromStr for Estimator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|e| e.name() == s).ok_or_else(|| {
            format!("unknown advantage estimator {s:?} (expected grpo, dr-grpo, rloo, gae or reinforce++)")
        })
    }
}

/// Parameters of credit assignment: the `[credit]` section of a run configuration.
/// Defaults: `negative_reward` −1.0, `max_error_span` 64.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CreditConfig {
    pub mode: CreditMode,
    #[serde(rename = "advantage")]
    pub group: Estimator,
    /// Added to the std in [`Estimator::Grpo`].
    pub eps: f64,
    /// Advantage of the error tokens of an incorrect rollout (seed default −1.0).
    pub negative_reward: f64,
    /// Advantage of the tokens before the first error in [`CreditMode::Prefix`].
    pub prefix_reward: f64,
    /// At most this many tokens of a located span are credited (the first ones; 0 = no
    /// cap). Applied when a span is mapped to tokens ([`crate::map`]).
    pub max_error_span: usize,
    /// Discount of the token-reward estimators (`gae`, `reinforce++`).
    pub gamma: f64,
    /// GAE's λ: 0 = one-step TD errors (all from the critic), 1 = returns minus values.
    pub lambda: f64,
}

impl Default for CreditConfig {
    fn default() -> Self {
        Self {
            mode: CreditMode::Outcome,
            group: Estimator::Grpo,
            eps: 1e-4,
            negative_reward: -1.0,
            prefix_reward: 0.0,
            max_error_span: 64,
            gamma: 1.0,
            lambda: 0.95,
        }
    }
}

/// What a credit mode makes of an incorrect rollout's located span, in both of the
/// places credit is read: the token advantages that override GRPO's `Â_i`, and the
/// token rewards that a critic (GAE) or discounted returns read. Both rows are `[T]`
/// and 0 at masked columns.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanCredit {
    /// The rollout's token advantages ([`token_advantages`]).
    pub advantage: Vec<f64>,
    /// Added to the rollout's token rewards, over the outcome reward and its blame
    /// on the last token ([`crate::advantage::token_rewards`]).
    pub reward: Vec<f64>,
}

impl CreditMode {
    /// The one definition of each mode on an incorrect rollout with span `span` (its
    /// columns clipped to the mask, at least one of them unmasked); `None` for
    /// `outcome`, which reads no span. Exhaustive by design: a new mode must say what
    /// it means in both places.
    ///
    /// As token rewards, `span` and `span-scaled` are the same (the blame
    /// `negative_reward` spread evenly over the span's tokens, so a return sums to it
    /// whatever the span's length); as advantages, `span` gives each span token the
    /// whole `negative_reward` and `span-scaled` its share.
    pub fn span_credit(
        self,
        span: &Range<usize>,
        mask: &[bool],
        cfg: &CreditConfig,
    ) -> Option<SpanCredit> {
        let cols = mask.len();
        let (neg, pre) = (cfg.negative_reward, cfg.prefix_reward);
        let row = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
            (0..cols)
                .map(|t| if mask[t] { f(t) } else { 0.0 })
                .collect()
        };
        // `neg` shared evenly by the unmasked columns of `blamed`
        let spread = |blamed: Range<usize>| -> Vec<f64> {
            let n = blamed.clone().filter(|&t| mask[t]).count() as f64;
            row(&|t| if blamed.contains(&t) { neg / n } else { 0.0 })
        };
        let in_span = |t: usize| span.contains(&t);
        let span_len = span.clone().filter(|&t| mask[t]).count() as f64;
        match self {
            Self::Outcome => None,
            Self::Span => Some(SpanCredit {
                advantage: row(&|t| if in_span(t) { neg } else { 0.0 }),
                reward: spread(span.clone()),
            }),
            Self::SpanScaled => Some(SpanCredit {
                advantage: row(&|t| if in_span(t) { neg / span_len } else { 0.0 }),
                reward: spread(span.clone()),
            }),
            Self::Prefix => {
                let after = spread(span.start..cols);
                Some(SpanCredit {
                    advantage: row(&|t| if t < span.start { pre } else { neg }),
                    reward: (0..cols)
                        .map(|t| {
                            if t < span.start && mask[t] {
                                pre
                            } else {
                                after[t]
                            }
                        })
                        .collect(),
                })
            }
        }
    }
}

/// What credit assignment needs to know about one rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutCredit {
    /// Outcome reward (1.0 correct, 0.0 wrong, or any scalar).
    pub reward: f64,
    /// Whether the final answer is right; only incorrect rollouts use spans.
    pub correct: bool,
    /// Completion mask over the `T` columns: `true` for real completion tokens.
    pub mask: Vec<bool>,
    /// Located first-error span in column (completion token) indices.
    pub span: Option<Range<usize>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CreditError {
    #[error("group size must be at least 2 to compare rollouts, got {0}")]
    GroupTooSmall(usize),
    #[error("{rows} rollouts is not a multiple of the group size {group}")]
    Ragged { rows: usize, group: usize },
    #[error("rollout {row}: mask has {found} columns, expected {expected}")]
    MaskWidth {
        row: usize,
        found: usize,
        expected: usize,
    },
    #[error("rollout {row}: reward is not finite ({reward})")]
    NonFiniteReward { row: usize, reward: f64 },
    #[error("{0} does not compare the rollouts of a group; it reads token rewards")]
    NotGroup(&'static str),
}

/// Per-rollout group advantages `Â_i` for consecutive groups of `group_size`.
///
/// ```
/// use cal_core::credit::{group_advantages, Estimator};
/// let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], 4, Estimator::DrGrpo, 1e-4).unwrap();
/// assert_eq!(a, vec![0.75, -0.25, -0.25, -0.25]);
/// // All equal: no signal, and no NaN.
/// let a = group_advantages(&[0.0; 4], 4, Estimator::Grpo, 1e-4).unwrap();
/// assert_eq!(a, vec![0.0; 4]);
/// ```
pub fn group_advantages(
    rewards: &[f64],
    group_size: usize,
    kind: Estimator,
    eps: f64,
) -> Result<Vec<f64>, CreditError> {
    if !kind.is_group() {
        return Err(CreditError::NotGroup(kind.name()));
    }
    if group_size < 2 {
        return Err(CreditError::GroupTooSmall(group_size));
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(CreditError::Ragged {
            rows: rewards.len(),
            group: group_size,
        });
    }
    if let Some((row, &reward)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(CreditError::NonFiniteReward { row, reward });
    }
    let g = group_size as f64;
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let mean = group.iter().sum::<f64>() / g;
        let var = group.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g - 1.0);
        for r in group {
            out.push(match kind {
                Estimator::Grpo => (r - mean) / (var.sqrt() + eps),
                Estimator::DrGrpo => r - mean,
                Estimator::Rloo => (r - mean) * g / (g - 1.0),
                Estimator::Gae | Estimator::ReinforcePlusPlus => unreachable!("checked above"),
            });
        }
    }
    Ok(out)
}

/// A dense row-major `[rows, cols]` matrix of token advantages, plus bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvantageMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
    /// Group advantage `Â_i` of each rollout.
    pub group_advantage: Vec<f64>,
    /// Incorrect rollouts that fell back to `Â_i` because they had no usable span
    /// (only counted in span-using modes).
    pub fallbacks: usize,
    /// Incorrect rollouts whose tokens were credited from their span.
    pub span_credited: usize,
}

impl AdvantageMatrix {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// Builds the `[B, T]` token advantages for `rollouts` (B = `rollouts.len()`, grouped by
/// `group_size` consecutive rows, T = the common mask width).
///
/// A span is clipped to the mask width; a span with no unmasked token counts as
/// no span (fallback to `Â_i`).
pub fn token_advantages(
    rollouts: &[RolloutCredit],
    group_size: usize,
    cfg: &CreditConfig,
) -> Result<AdvantageMatrix, CreditError> {
    let rewards: Vec<f64> = rollouts.iter().map(|r| r.reward).collect();
    let group_advantage = group_advantages(&rewards, group_size, cfg.group, cfg.eps)?;
    let cols = rollouts.first().map_or(0, |r| r.mask.len());
    let mut data = vec![0f32; rollouts.len() * cols];
    let (mut fallbacks, mut span_credited) = (0, 0);
    for (i, r) in rollouts.iter().enumerate() {
        if r.mask.len() != cols {
            return Err(CreditError::MaskWidth {
                row: i,
                found: r.mask.len(),
                expected: cols,
            });
        }
        let row = &mut data[i * cols..(i + 1) * cols];
        let a_i = group_advantage[i];
        let span = r
            .span
            .clone()
            .map(|s| s.start.min(cols)..s.end.min(cols))
            .filter(|s| s.clone().any(|t| r.mask[t]));
        let fill = |row: &mut [f32], f: &dyn Fn(usize) -> f64| {
            for (t, v) in row.iter_mut().enumerate() {
                if r.mask[t] {
                    *v = f(t) as f32;
                }
            }
        };
        let credit = match (r.correct, span) {
            (true, _) => None,
            (false, None) => {
                fallbacks += usize::from(cfg.mode.uses_spans());
                None
            }
            (false, Some(s)) => cfg.mode.span_credit(&s, &r.mask, cfg),
        };
        match credit {
            None => fill(row, &|_| a_i),
            Some(c) => {
                span_credited += 1;
                fill(row, &|t| c.advantage[t]);
            }
        }
    }
    Ok(AdvantageMatrix {
        rows: rollouts.len(),
        cols,
        data,
        group_advantage,
        fallbacks,
        span_credited,
    })
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops mirror the [B, T] maths
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rollout(reward: f64, len: usize, width: usize, span: Option<Range<usize>>) -> RolloutCredit {
        RolloutCredit {
            reward,
            correct: reward >= 1.0,
            mask: (0..width).map(|t| t < len).collect(),
            span,
        }
    }

    #[test]
    fn grpo_matches_hand_computation() {
        // rewards [1, 0, 0, 1]: mean 0.5, sample std sqrt(1/3)
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], 4, Estimator::Grpo, 0.0).unwrap();
        let s = (1.0f64 / 3.0).sqrt();
        for (x, y) in a.iter().zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]) {
            assert!((x - y).abs() < 1e-12);
        }
        let r = group_advantages(&[1.0, 0.0, 0.0, 1.0], 4, Estimator::Rloo, 0.0).unwrap();
        // 1 - mean(0,0,1) = 2/3
        assert!((r[0] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn errors() {
        assert_eq!(
            group_advantages(&[1.0], 1, Estimator::Grpo, 1e-4),
            Err(CreditError::GroupTooSmall(1))
        );
        assert!(matches!(
            group_advantages(&[1.0, 0.0, 1.0], 2, Estimator::Grpo, 1e-4),
            Err(CreditError::Ragged { .. })
        ));
        assert!(matches!(
            group_advantages(&[f64::NAN, 0.0], 2, Estimator::Grpo, 1e-4),
            Err(CreditError::NonFiniteReward { row: 0, .. })
        ));
        let bad = [rollout(1.0, 2, 3, None), rollout(0.0, 2, 4, None)];
        assert!(matches!(
            token_advantages(&bad, 2, &CreditConfig::default()),
            Err(CreditError::MaskWidth { row: 1, .. })
        ));
    }

    #[test]
    fn prefix_and_scaled() {
        let rs = [rollout(1.0, 5, 6, None), rollout(0.0, 5, 6, Some(2..4))];
        let mut cfg = CreditConfig {
            mode: CreditMode::Prefix,
            prefix_reward: 0.1,
            ..Default::default()
        };
        let m = token_advantages(&rs, 2, &cfg).unwrap();
        assert_eq!(m.row(1), &[0.1, 0.1, -1.0, -1.0, -1.0, 0.0]);
        cfg.mode = CreditMode::SpanScaled;
        let m = token_advantages(&rs, 2, &cfg).unwrap();
        assert_eq!(m.row(1), &[0.0, 0.0, -0.5, -0.5, 0.0, 0.0]);
    }

    #[test]
    fn span_past_mask_falls_back() {
        let rs = [rollout(0.0, 3, 6, Some(4..6)), rollout(0.0, 3, 6, None)];
        let m = token_advantages(
            &rs,
            2,
            &CreditConfig {
                mode: CreditMode::Span,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(m.fallbacks, 2);
        assert!(m.data.iter().all(|v| *v == 0.0));
    }

    fn arb_batch() -> impl Strategy<Value = (Vec<RolloutCredit>, usize)> {
        (2usize..5, 1usize..4, 1usize..12).prop_flat_map(|(g, prompts, width)| {
            let row = (
                0u8..2,
                0..=width,
                proptest::option::of((0..width, 1usize..6)),
                proptest::collection::vec(any::<bool>(), width),
            );
            proptest::collection::vec(row, g * prompts).prop_map(move |rows| {
                let rs = rows
                    .into_iter()
                    .map(|(r, len, span, holes)| RolloutCredit {
                        reward: r as f64,
                        correct: r == 1,
                        // prefix masks with random holes
                        mask: (0..width)
                            .map(|t| t < len && !(holes[t] && t % 3 == 2))
                            .collect(),
                        span: span.map(|(s, l)| s..s + l),
                    })
                    .collect();
                (rs, g)
            })
        })
    }

    proptest! {
        #[test]
        fn properties((rs, g) in arb_batch(), neg in -2.0f64..-0.1) {
            for mode in CreditMode::ALL {
                let cfg = CreditConfig { mode, negative_reward: neg, ..Default::default() };
                let m = token_advantages(&rs, g, &cfg).unwrap();
                prop_assert_eq!(m.data.len(), rs.len() * m.cols);
                for (i, r) in rs.iter().enumerate() {
                    let row = m.row(i);
                    for t in 0..m.cols {
                        prop_assert!(row[t].is_finite());
                        if !r.mask[t] { prop_assert_eq!(row[t], 0.0); }
                    }
                    let a_i = m.group_advantage[i] as f32;
                    let broadcast = (0..m.cols).all(|t| row[t] == if r.mask[t] { a_i } else { 0.0 });
                    if mode == CreditMode::Outcome || r.correct {
                        prop_assert!(broadcast);
                    }
                    if mode == CreditMode::Span && !r.correct {
                        if let Some(s) = &r.span {
                            if s.clone().any(|t| t < m.cols && r.mask[t]) {
                                for t in 0..m.cols {
                                    let expect = if r.mask[t] && s.contains(&t) { neg as f32 } else { 0.0 };
                                    prop_assert_eq!(row[t], expect);
                                }
                            }
                        }
                    }
                }
                // All-wrong groups: no signal in outcome mode; signal in span/prefix when a span lands.
                for (k, group) in rs.chunks(g).enumerate() {
                    if group.iter().all(|r| !r.correct) {
                        let rows = (k * g..(k + 1) * g).flat_map(|i| m.row(i).to_vec());
                        let any_signal = rows.into_iter().any(|v| v != 0.0);
                        let has_span = group.iter().any(|r| r.span.as_ref().is_some_and(|s| s.clone().any(|t| t < m.cols && r.mask[t])));
                        match mode {
                            CreditMode::Outcome => prop_assert!(!any_signal),
                            _ => prop_assert_eq!(any_signal, has_span),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_mode_is_defined_once_for_both_uses() {
        let cfg = CreditConfig {
            negative_reward: -1.0,
            prefix_reward: 0.25,
            ..CreditConfig::default()
        };
        // 8 columns, the last two masked; span 3..5 (two tokens)
        let mask: Vec<bool> = (0..8).map(|t| t < 6).collect();
        let span = 3..5;
        for mode in CreditMode::ALL {
            let Some(c) = mode.span_credit(&span, &mask, &cfg) else {
                assert_eq!(mode, CreditMode::Outcome);
                continue;
            };
            assert!(mode.uses_spans());
            for t in 6..8 {
                assert_eq!((c.advantage[t], c.reward[t]), (0.0, 0.0), "{mode:?} masked");
            }
            // the blame sums to `negative_reward` in the rewards, prefix bonus aside
            let blame: f64 = (0..6)
                .filter(|&t| t >= span.start)
                .map(|t| c.reward[t])
                .sum();
            assert!((blame + 1.0).abs() < 1e-12, "{mode:?}: {blame}");
        }
        let get = |m: CreditMode| m.span_credit(&span, &mask, &cfg).unwrap();
        let (sp, sc, pf) = (
            get(CreditMode::Span),
            get(CreditMode::SpanScaled),
            get(CreditMode::Prefix),
        );
        assert_eq!(sp.reward, sc.reward);
        assert_eq!(sp.advantage, vec![0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0]);
        assert_eq!(sc.advantage, vec![0.0, 0.0, 0.0, -0.5, -0.5, 0.0, 0.0, 0.0]);
        assert_eq!(
            pf.advantage,
            vec![0.25, 0.25, 0.25, -1.0, -1.0, -1.0, 0.0, 0.0]
        );
        let third = -1.0 / 3.0;
        assert_eq!(
            pf.reward,
            vec![0.25, 0.25, 0.25, third, third, third, 0.0, 0.0]
        );
    }
}
