//! Token rewards and the estimators that read them: pure functions from a `[B, T]`
//! matrix of rewards (and, for GAE, a critic's values) to `[B, T]` advantages, chosen
//! by name as in verl's `core_algos.py`.
//!
//! Token rewards are the common currency out of scoring: the outcome reward sits on a
//! completion's last token, and a credit mode shapes CAL's span into rewards on the
//! span's tokens ([`token_rewards`]). So the oracle's span reaches a critic (GAE) or
//! discounted returns (REINFORCE++) as reward where the error was, not only as an
//! override of group advantages.
//!
//! ```
//! use cal_core::advantage::*;
//! // one rollout of 3 tokens, reward 1 at the end, a critic that says 0.5 everywhere
//! let r = TokenMatrix::from_rows(&[vec![0.0, 0.0, 1.0]]);
//! let v = TokenMatrix::from_rows(&[vec![0.5, 0.5, 0.5]]);
//! let mask = vec![true; 3];
//! let (adv, ret) = gae(&r, &v, &mask, 1.0, 1.0);
//! // λ = γ = 1: the advantage is the return minus the value
//! assert_eq!(ret.data, vec![1.0, 1.0, 1.0]);
//! assert_eq!(adv.data, vec![0.5, 0.5, 0.5]);
//! ```

use crate::credit::{CreditConfig, RolloutCredit};

