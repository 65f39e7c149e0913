//! How well an oracle locates first errors: labeled responses in, one row of numbers
//! out. The pure core of `cal-grpo oracle-bench` (reading labels, scoring one answer
//! against its label, summing up); running the oracle is the command's.
//!
//! A label is a JSONL row with `question`, `reference`, `response` and `first_error`
//! (an exact substring of `response`, or null for a response without error), and
//! optionally `first_error_start` (its character offset, where the text repeats) and
//! `kind` (what was planted). Other fields are ignored.

use crate::{SpanOutcome, Usage};
use cal_core::data::planted::Label;
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// A label with its first error as a byte range of the response.
#[derive(Debug, Clone)]
pub struct Case {
    pub label: Label,
    pub gold: Option<Range<usize>>,
}

/// Reads labels; a line that is not JSON, lacks a field, or whose `first_error` is not in
/// its `response` (at `first_error_start` when given) is an error naming the line.
pub fn parse_labels(text: &str, path: &Path) -> Result<Vec<Case>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let at = |m: String| format!("{}:{line}: {m}", path.display());
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| at(format!("invalid JSON: {e}")))?;
        for f in ["question", "reference", "response"] {
            if !v.get(f).is_some_and(|x| x.is_string()) {
                return Err(at(format!("field `{f}` is missing or not a string")));
            }
        }
        match v.get("first_error") {
            None => {
                return Err(at(
                    "field `first_error` is missing (null for no error)".into()
                ))
            }
            Some(x) if !(x.is_null() || x.is_string()) => {
                return Err(at("field `first_error` is not a string or null".into()))
            }
            _ => {}
        }
        let label: Label = serde_json::from_value(v).map_err(|e| at(e.to_string()))?;
        let gold = match &label.first_error {
            None => None,
            Some(e) if e.is_empty() => return Err(at("field `first_error` is empty".into())),
            Some(e) => {
                let r = &label.response;
                let start = match label.first_error_start {
                    Some(c) => r
                        .char_indices()
                        .nth(c)
                        .map(|(b, _)| b)
                        .or((c == r.chars().count()).then_some(r.len())),
                    None => r.find(e.as_str()),
                };
                match start {
                    Some(b) if r[b..].starts_with(e.as_str()) => Some(b..b + e.len()),
                    _ => {
                        return Err(at(match label.first_error_start {
                            Some(c) => {
                                format!("`first_error` is not at character {c} of `response`")
                            }
                            None => "`first_error` is not a substring of `response`".into(),
                        }))
                    }
                }
            }
        };
        out.push(Case { label, gold });
    }
    Ok(out)
}

/// What the oracle said about one response, as the bench counts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A span of the response (bytes).
    Span(Range<usize>),
    NoError,
    /// A quote that is not in the response, or a reply that could not be read.
    Malformed,
    /// Timeout, HTTP error, budget spent and the like.
    Failed(&'static str),
}

impl Answer {
    pub fn of(o: &SpanOutcome) -> Self {
        match o {
            SpanOutcome::Located { .. } => Answer::Span(o.range().unwrap_or(0..0)),
            SpanOutcome::NoError { .. } => Answer::NoError,
            SpanOutcome::NotLocated { .. } => Answer::Malformed,
            SpanOutcome::Failed { failure } if failure.kind() == "bad-reply" => Answer::Malformed,
            SpanOutcome::Failed { failure } => Answer::Failed(failure.kind()),
        }
    }
}

/// One scored answer.
#[derive(Debug, Clone)]
pub struct Scored {
    pub answer: Answer,
    pub usage: Option<Usage>,
}

/// `range` without surrounding whitespace and sentence punctuation, so `48 / 2 = 26.`
/// and `48 / 2 = 26` are the same span.
fn trim(text: &str, r: &Range<usize>) -> Range<usize> {
    let s = &text[r.clone()];
    let junk = |c: char| c.is_whitespace() || ".,;:!?".contains(c);
    let start = r.start + (s.len() - s.trim_start_matches(junk).len());
    let end = r.start + s.trim_end_matches(junk).len();
    if start >= end {
        r.clone()
    } else {
        start..end
    }
}

