//! Voting over several sampled answers of one oracle (`--oracle-votes N`): the span most
//! samples agree on, as CAPO's voting does. A small judge sampled at a temperature
//! names a different segment now and then; the majority is steadier than any one
//! sample. Each sample is its own request (vote index in the cache key, see
//! [`Oracle::sample`]), so a rerun or a resumed run reads every vote from the cache.

use crate::{Oracle, OracleOutcome, OracleReply, OracleRequest, Usage, Verdict};
use std::collections::HashMap;
use std::sync::Arc;

/// A verdict's identity for counting: the quoted text without the whitespace and
/// punctuation at its ends (`"3 * 6 = 16."` and `"3 * 6 = 16"` are one vote), or
/// `None` for "no error".
fn ballot(v: &Verdict) -> Option<String> {
    match v {
        Verdict::Segment { text, .. } => Some(
            text.trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
                .to_string(),
        ),
        Verdict::NoError => None,
    }
}

/// The majority of `replies` (failed samples do not vote; with none left, the first
/// failure is the answer). Ties go to the span that starts earliest in `response`
/// (the first error is what is asked), and a span beats "no error". The usage is the
/// sum over samples (tokens, cost, attempts), the slowest latency, and `cached` only
/// when every sample was.
pub fn majority(outcomes: Vec<OracleOutcome>, response: &str) -> OracleOutcome {
    let n = outcomes.len();
    let mut replies = Vec::new();
    let mut first_failure = None;
    for o in outcomes {
        match o {
            Ok(r) => replies.push(r),
            Err(f) => {
                first_failure.get_or_insert(f);
            }
        }
    }
    if replies.is_empty() {
        return Err(first_failure.expect("at least one vote"));
    }
    let mut counts: HashMap<Option<String>, usize> = HashMap::new();
    for r in &replies {
        *counts.entry(ballot(&r.verdict)).or_default() += 1;
    }
    let start = |b: &Option<String>| match b {
        Some(t) => response.find(t.as_str()).unwrap_or(usize::MAX - 1),
        None => usize::MAX,
    };
    let (winner, votes) = counts
        .iter()
        .max_by(|(a, ca), (b, cb)| ca.cmp(cb).then_with(|| start(b).cmp(&start(a))))
        .map(|(b, c)| (b.clone(), *c))
        .expect("at least one reply");
    let usage = Usage {
        input_tokens: replies.iter().map(|r| r.usage.input_tokens).sum(),
        output_tokens: replies.iter().map(|r| r.usage.output_tokens).sum(),
        latency: replies
            .iter()
            .map(|r| r.usage.latency)
            .max()
            .unwrap_or_default(),
        cost_usd: replies.iter().map(|r| r.usage.cost_usd).sum(),
        attempts: replies.iter().map(|r| r.usage.attempts).sum(),
        cached: replies.iter().all(|r| r.usage.cached),
    };
    let chosen = replies
        .into_iter()
        .find(|r| ballot(&r.verdict) == winner)
        .expect("the winner was voted for");
    Ok(OracleReply {
        raw: format!("{} ({votes} of {n} votes)", chosen.raw),
        usage,
        ..chosen
    })
}

/// An oracle asked `votes` times per request, answering with the [`majority`].
pub struct VotingOracle {
    pub inner: Arc<dyn Oracle>,
    pub votes: usize,
    model: String,
}

impl VotingOracle {
    pub fn new(inner: Arc<dyn Oracle>, votes: usize) -> Self {
        let model = format!("{} x{votes} votes", inner.model());
        Self {
            inner,
            votes: votes.max(1),
            model,
        }
    }
}

