//! First-error oracles: given a question, the reference worked solution and an
//! incorrect response, name the first erroneous segment of the response.
//!
//! One async trait, [`Oracle`], with four providers:
//!
//! - [`calculator::CalculatorOracle`] (offline, default): the first false arithmetic
//!   claim of the response. Exact, free, instant.
//! - [`reference::ReferenceOracle`] (offline): the first step whose result is not among
//!   the reference solution's values.
//! - [`remote::RemoteOracle`] with [`remote::Api::OpenAi`] (Chat Completions, any
//!   compatible server) or [`remote::Api::Gemini`] (`generateContent`): concurrency
//!   limit, timeout, retries with backoff that honour `Retry-After`, a cost budget and a
//!   SQLite cache, so that a rerun never pays twice.
//!
//! Two wrappers go around any of them: [`vote::VotingOracle`] (the majority of several
//! sampled answers) and [`noise::NoisyOracle`] (answers degraded on purpose).
//!
//! Nothing here panics on bad replies: every failure is a typed [`OracleFailure`] that
//! the trainer counts and falls back from. [`locate_error`] runs an oracle and the
//! locate stage together and returns one [`SpanOutcome`].

pub mod arith;
pub mod bench;
pub mod cache;
pub mod calculator;
pub mod noise;
pub mod prompt;
pub mod reference;
pub mod remote;
pub mod vote;

use cal_core::locate::{locate, LocateConfig, Located, Method, NotLocated};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::time::Duration;

/// What the oracle is asked about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OracleRequest {
    pub question: String,
    /// The full reference worked solution (GSM8K `answer`), not only the final number.
    pub reference: String,
    /// The incorrect response.
    pub response: String,
}

/// The oracle's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Verdict {
    /// The first erroneous segment, as text quoted from the response. Offline oracles
    /// also give its exact byte range.
    Segment {
        text: String,
        range: Option<Range<usize>>,
    },
    /// The oracle found no error.
    NoError,
}

/// Cost and timing of one oracle answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub latency: Duration,
    /// Estimated USD (0 for offline oracles and unknown models).
    pub cost_usd: f64,
    /// HTTP attempts made (0 for offline oracles and cache hits).
    pub attempts: u32,
    pub cached: bool,
}

/// A successful oracle answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OracleReply {
    pub verdict: Verdict,
    /// The oracle's raw reply text (model output; never contains credentials).
    pub raw: String,
    pub usage: Usage,
}

/// Why an oracle gave no usable answer. Training goes on; the rollout falls back to
/// its outcome advantage and the failure is counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "failure", rename_all = "kebab-case")]
pub enum OracleFailure {
    #[error("timed out after {attempts} attempt(s)")]
    Timeout { attempts: u32 },
    #[error("HTTP {status} after {attempts} attempt(s): {message}")]
    Http {
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("authentication rejected (HTTP {status}); check the API key")]
    Auth { status: u16 },
    #[error("connection failed after {attempts} attempt(s): {message}")]
    Connection { attempts: u32, message: String },
    #[error("reply body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unusable reply: {reason}")]
    BadReply { reason: String, raw: String },
    #[error("cost budget of ${limit:.4} spent")]
    Budget { limit: f64 },
    #[error("missing API key: set {var} in the environment or .env")]
    MissingKey { var: String },
}

impl OracleFailure {
    /// Short stable name for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Http { .. } => "http",
            Self::Auth { .. } => "auth",
            Self::Connection { .. } => "connection",
            Self::TooLarge { .. } => "too-large",
            Self::BadReply { .. } => "bad-reply",
            Self::Budget { .. } => "budget",
            Self::MissingKey { .. } => "missing-key",
        }
    }
}

pub type OracleOutcome = Result<OracleReply, OracleFailure>;

/// A first-error oracle.
#[async_trait::async_trait]
pub trait Oracle: Send + Sync {
    /// Provider name (`calculator`, `reference`, `openai`, `gemini`).
    fn provider(&self) -> &str;
    /// Model name (the provider name for offline oracles).
    fn model(&self) -> &str;
    /// Names the first erroneous segment of `req.response`.
    async fn first_error(&self, req: &OracleRequest) -> OracleOutcome;
    /// The `vote`-th independent sample of the answer, for voting
    /// ([`vote::VotingOracle`]). An oracle that samples at a temperature gives each
    /// vote its own request and cache entry; a deterministic one answers the same.
    async fn sample(&self, req: &OracleRequest, vote: usize) -> OracleOutcome {
        let _ = vote;
        self.first_error(req).await
    }
}