fn chars(text: &str, r: &Range<usize>) -> usize {
    text.get(r.clone()).map_or(0, |s| s.chars().count())
}

/// The numbers `oracle-bench` prints and writes (fractions in [0, 1]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    pub provider: String,
    pub model: String,
    pub n: usize,
    pub n_errors: usize,
    pub n_correct: usize,
    /// Responses with an error that the oracle located a span in.
    pub located: f64,
    /// ... whose span is the labeled one (up to whitespace and punctuation at its ends).
    pub exact_match: f64,
    /// Share of the located span's characters inside the label, over located answers.
    pub overlap_precision: f64,
    /// Share of the label's characters the oracle covered, over all error responses.
    pub overlap_recall: f64,
    /// The same at token level (`None` without a tokenizer).
    pub token_precision: Option<f64>,
    pub token_recall: Option<f64>,
    /// Where located spans start against the label: before it, at it, after it.
    pub starts_early: f64,
    pub starts_exact: f64,
    pub starts_late: f64,
    /// Median (located start − labeled start) in characters.
    pub median_start_offset_chars: f64,
    /// Correct responses blamed with a span.
    pub false_alarm: f64,
    /// Quotes not found in the response and unreadable replies, over all calls.
    pub malformed: f64,
    /// Failed calls (timeouts, HTTP errors, budget), over all calls.
    pub failed: f64,
    /// Latency of uncached calls, milliseconds.
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub cache_hits: usize,
    pub input_tokens_per_call: f64,
    pub output_tokens_per_call: f64,
    /// Estimated USD per 1000 uncached calls.
    pub cost_per_1000_calls: f64,
    /// Located and exact-match shares for each planted kind.
    pub by_kind: BTreeMap<String, KindRow>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindRow {
    pub n: usize,
    pub located: f64,
    pub exact_match: f64,
}

