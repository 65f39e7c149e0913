//! Online DPO on the algorithm seam (`train --algorithm dpo`): each group's right and
//! wrong rollouts make up to min(right, wrong) pairs (the i-th right answer against the
//! i-th wrong one), and the loss is the preference loss of `[dpo]` on their summed
//! log-probs against the reference's. A group with no right or no wrong answer makes
//! no pair; both kinds are counted.
//!
//! With CAL (`--use-cal`), the rejected sum covers the oracle's located span and the
//! chosen sum the whole answer: rollouts of one prompt share no prefix to cancel, so
//! the span is what points the preference at the first error. Without a span (the
//! oracle found none) the pair is credited in full.
//!
//! No advantages: the matrix is zero and the loss is replaced, not added to.

use super::{Algorithm, Scored};
use crate::config::RunConfig;
use crate::loss::LossOutput;
use crate::metrics::Metrics;
use crate::optimize::{Loss, LossInputs, MicroBatch};
use crate::policy::Policy;
use crate::preference::{preference_loss, reward_metrics, PairLogps, PrefLoss};
use anyhow::{bail, Result};
use cal_core::credit::AdvantageMatrix;
use candle_core::{DType, Tensor};
use std::ops::Range;

/// A pair of the step: rows and the completion positions each sum covers.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPair {
    pub chosen: usize,
    pub rejected: usize,
    pub chosen_span: Range<usize>,
    pub rejected_span: Range<usize>,
}

/// The pairs of one step's groups of `g` rows: within each group, right answers
/// against wrong ones in row order, `min(right, wrong)` of them; `spans[i]`, when given,
/// narrows wrong row `i`'s sum. Also the groups with no right and with no wrong
/// answer. Pure.
pub fn pair_rows(
    correct: &[bool],
    lens: &[usize],
    g: usize,
    spans: &[Option<Range<usize>>],
) -> (Vec<RowPair>, usize, usize) {
    let (mut pairs, mut all_wrong, mut all_right) = (Vec::new(), 0, 0);
    for start in (0..correct.len()).step_by(g.max(1)) {
        let rows = start..(start + g).min(correct.len());
        let right: Vec<usize> = rows.clone().filter(|&i| correct[i]).collect();
        let wrong: Vec<usize> = rows.filter(|&i| !correct[i]).collect();
        all_wrong += usize::from(right.is_empty());
        all_right += usize::from(wrong.is_empty());
        for (&c, &r) in right.iter().zip(&wrong) {
            let rejected_span = spans
                .get(r)
                .cloned()
                .flatten()
                .filter(|s| !s.is_empty())
                .unwrap_or(0..lens[r]);
            pairs.push(RowPair {
                chosen: c,
                rejected: r,
                chosen_span: 0..lens[c],
                rejected_span,
            });
        }
    }
    (pairs, all_wrong, all_right)
}

pub struct Dpo {
    loss: PrefLoss,
    beta: f64,
    /// The current step's pairs (this rank's share).
    pairs: Vec<RowPair>,
    /// The step's pairs and their chosen tokens over all ranks: the loss's means.
    totals: [f64; 2],
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    all_wrong: usize,
    all_right: usize,
    chosen: Vec<f64>,
    rejected: Vec<f64>,
}

impl Dpo {
    pub fn new(cfg: &RunConfig) -> Self {
        Self {
            loss: cfg.dpo.loss,
            beta: cfg.dpo.beta,
            pairs: Vec::new(),
            totals: [0.0; 2],
            stats: Stats::default(),
        }
    }
}

impl Loss for Dpo {
    /// Both rows of a pair are in one group, and a group in one micro-batch.
    fn whole_groups(&self) -> bool {
        true
    }

