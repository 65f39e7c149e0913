//! Final-answer extraction and numeric grading.
//!
//! Extraction follows lm-evaluation-harness' `gsm8k` task so that accuracies are
//! comparable with published numbers:
//!
//! - **strict**: the first match of `#### (\-?[0-9\.\,]+)`;
//! - **flexible**: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`;
//!
//! and both strip `,`, `$` and a trailing `.` before comparing. Two explicit answer
//! markers that instruction-tuned models use are recognised too: `\boxed{N}` and
//! "the answer is N". [`Extraction::best`] picks the most explicit marker present and is
//! what the trainer rewards.
//!
//! Answers are compared as numbers, never by substring containment (`"2"` is not a
//! correct answer to `12`, a classic grading bug).
//!
//! ```
//! use cal_core::grade::{extract, is_correct};
//! let e = extract("She pays 3 * 6 = <<3*6=18>>18 dollars.\n#### 18");
//! assert_eq!(e.strict.as_deref(), Some("18"));
//! assert!(is_correct(e.best(), "18"));
//! assert!(!is_correct(Some("2"), "12"));
//! assert!(is_correct(Some("$1,800.00"), "1800"));
//! ```

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Every candidate answer found in one response; `None` where a strategy found nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Extraction {
    /// lm-eval strict match: first `#### N`.
    pub strict: Option<String>,
    /// lm-eval flexible match: last number-looking token.
    pub flexible: Option<String>,
    /// Content of the last `\boxed{...}`.
    pub boxed: Option<String>,
    /// Number after the last "the answer is".
    pub answer_is: Option<String>,
}

impl Extraction {
    /// The most explicit answer present: `####`, then `\boxed{}`, then "the answer is",
    /// then the last number.
    pub fn best(&self) -> Option<&str> {
        self.strict
            .as_deref()
            .or(self.boxed.as_deref())
            .or(self.answer_is.as_deref())
            .or(self.flexible.as_deref())
    }
}

fn strict_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"#### (\-?[0-9\.\,]+)").unwrap())
}

fn flexible_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").unwrap())
}

fn boxed_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\\boxed\{\s*([^{}]*?)\s*\}").unwrap())
}

fn answer_is_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?i)the (?:final )?answer is[:\s]*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
            .unwrap()
    })
}

/// Runs every extraction strategy over `response`.
pub fn extract(response: &str) -> Extraction {
    let strict = strict_re()
        .captures(response)
        .map(|c| c[1].to_string())
        .filter(|s| parse_number(s).is_some());
    let flexible = flexible_re()
        .captures_iter(response)
        .filter_map(|c| c.get(0).map(|m| m.as_str().to_string()))
        .filter(|s| parse_number(s).is_some())
        .last();
    let boxed = boxed_re()
        .captures_iter(response)
        .map(|c| c[1].to_string())
        .last();
    let answer_is = answer_is_re()
        .captures_iter(response)
        .map(|c| c[1].to_string())
        .last();
    Extraction {
        strict,
        flexible,
        boxed,
        answer_is,
    }
}

/// Parses an answer string as lm-eval normalises it: strips `,`, `$`, surrounding
/// whitespace and a trailing `.`. Returns `None` for anything that is not a number.
///
/// ```
/// use cal_core::grade::parse_number;
/// assert_eq!(parse_number("$1,800."), Some(1800.0));
/// assert_eq!(parse_number("-3.5"), Some(-3.5));
/// assert_eq!(parse_number("..."), None);
/// ```
pub fn parse_number(s: &str) -> Option<f64> {
    let cleaned: String = s.chars().filter(|c| *c != ',' && *c != '$').collect();
    let cleaned = cleaned.trim();
    let cleaned = cleaned.strip_suffix('.').unwrap_or(cleaned).trim();
    if cleaned.is_empty() || !cleaned.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    // f64's parser also accepts "inf", "NaN" and exponents; answers are plain decimals.
    if !cleaned
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return None;
    }
    cleaned.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Numeric equivalence of two answer strings (relative tolerance 1e-6).
pub fn numbers_equal(a: &str, b: &str) -> bool {
    match (parse_number(a), parse_number(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

/// Whether an extracted answer matches the gold answer numerically; a missing answer is wrong.
pub fn is_correct(extracted: Option<&str>, gold: &str) -> bool {
    extracted.is_some_and(|e| numbers_equal(e, gold))
}

/// Grade of one response against a gold final answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grade {
    pub extraction: Extraction,
    /// Correct under lm-eval's strict filter.
    pub strict_correct: bool,
    /// Correct under lm-eval's flexible filter.
    pub flexible_correct: bool,
    /// Correct under [`Extraction::best`]; the training reward is this as 0/1.
    pub correct: bool,
}

/// Grades `response` against `gold` under every filter.
pub fn grade(response: &str, gold: &str) -> Grade {
    let extraction = extract(response);
    Grade {
        strict_correct: is_correct(extraction.strict.as_deref(), gold),
        flexible_correct: is_correct(extraction.flexible.as_deref(), gold),
        correct: is_correct(extraction.best(), gold),
        extraction,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_takes_first_hashes() {
        let e = extract("#### 5\nlater #### 7");
        assert_eq!(e.strict.as_deref(), Some("5"));
    }

    #[test]
    fn flexible_is_last_number() {
        let e = extract("I had 3 apples and then 12.");
        assert_eq!(e.flexible.as_deref(), Some("12."));
        assert!(is_correct(e.flexible.as_deref(), "12"));
    }

    #[test]
    fn markers() {
        let e = extract("so \\boxed{42} done");
        assert_eq!(e.boxed.as_deref(), Some("42"));
        assert_eq!(e.best(), Some("42"));
        let e = extract("Thus, the answer is $1,250.");
        assert_eq!(e.answer_is.as_deref(), Some("1,250"));
        assert!(is_correct(e.best(), "1250"));
        let e = extract("The final answer is: 7");
        assert_eq!(e.answer_is.as_deref(), Some("7"));
    }

    #[test]
    fn numeric_equivalence() {
        for (a, b) in [
            ("18", "18.0"),
            ("$18", "18"),
            ("1,800", "1800"),
            ("-4", "-4.00"),
        ] {
            assert!(numbers_equal(a, b), "{a} vs {b}");
        }
        for (a, b) in [
            ("2", "12"),
            ("12", "2"),
            ("1.5", "15"),
            ("", "0"),
            ("-", "0"),
        ] {
            assert!(!numbers_equal(a, b), "{a} vs {b}");
        }
    }

    #[test]
    fn no_answer_is_wrong() {
        let g = grade("I do not know.", "3");
        assert!(!g.correct && !g.strict_correct && !g.flexible_correct);
    }

    #[test]
    fn strict_requires_hashes() {
        let g = grade("The total is 18.", "18");
        assert!(!g.strict_correct);
        assert!(g.flexible_correct);
        assert!(g.correct);
    }

    proptest! {
        #[test]
        fn integers_roundtrip(n in -1_000_000i64..1_000_000) {
            let with_commas = {
                let s = n.abs().to_string();
                let mut out = String::new();
                for (i, ch) in s.chars().enumerate() {
                    if i > 0 && (s.len() - i) % 3 == 0 { out.push(','); }
                    out.push(ch);
                }
                if n < 0 { format!("-{out}") } else { out }
            };
            let resp = format!("Steps...\n#### {with_commas}");
            let g = grade(&resp, &n.to_string());
            prop_assert!(g.strict_correct && g.flexible_correct && g.correct);
            let wrong = grade(&resp, &(n + 1).to_string());
            prop_assert!(!wrong.correct);
        }

        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = grade(&s, "5");
        }
    }
}