/// A dense row-major `[rows, cols]` matrix of per-token values.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl TokenMatrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// From equal-length rows (a test or a fixture).
    pub fn from_rows(rows: &[Vec<f64>]) -> Self {
        let cols = rows.first().map_or(0, Vec::len);
        assert!(rows.iter().all(|r| r.len() == cols), "ragged rows");
        Self {
            rows: rows.len(),
            cols,
            data: rows.concat(),
        }
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// Token rewards of `rollouts` (T = the common mask width): the outcome reward on each
/// completion's last real token; on each incorrect rollout its blame,
/// `negative_reward`, on the last token too; and with CAL (a span-using mode, a
/// located span) a second `negative_reward` spread evenly over the span's tokens
/// (`span`, `span-scaled`) or over the span and everything after it (`prefix`, which
/// also puts `prefix_reward` on each token before the span). Masked positions are 0.
/// Also returns how many incorrect rollouts were shaped from a span.
///
/// CAL adds a located blame and takes nothing away: no token gets a better return
/// than it would from the outcome alone. Two designs that moved the outcome's blame
/// onto the span instead collapsed PPO on the embedded benchmark (docs/algorithms.md):
/// the tokens after the error, the wrong final answer among them, then returned 0,
/// above a critic's expectation, and were reinforced.
pub fn token_rewards(rollouts: &[RolloutCredit], cfg: &CreditConfig) -> (TokenMatrix, usize) {
    let cols = rollouts.first().map_or(0, |r| r.mask.len());
    let mut out = TokenMatrix::zeros(rollouts.len(), cols);
    let mut shaped = 0;
    for (i, r) in rollouts.iter().enumerate() {
        let row = out.row_mut(i);
        let Some(last) = (0..cols).rev().find(|&t| r.mask[t]) else {
            continue;
        };
        row[last] += r.reward;
        if r.correct {
            continue;
        }
        let neg = cfg.negative_reward;
        row[last] += neg;
        let span = r
            .span
            .clone()
            .map(|s| s.start.min(cols)..s.end.min(cols))
            .filter(|s| s.clone().any(|t| r.mask[t]));
        let Some(c) = span.and_then(|s| cfg.mode.span_credit(&s, &r.mask, cfg)) else {
            continue;
        };
        shaped += 1;
        for (v, add) in row.iter_mut().zip(&c.reward) {
            if *add != 0.0 {
                *v += add;
            }
        }
    }
    (out, shaped)
}

/// Generalised advantage estimation (Schulman et al. 2016), as verl's
/// `compute_gae_advantage_return`: backwards over each row,
/// `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = δ_t + γλ·A_{t+1}`, the value after the last
/// token 0 (the episode ends there), masked positions skipped (they neither add a
/// step nor break the chain). Returns `(advantages, returns = A + V)`, both 0 where
/// masked; not whitened ([`masked_whiten`] does that).
pub fn gae(
    rewards: &TokenMatrix,
    values: &TokenMatrix,
    mask: &[bool],
    gamma: f64,
    lambda: f64,
) -> (TokenMatrix, TokenMatrix) {
    let (b, t_len) = (rewards.rows, rewards.cols);
    assert_eq!((values.rows, values.cols), (b, t_len), "values shape");
    assert_eq!(mask.len(), b * t_len, "mask shape");
    let mut adv = TokenMatrix::zeros(b, t_len);
    let mut ret = TokenMatrix::zeros(b, t_len);
    for i in 0..b {
        let (r, v, m) = (
            rewards.row(i),
            values.row(i),
            &mask[i * t_len..(i + 1) * t_len],
        );
        let (mut next_value, mut last) = (0.0, 0.0);
        for t in (0..t_len).rev() {
            if !m[t] {
                continue;
            }
            let delta = r[t] + gamma * next_value - v[t];
            last = delta + gamma * lambda * last;
            next_value = v[t];
            adv.row_mut(i)[t] = last;
            ret.row_mut(i)[t] = last + v[t];
        }
    }
    (adv, ret)
}

/// Discounted returns `G_t = r_t + γ·G_{t+1}` of each row over its masked tokens (0
/// where masked; a masked token inside a row is skipped, where verl's loop would
/// restart the return: the same on right-padded rows, the only masks completions have).
pub fn discounted_returns(rewards: &TokenMatrix, mask: &[bool], gamma: f64) -> TokenMatrix {
    let mut out = TokenMatrix::zeros(rewards.rows, rewards.cols);
    for i in 0..rewards.rows {
        let mut g = 0.0;
        for t in (0..rewards.cols).rev() {
            if mask[i * rewards.cols + t] {
                g = rewards.row(i)[t] + gamma * g;
                out.row_mut(i)[t] = g;
            }
        }
    }
    out
}

/// The mean of `x` over its masked entries (0 with none).
pub fn masked_mean(x: &TokenMatrix, mask: &[bool]) -> f64 {
    let (sum, n) = x
        .data
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .fold((0.0, 0usize), |(s, n), (v, _)| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// `(x − mean) / sqrt(var + 1e-8)` over the masked entries (the unbiased variance, as
/// verl's `masked_whiten`); 0 where masked. Fewer than two entries: only centred.
pub fn masked_whiten(x: &TokenMatrix, mask: &[bool]) -> TokenMatrix {
    let none: Result<TokenMatrix, std::convert::Infallible> =
        masked_whiten_over(x, mask, |_| Ok(()));
    none.unwrap_or_else(|e| match e {})
}

/// [`masked_whiten`] over a batch split across processes: `sum` replaces its argument
/// by the element-wise sum over all of them (the count and sum, then the squared
/// deviations), so every part is whitened with the whole batch's mean and variance.
/// With a `sum` that does nothing it is [`masked_whiten`], to the bit.
pub fn masked_whiten_over<E>(
    x: &TokenMatrix,
    mask: &[bool],
    mut sum: impl FnMut(&mut [f64]) -> Result<(), E>,
) -> Result<TokenMatrix, E> {
    let vals = || x.data.iter().zip(mask).filter(|(_, &m)| m).map(|(v, _)| *v);
    let (s, n) = vals().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    let mut first = [s, n as f64];
    sum(&mut first)?;
    let n = first[1];
    let mean = first[0] / n.max(1.0);
    let mut sq = [vals().map(|v| (v - mean).powi(2)).sum::<f64>()];
    sum(&mut sq)?;
    let scale = if n > 1.0 {
        1.0 / (sq[0] / (n - 1.0) + 1e-8).sqrt()
    } else {
        1.0
    };
    Ok(TokenMatrix {
        rows: x.rows,
        cols: x.cols,
        data: x
            .data
            .iter()
            .zip(mask)
            .map(|(v, &m)| if m { (v - mean) * scale } else { 0.0 })
            .collect(),
    })
}

/// REINFORCE++ (Hu 2025; verl's `compute_reinforce_plus_plus_outcome_advantage`):
/// discounted token returns whitened over the whole batch.
pub fn reinforce_plus_plus(rewards: &TokenMatrix, mask: &[bool], gamma: f64) -> TokenMatrix {
    masked_whiten(&discounted_returns(rewards, mask, gamma), mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::CreditMode;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn gae_by_hand() {
        // r = [0, 0, 1], V = [0.2, 0.4, 0.6], γ = 0.9, λ = 0.8
        // δ2 = 1 − 0.6 = 0.4; δ1 = 0.9·0.6 − 0.4 = 0.14; δ0 = 0.9·0.4 − 0.2 = 0.16
        // A2 = 0.4; A1 = 0.14 + 0.72·0.4 = 0.428; A0 = 0.16 + 0.72·0.428 = 0.46816
        let r = TokenMatrix::from_rows(&[vec![0.0, 0.0, 1.0, 0.0]]);
        let v = TokenMatrix::from_rows(&[vec![0.2, 0.4, 0.6, 9.0]]);
        let mask = [true, true, true, false];
        let (a, ret) = gae(&r, &v, &mask, 0.9, 0.8);
        assert!(close(&a.data, &[0.46816, 0.428, 0.4, 0.0], 1e-12), "{a:?}");
        assert!(close(&ret.data, &[0.66816, 0.828, 1.0, 0.0], 1e-12));
        // λ = 0: one-step TD errors; λ = 1: returns minus values
        let (a0, _) = gae(&r, &v, &mask, 0.9, 0.0);
        assert!(close(&a0.data, &[0.16, 0.14, 0.4, 0.0], 1e-12));
        let (a1, _) = gae(&r, &v, &mask, 0.9, 1.0);
        assert!(close(
            &a1.data,
            &[0.81 - 0.2, 0.9 - 0.4, 1.0 - 0.6, 0.0],
            1e-12
        ));
        // swapping γ and λ changes the answer (a mix-up of the two cannot pass)
        let (swapped, _) = gae(&r, &v, &mask, 0.8, 0.9);
        assert!(!close(&swapped.data, &a.data, 1e-6));
    }

    #[test]
    fn masked_holes_are_skipped() {
        // a hole in the middle: the chain runs over it as if it were not there
        let r = TokenMatrix::from_rows(&[vec![0.0, 5.0, 1.0], vec![0.0, 1.0, 0.0]]);
        let v = TokenMatrix::from_rows(&[vec![0.1, 7.0, 0.3], vec![0.1, 0.3, 0.0]]);
        let (a, _) = gae(&r, &v, &[true, false, true, true, true, false], 0.9, 0.7);
        let (x, y) = (a.row(0), a.row(1));
        assert!(close(&[x[0], x[2]], &[y[0], y[1]], 1e-12), "{a:?}");
        assert_eq!((x[1], y[2]), (0.0, 0.0));
    }

    #[test]
    fn returns_and_whitening() {
        let r = TokenMatrix::from_rows(&[vec![1.0, 0.0, 2.0], vec![0.0, 3.0, 0.0]]);
        let mask = [true, true, true, true, true, false];
        let g = discounted_returns(&r, &mask, 0.5);
        assert_eq!(g.data, vec![1.5, 1.0, 2.0, 1.5, 3.0, 0.0]);
        let w = reinforce_plus_plus(&r, &mask, 0.5);
        let vals: Vec<f64> = w.data[..5].to_vec();
        let mean = vals.iter().sum::<f64>() / 5.0;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-6, "{w:?}");
        assert_eq!(w.data[5], 0.0);
    }

    #[test]
    fn rewards_carry_the_span() {
        let roll = |reward: f64, span| RolloutCredit {
            reward,
            correct: reward > 0.5,
            mask: vec![true, true, true, true, false],
            span,
        };
        let rs = [roll(1.0, None), roll(0.0, Some(1..3)), roll(0.0, None)];
        let mut cfg = CreditConfig::default();
        // outcome: the blame of a wrong answer on its last token
        let (r, shaped) = token_rewards(&rs, &cfg);
        assert_eq!(shaped, 0);
        assert_eq!(r.row(0), &[0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(r.row(1), &[0.0, 0.0, 0.0, -1.0, 0.0]);
        // CAL: a second blame, spread over the span; the outcome's stays at the end
        for mode in [CreditMode::Span, CreditMode::SpanScaled] {
            cfg.mode = mode;
            let (r, shaped) = token_rewards(&rs, &cfg);
            assert_eq!(shaped, 1);
            assert_eq!(r.row(0), &[0.0, 0.0, 0.0, 1.0, 0.0]);
            assert_eq!(r.row(1), &[0.0, -0.5, -0.5, -1.0, 0.0]);
            assert_eq!(r.row(2), &[0.0, 0.0, 0.0, -1.0, 0.0]);
        }
        cfg.mode = CreditMode::Prefix;
        cfg.prefix_reward = 0.25;
        let third = -1.0 / 3.0;
        let row = token_rewards(&rs, &cfg).0.row(1).to_vec();
        assert_eq!(row, [0.25, third, third, third - 1.0, 0.0]);
        // the span's blame does not grow with the span
        cfg.mode = CreditMode::Span;
        let long = [roll(0.0, Some(0..4)), roll(0.0, Some(3..4))];
        let (r, _) = token_rewards(&long, &cfg);
        assert!((r.row(0).iter().sum::<f64>() - r.row(1).iter().sum::<f64>()).abs() < 1e-12);
    }

    #[test]
    fn whitening_a_split_batch_with_summed_stats_is_whitening_the_whole() {
        use std::sync::{Barrier, Mutex};
        let rows: Vec<Vec<f64>> = (0..6)
            .map(|i| {
                (0..5)
                    .map(|t| ((i * 7 + t * 3) % 11) as f64 - 4.0)
                    .collect()
            })
            .collect();
        let mask: Vec<bool> = (0..30).map(|k| k % 5 < 3 + (k / 5) % 3).collect();
        let whole = masked_whiten(&TokenMatrix::from_rows(&rows), &mask);
        // two "ranks" of three rows each, summing their statistics through shared memory
        let (total, gate) = (Mutex::new(Vec::<f64>::new()), Barrier::new(2));
        let sum = |v: &mut [f64]| -> Result<(), ()> {
            total.lock().unwrap().resize(v.len(), 0.0);
            gate.wait();
            for (a, b) in total.lock().unwrap().iter_mut().zip(v.iter()) {
                *a += b;
            }
            gate.wait();
            v.copy_from_slice(&total.lock().unwrap());
            gate.wait();
            total.lock().unwrap().clear();
            gate.wait();
            Ok(())
        };
        let parts: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let (rows, mask, sum) = (&rows, &mask, &sum);
                    s.spawn(move || {
                        let x = TokenMatrix::from_rows(&rows[3 * r..3 * r + 3]);
                        masked_whiten_over(&x, &mask[15 * r..15 * r + 15], sum)
                            .unwrap()
                            .data
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let joined: Vec<f64> = parts.concat();
        assert!(
            close(&joined, &whole.data, 1e-12),
            "{joined:?} vs {:?}",
            whole.data
        );
    }
}
