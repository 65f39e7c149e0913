//! An oracle made worse on purpose, in controlled ways: how much of CAL's gain survives
//! a judge that misses errors, blames the wrong step, or blames correct work.
//!
//! `--oracle-noise miss=P,shift=P,random=P,false-alarm=P` wraps any oracle. For a
//! located span, one uniform draw picks at most one of: **miss** (no error reported),
//! **shift** (the span moves to the step before or after it), **random** (a step drawn
//! uniformly from the response). A "no error" answer becomes a random step with
//! probability **false-alarm** (training asks the oracle about wrong rollouts only, so
//! this one matters in `oracle-bench`). Steps are the response's arithmetic statements
//! (`a op b = c`), or its lines where it has none.
//!
//! The draws are a function of the request and `seed`, so a rerun, a resumed run and
//! the cache see the same degraded answer.

use crate::{arith, Oracle, OracleOutcome, OracleReply, OracleRequest, Verdict};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

/// The degradation: probabilities in [0, 1], `miss + shift + random` at most 1.
/// In a configuration it is written as the flag is: `noise = "miss=0.2,shift=0.1"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Noise {
    pub miss: f64,
    pub shift: f64,
    pub random: f64,
    pub false_alarm: f64,
    pub seed: u64,
}

impl std::str::FromStr for Noise {
    type Err = String;
    /// `miss=0.2,shift=0.1` (unnamed kinds are 0; `seed=N` sets the draws).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut n = Noise::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("`{part}`: expected kind=P (miss, shift, random, false-alarm)")
            })?;
            let p: f64 = v
                .parse()
                .map_err(|_| format!("`{part}`: {v} is not a number"))?;
            match k.trim() {
                "miss" => n.miss = p,
                "shift" => n.shift = p,
                "random" => n.random = p,
                "false-alarm" => n.false_alarm = p,
                "seed" => n.seed = p as u64,
                other => {
                    return Err(format!(
                        "unknown noise kind `{other}` (miss, shift, random, false-alarm, seed)"
                    ))
                }
            }
        }
        n.check()?;
        Ok(n)
    }
}

impl TryFrom<String> for Noise {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Noise> for String {
    fn from(n: Noise) -> String {
        let mut parts = Vec::new();
        for (k, p) in [
            ("miss", n.miss),
            ("shift", n.shift),
            ("random", n.random),
            ("false-alarm", n.false_alarm),
        ] {
            if p != 0.0 {
                parts.push(format!("{k}={p}"));
            }
        }
        if n.seed != 0 {
            parts.push(format!("seed={}", n.seed));
        }
        parts.join(",")
    }
}

impl Noise {
    pub fn check(&self) -> Result<(), String> {
        for (k, p) in [
            ("miss", self.miss),
            ("shift", self.shift),
            ("random", self.random),
            ("false-alarm", self.false_alarm),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("oracle noise {k}={p} is not in [0, 1]"));
            }
        }
        if self.miss + self.shift + self.random > 1.0 + 1e-12 {
            return Err("oracle noise: miss + shift + random must be at most 1".into());
        }
        Ok(())
    }

    pub fn is_zero(&self) -> bool {
        self.miss == 0.0 && self.shift == 0.0 && self.random == 0.0 && self.false_alarm == 0.0
    }

    /// The degraded verdict for `verdict` on `response`, drawn by `rng`.
    pub fn apply(&self, verdict: Verdict, response: &str, rng: &mut impl Rng) -> Verdict {
        let steps = steps(response);
        let at = |r: Range<usize>| Verdict::Segment {
            text: response[r.clone()].to_string(),
            range: Some(r),
        };
        match verdict {
            Verdict::Segment { text, range } => {
                let u: f64 = rng.random();
                let here = range
                    .clone()
                    .or_else(|| response.find(&text).map(|b| b..b + text.len()));
                if u < self.miss {
                    return Verdict::NoError;
                }
                if u < self.miss + self.shift {
                    if let Some(r) = &here {
                        // the step holding the span's start, then its neighbour
                        let i = steps
                            .iter()
                            .position(|s| s.end > r.start)
                            .unwrap_or(steps.len());
                        let before = i.checked_sub(1);
                        let after = (i + 1 < steps.len()).then_some(i + 1);
                        let pick = match (before, after, rng.random_bool(0.5)) {
                            (Some(b), Some(_), true) | (Some(b), None, _) => Some(b),
                            (_, Some(a), _) => Some(a),
                            (None, None, _) => None,
                        };
                        if let Some(j) = pick {
                            return at(steps[j].clone());
                        }
                    }
                } else if u < self.miss + self.shift + self.random && !steps.is_empty() {
                    return at(steps[rng.random_range(0..steps.len())].clone());
                }
                Verdict::Segment { text, range }
            }
            Verdict::NoError => {
                if !steps.is_empty() && rng.random_bool(self.false_alarm) {
                    at(steps[rng.random_range(0..steps.len())].clone())
                } else {
                    Verdict::NoError
                }
            }
        }
    }
}

/// The response's steps: its arithmetic statements, or its non-empty lines.
fn steps(response: &str) -> Vec<Range<usize>> {
    let claims: Vec<Range<usize>> = arith::claims(response)
        .into_iter()
        .map(|c| c.range)
        .collect();
    if !claims.is_empty() {
        return claims;
    }
    let mut out = Vec::new();
    let mut start = 0;
    for line in response.split_inclusive('\n') {
        let t = line.trim_end();
        if !t.trim().is_empty() {
            let lead = t.len() - t.trim_start().len();
            out.push(start + lead..start + t.len());
        }
        start += line.len();
    }
    out
}