    fn loss(&mut self, i: &LossInputs) -> Result<LossOutput> {
        let m = i.micro;
        let local = |row: usize| m.rows.iter().position(|&r| r == row);
        let here: Vec<(&RowPair, usize, usize)> = self
            .pairs
            .iter()
            .filter_map(|p| Some((p, local(p.chosen)?, local(p.rejected)?)))
            .collect();
        let zero = (i.logp.sum_all()? * 0.0)?; // keeps the graph; no pair, no gradient
        if here.is_empty() {
            return Ok(LossOutput {
                loss: zero,
                kl: 0.0,
                clip_fraction: 0.0,
            });
        }
        let (b, tc) = i.logp.dims2()?;
        // one mask row per pair side, over the micro-batch's rows: [2P, b·Tc] is
        // wasteful, so sums are taken row by row from the flat log-probs
        let mut mask = vec![0f32; 2 * here.len() * tc];
        let mut rows = Vec::with_capacity(2 * here.len());
        for (k, (p, lc, lr)) in here.iter().enumerate() {
            for (side, (row, span)) in [(*lc, &p.chosen_span), (*lr, &p.rejected_span)]
                .into_iter()
                .enumerate()
            {
                rows.push(row as u32);
                for t in span.clone().filter(|&t| t < tc) {
                    mask[(2 * k + side) * tc + t] = 1.0;
                }
            }
        }
        let dev = i.logp.device();
        let idx = Tensor::new(rows, dev)?;
        let mask = Tensor::from_vec(mask, (2 * here.len(), tc), dev)?.to_dtype(i.logp.dtype())?;
        let _ = b;
        let sums = |lp: &Tensor| -> Result<Tensor> {
            Ok((lp.index_select(&idx, 0)? * &mask)?
                .sum(1)?
                .to_dtype(DType::F64)?)
        };
        let even: Vec<u32> = (0..here.len() as u32).map(|k| 2 * k).collect();
        let even = Tensor::new(even, dev)?;
        let odd = (&even + 1.0)?;
        let split = |t: &Tensor| -> Result<(Tensor, Tensor)> {
            Ok((t.index_select(&even, 0)?, t.index_select(&odd, 0)?))
        };
        let (c, r) = split(&sums(i.logp)?)?;
        let refs = match (self.loss.uses_reference(), i.ref_logp) {
            (false, _) => None,
            (true, Some(ref_lp)) => Some(split(&sums(&ref_lp.detach())?)?),
            (true, None) => bail!("online DPO needs the reference's log-probs"),
        };
        let counts = mask
            .sum(1)?
            .to_dtype(DType::F64)?
            .clamp(1.0, f64::INFINITY)?;
        let (nc, nr) = split(&counts)?;
        let [pairs_total, chosen_tokens] = self.totals;
        let out = preference_loss(
            self.loss,
            self.beta,
            &PairLogps {
                chosen: &c,
                rejected: &r,
                ref_chosen: refs.as_ref().map(|x| &x.0),
                ref_rejected: refs.as_ref().map(|x| &x.1),
                chosen_tokens: &nc,
                rejected_tokens: &nr,
            },
            pairs_total,
            chosen_tokens,
        )?;
        if i.iteration == 0 {
            self.stats.chosen.extend(&out.chosen_rewards);
            self.stats.rejected.extend(&out.rejected_rewards);
        }
        // the update weighs each micro-batch's loss by its share of the batch; this
        // loss is already its share (divided by the step's pair count), so it is
        // divided back
        let loss = (out.loss.to_dtype(i.logp.dtype())? / m.weight.max(f64::MIN_POSITIVE))?;
        Ok(LossOutput {
            loss,
            kl: 0.0,
            clip_fraction: 0.0,
        })
    }
}

impl Algorithm for Dpo {
    fn advantages(
        &mut self,
        s: &Scored,
        _policy: &Policy,
        _micro: &mut [MicroBatch],
        _cfg: &RunConfig,
    ) -> Result<AdvantageMatrix> {
        let r = s.rollouts;
        let lens: Vec<usize> = r.gens.iter().map(|g| g.ids.len()).collect();
        let (pairs, all_wrong, all_right) =
            pair_rows(&s.graded.correct, &lens, r.group, &s.spans.spans);
        self.pairs = pairs;
        // on several ranks each holds some of the step's groups: the loss averages
        // over all of their pairs
        self.totals = [
            self.pairs.len() as f64,
            self.pairs.iter().map(|p| p.chosen_span.len() as f64).sum(),
        ];
        if s.collective.world() > 1 {
            s.collective.all_reduce_sum_f64(&mut self.totals)?;
        }
        self.stats = Stats {
            all_wrong,
            all_right,
            ..Stats::default()
        };
        let cols = lens.iter().copied().max().unwrap_or(0);
        Ok(AdvantageMatrix {
            rows: r.len(),
            cols,
            data: vec![0.0; r.len() * cols],
            group_advantage: vec![0.0; r.len()],
            fallbacks: 0,
            span_credited: self
                .pairs
                .iter()
                .filter(|p| p.rejected_span.len() < lens[p.rejected])
                .count(),
        })
    }

    fn metrics(&mut self) -> Metrics {
        let mut m = Metrics::from([
            ("dpo/pairs".to_string(), self.pairs.len() as f64),
            (
                "dpo/groups_all_wrong".to_string(),
                self.stats.all_wrong as f64,
            ),
            (
                "dpo/groups_all_right".to_string(),
                self.stats.all_right as f64,
            ),
        ]);
        if !self.pairs.is_empty() {
            for (k, v) in reward_metrics(&self.stats.chosen, &self.stats.rejected) {
                m.insert(k.to_string(), v);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_groups_right_and_wrong_answers_pair_up() {
        // two groups of 4: [right, wrong, wrong, right] and all wrong
        let correct = [true, false, false, true, false, false, false, false];
        let lens = [5, 6, 7, 8, 5, 5, 5, 5];
        let spans = vec![None, Some(2..4), None, None, None, None, None, None];
        let (pairs, all_wrong, all_right) = pair_rows(&correct, &lens, 4, &spans);
        assert_eq!((all_wrong, all_right), (1, 0));
        assert_eq!(
            pairs,
            vec![
                RowPair {
                    chosen: 0,
                    rejected: 1,
                    chosen_span: 0..5,
                    rejected_span: 2..4
                },
                RowPair {
                    chosen: 3,
                    rejected: 2,
                    chosen_span: 0..8,
                    rejected_span: 0..7
                },
            ]
        );
        let (pairs, all_wrong, all_right) = pair_rows(&[true, true], &[3, 3], 2, &[]);
        assert_eq!((pairs.len(), all_wrong, all_right), (0, 0, 1));
    }
}
