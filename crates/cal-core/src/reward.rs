//! Reward functions, chosen by name and weighted (`correctness=1.0,format=0.2`), as TRL
//! and Tunix users write them. A rollout's reward is the weighted sum; each function's
//! mean is logged on its own. The oracle keeps judging correctness only: spans are asked
//! for wrong final answers whatever the reward mix.
//!
//! A new reward is one type implementing [`Reward`] and one arm in [`by_name`].
//!
//! ```
//! use cal_core::reward::{RewardFns, Completion};
//! let fns = RewardFns::parse("correctness=1.0,format=0.2", 64).unwrap();
//! let c = Completion { text: "3 + 4 = 7\n#### 7", tokens: 9, gold: "7" };
//! assert!((fns.total(&c) - 1.2).abs() < 1e-12);
//! ```

use crate::grade::{extract, grade, parse_number};

/// What a reward function sees of one completion.
pub struct Completion<'a> {
    pub text: &'a str,
    /// Completion tokens (stop token included).
    pub tokens: usize,
    /// The problem's gold final answer.
    pub gold: &'a str,
}

pub trait Reward: Send + Sync {
    fn name(&self) -> &'static str;
    fn score(&self, c: &Completion) -> f64;
}

/// 1 when the final answer is right (the GSM8K grading of [`crate::grade`]), else 0.
pub struct Correctness;

impl Reward for Correctness {
    fn name(&self) -> &'static str {
        "correctness"
    }
    fn score(&self, c: &Completion) -> f64 {
        f64::from(u8::from(grade(c.text, c.gold).correct))
    }
}

/// 1 when the response ends its reasoning with a parseable `#### N` line, else 0.
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &'static str {
        "format"
    }
    fn score(&self, c: &Completion) -> f64 {
        let strict = extract(c.text).strict;
        f64::from(u8::from(strict.as_deref().and_then(parse_number).is_some()))
    }
}

/// 0 up to `budget` tokens, then −(tokens − budget) / budget, floored at −1.
pub struct Length {
    pub budget: usize,
}

impl Reward for Length {
    fn name(&self) -> &'static str {
        "length"
    }
    fn score(&self, c: &Completion) -> f64 {
        let b = self.budget.max(1) as f64;
        (-(c.tokens.saturating_sub(self.budget) as f64) / b).max(-1.0)
    }
}

/// The reward function called `name` (`length_budget` configures `length`).
pub fn by_name(name: &str, length_budget: usize) -> Option<Box<dyn Reward>> {
    Some(match name {
        "correctness" => Box::new(Correctness),
        "format" => Box::new(Format),
        "length" => Box::new(Length {
            budget: length_budget,
        }),
        _ => return None,
    })
}

/// The names [`by_name`] knows.
pub const NAMES: [&str; 3] = ["correctness", "format", "length"];

/// Weighted reward functions.
pub struct RewardFns {
    pub fns: Vec<(Box<dyn Reward>, f64)>,
}

impl RewardFns {
    /// Parses `name=weight,name=weight` (a bare `name` weighs 1.0).
    pub fn parse(spec: &str, length_budget: usize) -> Result<Self, String> {
        let mut fns: Vec<(Box<dyn Reward>, f64)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once('=') {
                Some((n, w)) => (
                    n.trim(),
                    w.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|w| w.is_finite())
                        .ok_or_else(|| format!("reward {part:?}: weight is not a number"))?,
                ),
                None => (part, 1.0),
            };
            let f = by_name(name, length_budget)
                .ok_or_else(|| format!("unknown reward {name:?} (known: {})", NAMES.join(", ")))?;
            if fns.iter().any(|(g, _)| g.name() == f.name()) {
                return Err(format!("reward {name:?} given twice"));
            }
            fns.push((f, weight));
        }
        if fns.is_empty() {
            return Err("no reward function given (e.g. correctness=1.0)".into());
        }
        Ok(Self { fns })
    }

    /// Each function's score, in order.
    pub fn scores(&self, c: &Completion) -> Vec<f64> {
        self.fns.iter().map(|(f, _)| f.score(c)).collect()
    }

    /// The weighted sum.
    pub fn total(&self, c: &Completion) -> f64 {
        self.fns.iter().map(|(f, w)| w * f.score(c)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(text: &'a str, tokens: usize) -> Completion<'a> {
        Completion {
            text,
            tokens,
            gold: "7",
        }
    }

    #[test]
    fn each_function_scores_what_it_says() {
        assert_eq!(Correctness.score(&c("#### 7", 3)), 1.0);
        assert_eq!(Correctness.score(&c("#### 8", 3)), 0.0);
        assert_eq!(Format.score(&c("so 3 + 4 = 8\n#### 8", 9)), 1.0);
        assert_eq!(Format.score(&c("the answer is 7", 5)), 0.0);
        assert_eq!(Format.score(&c("#### ,", 2)), 0.0);
        let l = Length { budget: 10 };
        assert_eq!(l.score(&c("", 10)), 0.0);
        assert_eq!(l.score(&c("", 15)), -0.5);
        assert_eq!(l.score(&c("", 100)), -1.0);
    }

    #[test]
    fn specs_parse_with_weights_and_clear_errors() {
        let f = RewardFns::parse("correctness=1.0, format=0.2,length=0.5", 4).unwrap();
        assert_eq!(f.scores(&c("#### 7", 6)), vec![1.0, 1.0, -0.5]);
        assert!((f.total(&c("#### 7", 6)) - (1.0 + 0.2 - 0.25)).abs() < 1e-12);
        assert_eq!(RewardFns::parse("format", 4).unwrap().fns[0].1, 1.0);
        for bad in ["", "nope=1", "format=x", "format,format=2", "format=inf"] {
            assert!(RewardFns::parse(bad, 4).is_err(), "{bad}");
        }
    }
}