/// FNV-1a: a stable hash of the request (the std hasher may change between Rust
/// versions, and the draws must not).
fn fnv(parts: &[&str], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Any oracle with [`Noise`] applied to its answers.
pub struct NoisyOracle {
    pub inner: Arc<dyn Oracle>,
    pub noise: Noise,
    model: String,
}

impl NoisyOracle {
    pub fn new(inner: Arc<dyn Oracle>, noise: Noise) -> Self {
        let model = format!(
            "{} + noise(miss={}, shift={}, random={}, false-alarm={})",
            inner.model(),
            noise.miss,
            noise.shift,
            noise.random,
            noise.false_alarm
        );
        Self {
            inner,
            noise,
            model,
        }
    }
}

#[async_trait::async_trait]
impl Oracle for NoisyOracle {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn model(&self) -> &str {
        &self.model
    }
    async fn first_error(&self, req: &OracleRequest) -> OracleOutcome {
        let reply = self.inner.first_error(req).await?;
        let key = fnv(
            &[&req.question, &req.reference, &req.response],
            self.noise.seed,
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
        let verdict = self.noise.apply(reply.verdict, &req.response, &mut rng);
        Ok(OracleReply { verdict, ..reply })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "First 2 + 3 = 5.\nThen 5 * 4 = 21.\nSo 21 - 1 = 20.\n#### 20";

    fn span(text: &str) -> Verdict {
        let b = R.find(text).unwrap();
        Verdict::Segment {
            text: text.into(),
            range: Some(b..b + text.len()),
        }
    }

    fn text(v: &Verdict) -> Option<&str> {
        match v {
            Verdict::Segment { text, .. } => Some(text),
            Verdict::NoError => None,
        }
    }

    #[test]
    fn each_kind_does_what_it_says() {
        let rng = || rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let all = |n: Noise| n.apply(span("5 * 4 = 21"), R, &mut rng());
        assert_eq!(
            all(Noise {
                miss: 1.0,
                ..Noise::default()
            }),
            Verdict::NoError
        );
        let shifted = all(Noise {
            shift: 1.0,
            ..Noise::default()
        });
        assert!(
            matches!(text(&shifted), Some("2 + 3 = 5") | Some("21 - 1 = 20")),
            "{shifted:?}"
        );
        // a span at the first step can only move forward
        let first = Noise {
            shift: 1.0,
            ..Noise::default()
        }
        .apply(span("2 + 3 = 5"), R, &mut rng());
        assert_eq!(text(&first), Some("5 * 4 = 21"));
        let random = all(Noise {
            random: 1.0,
            ..Noise::default()
        });
        assert!(["2 + 3 = 5", "5 * 4 = 21", "21 - 1 = 20"].contains(&text(&random).unwrap()));
        assert_eq!(all(Noise::default()), span("5 * 4 = 21"));
        let alarm = Noise {
            false_alarm: 1.0,
            ..Noise::default()
        }
        .apply(Verdict::NoError, R, &mut rng());
        assert!(text(&alarm).is_some());
        assert_eq!(
            Noise::default().apply(Verdict::NoError, R, &mut rng()),
            Verdict::NoError
        );
    }

    #[test]
    fn rates_come_out_as_asked() {
        let n: Noise = "miss=0.3,shift=0.2".parse().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut missed, mut moved) = (0, 0);
        for _ in 0..4000 {
            match text(&n.apply(span("5 * 4 = 21"), R, &mut rng)) {
                None => missed += 1,
                Some("5 * 4 = 21") => {}
                Some(_) => moved += 1,
            }
        }
        assert!((missed as f64 / 4000.0 - 0.3).abs() < 0.03, "{missed}");
        assert!((moved as f64 / 4000.0 - 0.2).abs() < 0.03, "{moved}");
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let n: Noise = "miss=0.1, random=0.2,false-alarm=0.05,seed=3"
            .parse()
            .unwrap();
        assert_eq!(
            (n.miss, n.random, n.false_alarm, n.seed),
            (0.1, 0.2, 0.05, 3)
        );
        assert!("miss=2"
            .parse::<Noise>()
            .unwrap_err()
            .contains("not in [0, 1]"));
        assert!("miss=0.6,shift=0.6"
            .parse::<Noise>()
            .unwrap_err()
            .contains("at most 1"));
        assert!("late=0.1"
            .parse::<Noise>()
            .unwrap_err()
            .contains("unknown noise kind"));
        assert_eq!(
            steps("no numbers here\n\n  second line"),
            vec![0..15, 19..30]
        );
        assert_eq!(
            String::from(n),
            "miss=0.1,random=0.2,false-alarm=0.05,seed=3"
        );
        assert_eq!(String::from(n).parse::<Noise>().unwrap(), n);
        assert!("".parse::<Noise>().unwrap().is_zero());
    }

    #[tokio::test]
    async fn the_same_request_is_degraded_the_same_way() {
        let o = NoisyOracle::new(
            Arc::new(crate::calculator::CalculatorOracle),
            "random=1".parse().unwrap(),
        );
        let req = OracleRequest {
            question: "q".into(),
            reference: "r".into(),
            response: R.into(),
        };
        let a = o.first_error(&req).await.unwrap().verdict;
        for _ in 0..5 {
            assert_eq!(o.first_error(&req).await.unwrap().verdict, a);
        }
        assert!(o
            .model()
            .starts_with("calculator + noise(miss=0, shift=0, random=1"));
    }
}