#[async_trait::async_trait]
impl Oracle for VotingOracle {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn model(&self) -> &str {
        &self.model
    }
    async fn first_error(&self, req: &OracleRequest) -> OracleOutcome {
        // the samples run at once; a remote oracle holds its own concurrency limit
        let mut set = tokio::task::JoinSet::new();
        for i in 0..self.votes {
            let (inner, req) = (self.inner.clone(), req.clone());
            set.spawn(async move { (i, inner.sample(&req, i).await) });
        }
        let mut outcomes = vec![None; self.votes];
        while let Some(done) = set.join_next().await {
            let (i, o) = done.expect("an oracle sample panicked");
            outcomes[i] = Some(o);
        }
        majority(outcomes.into_iter().flatten().collect(), &req.response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OracleFailure;
    use std::time::Duration;

    const R: &str = "She sells 3 * 6 = 16 muffins. So 24 - 16 = 8 muffins are left.\n#### 8";

    fn reply(v: Verdict, tokens: u64, ms: u64) -> OracleOutcome {
        Ok(OracleReply {
            raw: format!("{v:?}"),
            verdict: v,
            usage: Usage {
                input_tokens: tokens,
                output_tokens: 1,
                latency: Duration::from_millis(ms),
                cost_usd: 0.5,
                attempts: 1,
                cached: false,
            },
        })
    }

    fn seg(t: &str) -> Verdict {
        Verdict::Segment {
            text: t.into(),
            range: None,
        }
    }

    #[test]
    fn the_span_most_samples_name_wins_up_to_punctuation() {
        let r = majority(
            vec![
                reply(seg("24 - 16 = 8"), 10, 5),
                reply(seg("3 * 6 = 16."), 10, 9),
                reply(seg(" 3 * 6 = 16"), 10, 7),
                reply(Verdict::NoError, 10, 1),
            ],
            R,
        )
        .unwrap();
        assert_eq!(r.verdict, seg("3 * 6 = 16."));
        assert!(r.raw.ends_with("(2 of 4 votes)"), "{}", r.raw);
        assert_eq!(r.usage.input_tokens, 40);
        assert_eq!(r.usage.latency, Duration::from_millis(9));
        assert!((r.usage.cost_usd - 2.0).abs() < 1e-12);
    }

    #[test]
    fn ties_go_to_the_earliest_span_then_to_a_span_over_no_error() {
        let r = majority(
            vec![
                reply(seg("24 - 16 = 8"), 1, 1),
                reply(seg("3 * 6 = 16"), 1, 1),
            ],
            R,
        )
        .unwrap();
        assert_eq!(r.verdict, seg("3 * 6 = 16"));
        let r = majority(
            vec![
                reply(Verdict::NoError, 1, 1),
                reply(seg("24 - 16 = 8"), 1, 1),
            ],
            R,
        )
        .unwrap();
        assert_eq!(r.verdict, seg("24 - 16 = 8"));
        let r = majority(
            vec![
                reply(Verdict::NoError, 1, 1),
                reply(Verdict::NoError, 1, 1),
                reply(seg("24 - 16 = 8"), 1, 1),
            ],
            R,
        )
        .unwrap();
        assert_eq!(r.verdict, Verdict::NoError);
    }

    #[test]
    fn voting_is_refused_where_every_vote_would_be_the_same() {
        use crate::{OracleSpec, Provider};
        let err = |spec: OracleSpec| spec.build().err().unwrap_or_default();
        let judge = OracleSpec {
            provider: Provider::Openai,
            base_url: Some("http://127.0.0.1:9/v1".into()),
            votes: 3,
            ..OracleSpec::default()
        };
        assert!(judge.build().is_ok());
        let calculator = OracleSpec {
            provider: Provider::Calculator,
            ..judge.clone()
        };
        assert!(err(calculator).contains("voting needs a sampling judge"));
        let greedy = OracleSpec {
            temperature: Some(0.0),
            ..judge.clone()
        };
        assert!(err(greedy).contains("at temperature 0"));
        let hot = OracleSpec {
            temperature: Some(3.0),
            ..judge.clone()
        };
        assert!(err(hot).contains("oracle.temperature must be in [0, 2]"));
        let none = OracleSpec { votes: 0, ..judge };
        assert!(err(none).contains("at least 1"));
    }

    #[test]
    fn failed_samples_do_not_vote_and_all_failed_is_a_failure() {
        let timeout = || Err(OracleFailure::Timeout { attempts: 3 });
        let r = majority(
            vec![timeout(), reply(seg("24 - 16 = 8"), 1, 1), timeout()],
            R,
        )
        .unwrap();
        assert_eq!(r.verdict, seg("24 - 16 = 8"));
        assert!(r.raw.ends_with("(1 of 3 votes)"));
        assert_eq!(
            majority(vec![timeout(), timeout()], R).unwrap_err(),
            OracleFailure::Timeout { attempts: 3 }
        );
    }
}