fn frac(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Token offsets of a response (byte ranges), for token-level overlap.
pub type Offsets<'a> = &'a dyn Fn(&str) -> Option<Vec<(usize, usize)>>;

/// Sums up `scored[i]`, the answer to `cases[i]`.
pub fn summarize(
    provider: &str,
    model: &str,
    cases: &[Case],
    scored: &[Scored],
    offsets: Option<Offsets>,
) -> BenchReport {
    let mut r = BenchReport {
        provider: provider.into(),
        model: model.into(),
        n: cases.len(),
        ..BenchReport::default()
    };
    let (mut located, mut exact, mut early, mut late, mut at) = (0, 0, 0, 0, 0);
    let (mut prec, mut rec, mut tprec, mut trec) = (0.0, 0.0, 0.0, 0.0);
    let (mut false_alarms, mut malformed, mut failed) = (0, 0, 0);
    let mut offsets_start = Vec::new();
    let mut kinds: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let mut lat = Vec::new();
    let (mut tin, mut tout, mut cost, mut uncached) = (0u64, 0u64, 0.0, 0usize);
    for (c, s) in cases.iter().zip(scored) {
        let text = &c.label.response;
        match &s.answer {
            Answer::Malformed => malformed += 1,
            Answer::Failed(_) => failed += 1,
            _ => {}
        }
        if let Some(u) = &s.usage {
            if u.cached {
                r.cache_hits += 1;
            } else {
                uncached += 1;
                lat.push(u.latency.as_secs_f64() * 1000.0);
                tin += u.input_tokens;
                tout += u.output_tokens;
                cost += u.cost_usd;
            }
        }
        let Some(gold) = &c.gold else {
            r.n_correct += 1;
            false_alarms += matches!(s.answer, Answer::Span(_)) as usize;
            continue;
        };
        r.n_errors += 1;
        let kind = c.label.kind.map_or("unlabeled", |k| k.name()).to_string();
        let k = kinds.entry(kind).or_default();
        k.0 += 1;
        let Answer::Span(p) = &s.answer else {
            continue;
        };
        located += 1;
        k.1 += 1;
        let (g, p) = (trim(text, gold), trim(text, p));
        if g == p {
            exact += 1;
            k.2 += 1;
        }
        let inter = p.start.max(g.start)..p.end.min(g.end);
        let common = if inter.start < inter.end {
            chars(text, &inter)
        } else {
            0
        };
        prec += frac(common, chars(text, &p));
        rec += frac(common, chars(text, &g));
        let d = text[..p.start].chars().count() as f64 - text[..g.start].chars().count() as f64;
        offsets_start.push(d);
        match d {
            d if d < 0.0 => early += 1,
            d if d > 0.0 => late += 1,
            _ => at += 1,
        }
        if let Some(offs) = offsets.and_then(|f| f(text)) {
            let tok = |r: &Range<usize>| cal_core::map::map_span(&offs, r.clone(), 0);
            if let (Some(tg), Some(tp)) = (tok(&g), tok(&p)) {
                let common = tp.end.min(tg.end).saturating_sub(tp.start.max(tg.start));
                tprec += frac(common, tp.end - tp.start);
                trec += frac(common, tg.end - tg.start);
            }
        }
    }
    r.located = frac(located, r.n_errors);
    r.exact_match = frac(exact, r.n_errors);
    r.overlap_precision = if located == 0 {
        0.0
    } else {
        prec / located as f64
    };
    r.overlap_recall = if r.n_errors == 0 {
        0.0
    } else {
        rec / r.n_errors as f64
    };
    if offsets.is_some() {
        r.token_precision = Some(if located == 0 {
            0.0
        } else {
            tprec / located as f64
        });
        r.token_recall = Some(if r.n_errors == 0 {
            0.0
        } else {
            trec / r.n_errors as f64
        });
    }
    r.starts_early = frac(early, located);
    r.starts_exact = frac(at, located);
    r.starts_late = frac(late, located);
    offsets_start.sort_by(f64::total_cmp);
    r.median_start_offset_chars = percentile(&offsets_start, 0.5);
    r.false_alarm = frac(false_alarms, r.n_correct);
    r.malformed = frac(malformed, r.n);
    r.failed = frac(failed, r.n);
    lat.sort_by(f64::total_cmp);
    r.latency_p50_ms = percentile(&lat, 0.5);
    r.latency_p95_ms = percentile(&lat, 0.95);
    if uncached > 0 {
        r.input_tokens_per_call = tin as f64 / uncached as f64;
        r.output_tokens_per_call = tout as f64 / uncached as f64;
        r.cost_per_1000_calls = 1000.0 * cost / uncached as f64;
    }
    r.by_kind = kinds
        .into_iter()
        .map(|(k, (n, l, e))| {
            (
                k,
                KindRow {
                    n,
                    located: frac(l, n),
                    exact_match: frac(e, n),
                },
            )
        })
        .collect();
    r
}

impl BenchReport {
    /// The table `oracle-bench` prints.
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let mut rows = vec![
            (
                "responses (with error / correct)",
                format!("{} ({} / {})", self.n, self.n_errors, self.n_correct),
            ),
            ("located", pct(self.located)),
            ("exact match of the first error", pct(self.exact_match)),
            (
                "overlap precision / recall (chars)",
                format!(
                    "{} / {}",
                    pct(self.overlap_precision),
                    pct(self.overlap_recall)
                ),
            ),
        ];
        if let (Some(p), Some(r)) = (self.token_precision, self.token_recall) {
            rows.push((
                "overlap precision / recall (tokens)",
                format!("{} / {}", pct(p), pct(r)),
            ));
        }
        rows.extend([
            (
                "span starts early / at / late",
                format!(
                    "{} / {} / {}",
                    pct(self.starts_early),
                    pct(self.starts_exact),
                    pct(self.starts_late)
                ),
            ),
            (
                "median start offset (chars)",
                format!("{:+.0}", self.median_start_offset_chars),
            ),
            ("false alarms on correct responses", pct(self.false_alarm)),
            ("malformed replies", pct(self.malformed)),
            ("failed calls", pct(self.failed)),
            (
                "latency p50 / p95 (uncached)",
                format!("{:.1} / {:.1} ms", self.latency_p50_ms, self.latency_p95_ms),
            ),
            (
                "tokens in / out per call",
                format!(
                    "{:.0} / {:.0}",
                    self.input_tokens_per_call, self.output_tokens_per_call
                ),
            ),
            (
                "est. cost per 1000 calls",
                format!("${:.4}", self.cost_per_1000_calls),
            ),
            ("cache hits", self.cache_hits.to_string()),
        ]);
        let mut out = format!("oracle {} ({})\n", self.provider, self.model);
        for (k, v) in rows {
            out.push_str(&format!("  {k:<38} {v}\n"));
        }
        for (k, row) in &self.by_kind {
            out.push_str(&format!(
                "  {:<38} located {}, exact {}\n",
                format!("kind {k} ({})", row.n),
                pct(row.located),
                pct(row.exact_match)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: &str = r#"{"question":"q","reference":"r","response":"2 + 2 = 5. 5 * 2 = 10\n#### 10","first_error":"2 + 2 = 5","kind":"result","extra":1}
{"question":"q","reference":"r","response":"1 + 1 = 2. 1 + 1 = 3","first_error":"1 + 1 = ","first_error_start":11}
{"question":"q","reference":"r","response":"3 * 3 = 9\n#### 9","first_error":null}
"#;

    #[test]
    fn labels_read_with_their_byte_ranges() {
        let c = parse_labels(ROWS, Path::new("l.jsonl")).unwrap();
        assert_eq!(c[0].gold, Some(0..9));
        assert_eq!(
            c[1].gold,
            Some(11..19),
            "the offset picks the second occurrence"
        );
        assert_eq!(c[2].gold, None);
    }

    #[test]
    fn bad_labels_name_their_line() {
        let bad = [
            ("{\"question\":\"q\"}", "l.jsonl:1: field `reference`"),
            ("\n{oops", "l.jsonl:2: invalid JSON"),
            (
                r#"{"question":"q","reference":"r","response":"abc"}"#,
                "l.jsonl:1: field `first_error` is missing",
            ),
            (
                r#"{"question":"q","reference":"r","response":"abc","first_error":"x"}"#,
                "l.jsonl:1: `first_error` is not a substring",
            ),
            (
                r#"{"question":"q","reference":"r","response":"abc","first_error":"b","first_error_start":0}"#,
                "l.jsonl:1: `first_error` is not at character 0",
            ),
        ];
        for (text, want) in bad {
            let e = parse_labels(text, Path::new("l.jsonl")).unwrap_err();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn answers_are_scored_against_the_labels() {
        let cases = parse_labels(ROWS, Path::new("l.jsonl")).unwrap();
        let s = |a| Scored {
            answer: a,
            usage: None,
        };
        // exact (with a trailing period), late by 11 chars on a 9-char label, a false alarm
        let r = summarize(
            "t",
            "t",
            &cases,
            &[
                s(Answer::Span(0..10)),
                s(Answer::Span(0..8)),
                s(Answer::Span(0..9)),
            ],
            None,
        );
        assert_eq!((r.n_errors, r.n_correct), (2, 1));
        assert_eq!(r.located, 1.0);
        assert_eq!(r.exact_match, 0.5);
        assert_eq!(r.false_alarm, 1.0);
        // second: located "1 + 1 = 2" (0..9 trimmed 0..8: "1 + 1 = "), label 11..19: no overlap
        assert_eq!(r.overlap_recall, 0.5);
        assert_eq!(r.starts_early, 0.5);
        assert_eq!(r.median_start_offset_chars, 0.0); // of 0 and -11, the upper
        let none = summarize(
            "t",
            "t",
            &cases,
            &[s(Answer::NoError), s(Answer::Malformed), s(Answer::NoError)],
            None,
        );
        assert_eq!(
            (none.located, none.false_alarm, none.overlap_recall),
            (0.0, 0.0, 0.0)
        );
        assert!((none.malformed - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(none.by_kind["result"].n, 1);
    }
}