/// The reply of an offline (free, instant) oracle: its verdict, serialised as the raw reply.
pub fn offline_reply(verdict: Verdict, started: std::time::Instant) -> OracleOutcome {
    Ok(OracleReply {
        raw: serde_json::to_string(&verdict).unwrap_or_default(),
        verdict,
        usage: Usage {
            latency: started.elapsed(),
            ..Usage::default()
        },
    })
}

/// The result of oracle + locate for one incorrect rollout.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum SpanOutcome {
    /// Byte range of the first error in the response.
    Located {
        located: Located,
        segment: String,
        usage: Usage,
    },
    /// The oracle saw no error (e.g. the slip is not arithmetic).
    NoError { usage: Usage },
    /// The oracle quoted text that is not in the response.
    NotLocated {
        reason: NotLocated,
        segment: String,
        usage: Usage,
    },
    /// The oracle failed.
    Failed { failure: OracleFailure },
}

impl SpanOutcome {
    pub fn range(&self) -> Option<Range<usize>> {
        match self {
            Self::Located { located, .. } => Some(located.start..located.end),
            _ => None,
        }
    }

    pub fn usage(&self) -> Option<&Usage> {
        match self {
            Self::Located { usage, .. }
            | Self::NoError { usage }
            | Self::NotLocated { usage, .. } => Some(usage),
            Self::Failed { .. } => None,
        }
    }
}

/// Asks `oracle` and locates its segment in the response.
pub async fn locate_error(
    oracle: &dyn Oracle,
    req: &OracleRequest,
    cfg: &LocateConfig,
) -> SpanOutcome {
    match oracle.first_error(req).await {
        Err(failure) => SpanOutcome::Failed { failure },
        Ok(OracleReply {
            verdict: Verdict::NoError,
            usage,
            ..
        }) => SpanOutcome::NoError { usage },
        Ok(OracleReply {
            verdict: Verdict::Segment { text, range },
            usage,
            ..
        }) => {
            // An offline oracle's exact range is trusted when it really holds the text.
            if let Some(r) = range.filter(|r| req.response.get(r.clone()) == Some(text.as_str())) {
                let located = Located {
                    start: r.start,
                    end: r.end,
                    method: Method::Exact,
                    similarity: 1.0,
                };
                return SpanOutcome::Located {
                    located,
                    segment: text,
                    usage,
                };
            }
            match locate(&req.response, &text, cfg) {
                Ok(located) => SpanOutcome::Located {
                    located,
                    segment: text,
                    usage,
                },
                Err(reason) => SpanOutcome::NotLocated {
                    reason,
                    segment: text,
                    usage,
                },
            }
        }
    }
}

/// Runs [`locate_error`] for many requests concurrently (remote oracles bound their
/// own concurrency), keeping the input order.
pub async fn locate_all(
    oracle: std::sync::Arc<dyn Oracle>,
    reqs: Vec<OracleRequest>,
    cfg: LocateConfig,
) -> Vec<SpanOutcome> {
    let mut set = tokio::task::JoinSet::new();
    for (i, req) in reqs.into_iter().enumerate() {
        let oracle = oracle.clone();
        set.spawn(async move { (i, locate_error(oracle.as_ref(), &req, &cfg).await) });
    }
    let mut out: Vec<Option<SpanOutcome>> = vec![None; set.len()];
    while let Some(res) = set.join_next().await {
        match res {
            Ok((i, outcome)) => out[i] = Some(outcome),
            Err(e) => tracing::error!("oracle task failed: {e}"),
        }
    }
    out.into_iter()
        .map(|o| {
            o.unwrap_or(SpanOutcome::Failed {
                failure: OracleFailure::BadReply {
                    reason: "oracle task panicked".into(),
                    raw: String::new(),
                },
            })
        })
        .collect()
}

/// Which oracle names the first error of an incorrect rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// OpenAI Chat Completions or any compatible server.
    Openai,
    /// Google Gemini `generateContent`.
    Gemini,
    /// Offline: checks every arithmetic step of the response.
    Calculator,
    /// Offline: first step whose value is not in the reference solution.
    Reference,
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Gemini => "gemini",
            Self::Calculator => "calculator",
            Self::Reference => "reference",
        }
    }

    /// The model a provider uses when none is configured.
    pub fn default_model(&self) -> &'static str {
        match self {
            Self::Openai => "gpt-4o-mini",
            Self::Gemini => "gemini-2.0-flash",
            Self::Calculator => "calculator",
            Self::Reference => "reference",
        }
    }
}

