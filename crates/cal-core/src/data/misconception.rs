//! Classic column-arithmetic misconceptions, for demonstrations that are sometimes wrong
//! in a systematic way.
//!
//! Why: outcome RL does not teach a policy new skills in a few hundred steps; it shifts
//! probability between behaviours the policy already has (measured on this project's
//! benchmark: sampled accuracy rose to the greedy one, and greedy stayed flat). A warm
//! start trained on demonstrations that apply a known bug on some steps *and* the right
//! rule on others has both behaviours, like a pretrained model with a misconception,
//! and held-out accuracy then measures whether RL makes the right rule win. Each bug
//! shows only on steps that carry or borrow, so a wrong answer has one first wrong line
//! that an exact checker (the calculator oracle) finds: the case first-error credit is
//! for.
//!
//! ```
//! use cal_core::data::misconception::buggy;
//! assert_eq!(buggy(38, '+', 25), Some(53)); // the carry dropped
//! assert_eq!(buggy(52, '-', 17), Some(45)); // the smaller digit taken from the larger
//! assert_eq!(buggy(17, '*', 3), Some(31)); // the carry of 7 × 3 dropped
//! assert_eq!(buggy(12, '+', 5), None); // nothing to carry: no bug to show
//! ```

use super::Example;
use rand::Rng;

fn digits(mut n: u64) -> Vec<u64> {
    let mut d = vec![n % 10];
    n /= 10;
    while n > 0 {
        d.push(n % 10);
        n /= 10;
    }
    d // least significant first
}

fn from_digits(d: &[u64]) -> u64 {
    d.iter().rev().fold(0, |acc, &x| acc * 10 + x)
}

/// The result of `a op b` under the op's misconception, or `None` when the bug would
/// not change it (no carry, no borrow) or the op has none (division).
pub fn buggy(a: u64, op: char, b: u64) -> Option<u64> {
    let (da, db) = (digits(a), digits(b));
    let n = da.len().max(db.len());
    let at = |d: &[u64], i: usize| d.get(i).copied().unwrap_or(0);
    let wrong = match op {
        // Each column's sum written mod 10; the final column written whole.
        '+' => {
            let cols: Vec<u64> = (0..n).map(|i| at(&da, i) + at(&db, i)).collect();
            let mut out: Vec<u64> = cols[..n - 1].iter().map(|c| c % 10).collect();
            out.extend(digits(cols[n - 1]));
            from_digits(&out)
        }
        // The smaller digit taken from the larger in every column.
        '-' => {
            let out: Vec<u64> = (0..n).map(|i| at(&da, i).abs_diff(at(&db, i))).collect();
            from_digits(&out)
        }
        // Single-digit multiplier: each digit's product written mod 10, the leading one
        // whole (17 × 3: 7 × 3 = 21 → 1, 1 × 3 = 3 → 31).
        '*' if b < 10 => {
            let mut out: Vec<u64> = da[..da.len() - 1].iter().map(|d| d * b % 10).collect();
            out.extend(digits(da[da.len() - 1] * b));
            from_digits(&out)
        }
        _ => return None,
    };
    let right = match op {
        '+' => a + b,
        '-' => a.checked_sub(b)?,
        _ => a * b,
    };
    (wrong != right).then_some(wrong)
}

/// A chain-style demonstration (`a op b = c` lines, then `#### N`) in which each step
/// that can show its misconception does so with probability `rate`; later steps work on
/// the wrong value, as a student's would. Returns the example unchanged when it is not a
/// chain solution, or when a wrong value would make a later division inexact.
pub fn demonstrate(ex: &Example, rate: f64, rng: &mut impl Rng) -> Example {
    let steps: Option<Vec<(char, u64)>> = ex
        .answer
        .lines()
        .filter(|l| !l.starts_with("####"))
        .map(|l| {
            let mut w = l.split_whitespace();
            let (_a, op, b) = (w.next()?, w.next()?, w.next()?);
            Some((op.chars().next()?, b.parse().ok()?))
        })
        .collect();
    let first: Option<u64> = ex
        .answer
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok());
    let (Some(steps), Some(mut cur)) = (steps, first) else {
        return ex.clone();
    };
    let mut lines = Vec::with_capacity(steps.len() + 1);
    for (op, b) in steps {
        let right = match op {
            '+' => cur + b,
            '-' if cur >= b => cur - b,
            '*' => cur * b,
            '/' if b != 0 && cur % b == 0 => cur / b,
            _ => return ex.clone(),
        };
        let next = match buggy(cur, op, b) {
            Some(w) if rng.random_bool(rate.clamp(0.0, 1.0)) => w,
            _ => right,
        };
        lines.push(format!("{cur} {op} {b} = {next}"));
        cur = next;
    }
    lines.push(format!("#### {cur}"));
    Example {
        answer: lines.join("\n"),
        final_answer: cur.to_string(),
        ..ex.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{generate, GenConfig, Style};
    use rand::SeedableRng;

    #[test]
    fn bugs_by_hand() {
        assert_eq!(buggy(99, '+', 1), Some(90)); // 9+1 → 0, 9+0 → 9
        assert_eq!(buggy(8, '+', 7), None); // one column: written whole, = 15
        assert_eq!(buggy(40, '-', 3), Some(43));
        assert_eq!(buggy(45, '-', 21), None);
        assert_eq!(buggy(45, '*', 4), Some(160)); // 5×4 → 0, 4×4 → 16
        assert_eq!(buggy(12, '*', 4), None);
        assert_eq!(buggy(12, '/', 4), None);
        assert_eq!(buggy(3, '-', 5), None);
    }

    #[test]
    fn demonstrations_chain_the_wrong_value_and_rate_zero_is_identity() {
        let cfg = GenConfig {
            min_steps: 4,
            max_steps: 4,
            style: Style::Chain,
            max_value: Some(99),
            ..GenConfig::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let exs = generate(300, 5, &cfg);
        let mut changed = 0;
        for ex in &exs {
            assert_eq!(&demonstrate(ex, 0.0, &mut rng), ex);
            let d = demonstrate(ex, 1.0, &mut rng);
            if d != *ex {
                changed += 1;
                assert_eq!(d.question, ex.question);
                // every line starts from the previous line's (possibly wrong) result
                let mut prev: Option<String> = None;
                for l in d.answer.lines().filter(|l| !l.starts_with("####")) {
                    let w: Vec<&str> = l.split(' ').collect();
                    if let Some(p) = &prev {
                        assert_eq!(w[0], p, "{}", d.answer);
                    }
                    prev = Some(w[4].to_string());
                }
                assert_eq!(
                    d.answer.lines().last().unwrap(),
                    format!("#### {}", d.final_answer)
                );
                assert_eq!(Some(&d.final_answer), prev.as_ref());
            }
        }
        assert!(
            changed > 100,
            "only {changed} of 300 chains had a step to get wrong"
        );
    }
}