/// How to build an oracle: the `[oracle]` section of a run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct OracleSpec {
    pub provider: Provider,
    /// Model for remote providers (`None`: the provider's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Base URL of an OpenAI-compatible server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Stop calling a paid oracle after this many USD (estimated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<f64>,
    /// Concurrent requests.
    pub concurrency: usize,
    /// Per-request timeout in seconds.
    pub timeout: f64,
    /// SQLite cache file for remote replies (`None`: no cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<std::path::PathBuf>,
    /// Degrade the oracle's answers on purpose (`miss=P,shift=P,random=P,false-alarm=P`;
    /// see [`noise::Noise`]): for measuring how CAL's gain depends on oracle quality.
    #[serde(skip_serializing_if = "noise::Noise::is_zero")]
    pub noise: noise::Noise,
    /// Ask a remote judge this many times per request and keep the span most samples
    /// agree on ([`vote::VotingOracle`]).
    #[serde(skip_serializing_if = "is_one")]
    pub votes: usize,
    /// Sampling temperature of a remote judge (`None`: 0 for one vote, 0.7 for several).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Show a remote judge the prompt's worked examples (few-shot) before the request.
    #[serde(skip_serializing_if = "is_true")]
    pub few_shot: bool,
    /// Ask a remote judge for JSON output (`response_format` / `responseMimeType`).
    #[serde(skip_serializing_if = "is_true")]
    pub json_mode: bool,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for OracleSpec {
    fn default() -> Self {
        Self {
            provider: Provider::Calculator,
            model: None,
            base_url: None,
            max_cost: None,
            concurrency: 8,
            timeout: 60.0,
            cache: None,
            noise: noise::Noise::default(),
            votes: 1,
            temperature: None,
            few_shot: true,
            json_mode: true,
        }
    }
}

impl OracleSpec {
    /// The model asked: the configured one or the provider's default.
    pub fn model_name(&self) -> &str {
        self.model
            .as_deref()
            .unwrap_or(self.provider.default_model())
    }

    /// Builds the oracle; remote providers read their key from the environment or `.env`.
    pub fn build(&self) -> Result<std::sync::Arc<dyn Oracle>, String> {
        let mut oracle = self.build_exact()?;
        if self.votes == 0 {
            return Err("oracle.votes must be at least 1".into());
        }
        if self.votes > 1 {
            if !matches!(self.provider, Provider::Openai | Provider::Gemini) {
                return Err(format!(
                    "oracle.votes = {}: voting needs a sampling judge (openai or gemini); the {} oracle answers the same every time",
                    self.votes,
                    self.provider.name()
                ));
            }
            oracle = std::sync::Arc::new(vote::VotingOracle::new(oracle, self.votes));
        }
        self.noise.check()?;
        Ok(match self.noise.is_zero() {
            true => oracle,
            false => std::sync::Arc::new(noise::NoisyOracle::new(oracle, self.noise)),
        })
    }

    fn build_exact(&self) -> Result<std::sync::Arc<dyn Oracle>, String> {
        use remote::{Api, RemoteConfig, RemoteOracle};
        let api = match self.provider {
            Provider::Calculator => return Ok(std::sync::Arc::new(calculator::CalculatorOracle)),
            Provider::Reference => return Ok(std::sync::Arc::new(reference::ReferenceOracle)),
            Provider::Openai => Api::OpenAi,
            Provider::Gemini => Api::Gemini,
        };
        let cache = match &self.cache {
            Some(p) => Some(std::sync::Arc::new(
                cache::Cache::open(p).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let temperature = self
            .temperature
            .unwrap_or(if self.votes > 1 { 0.7 } else { 0.0 });
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!(
                "oracle.temperature must be in [0, 2], got {temperature}"
            ));
        }
        if self.votes > 1 && temperature == 0.0 {
            return Err(format!(
                "oracle.votes = {} at temperature 0: every vote would be the same reply; set oracle.temperature above 0",
                self.votes
            ));
        }
        let cfg = RemoteConfig {
            base_url: self.base_url.clone(),
            few_shot: self.few_shot,
            json_mode: self.json_mode,
            temperature,
            max_cost: self.max_cost,
            concurrency: self.concurrency.max(1),
            timeout: Duration::from_secs_f64(self.timeout.max(0.001)),
            ..RemoteConfig::default()
        };
        let key = remote::key_from_env(api.key_var());
        Ok(std::sync::Arc::new(RemoteOracle::new(
            api,
            self.model_name(),
            key,
            cfg,
            cache,
        )))
    }
}
