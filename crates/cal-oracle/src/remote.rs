//! LLM oracles over HTTP: OpenAI Chat Completions (any compatible server: vLLM,
//! llama.cpp, Ollama, LiteLLM) and Gemini `generateContent`.
//!
//! Every call goes through the same robust path: a concurrency limit, a per-request
//! timeout, retries with exponential backoff and full jitter that honour `Retry-After`
//! (429, 5xx, timeouts and connection errors; never 400/401/403), a body-size cap, a
//! cost budget, and the SQLite cache. The API key is sent in a header, never in the
//! URL, and is redacted from every message that could reach a log.

use crate::cache::{self, Cache};
use crate::prompt::{self, PROMPT_VERSION};
use crate::{Oracle, OracleFailure, OracleOutcome, OracleReply, OracleRequest, Usage};
use rand::Rng;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Which wire format to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Gemini,
}

impl Api {
    pub fn name(&self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Gemini => "gemini",
        }
    }

    pub fn default_base_url(&self) -> &'static str {
        match self {
            Self::OpenAi => "https://api.openai.com/v1",
            Self::Gemini => "https://generativelanguage.googleapis.com/v1beta",
        }
    }

    /// Environment variable holding the key.
    pub fn key_var(&self) -> &'static str {
        match self {
            Self::OpenAi => "OPENAI_API_KEY",
            Self::Gemini => "GEMINI_API_KEY",
        }
    }
}

/// Robustness and budget knobs.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub base_url: Option<String>,
    pub timeout: Duration,
    /// Total attempts per request, first one included.
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; longer waits are cut to this.
    pub max_retry_after: Duration,
    pub concurrency: usize,
    pub max_body_bytes: usize,
    pub max_output_tokens: u32,
    /// Stop calling once this many USD are spent (estimated).
    pub max_cost: Option<f64>,
    /// USD per million (input, output) tokens; default from a table of known models.
    pub price_per_million: Option<(f64, f64)>,
    /// Ask for JSON output (`response_format` / `responseMimeType`).
    pub json_mode: bool,
    /// Show the worked examples as chat turns before the request.
    pub few_shot: bool,
    /// Sampling temperature (0: the most likely reply; above 0 for voting).
    pub temperature: f64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            base_url: None,
            timeout: Duration::from_secs(60),
            max_attempts: 5,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
            concurrency: 8,
            max_body_bytes: 1 << 20,
            max_output_tokens: 256,
            max_cost: None,
            price_per_million: None,
            json_mode: true,
            few_shot: true,
            temperature: 0.0,
        }
    }
}

/// Published prices (USD per million input, output tokens) of common oracle models.
pub fn known_price(model: &str) -> Option<(f64, f64)> {
    const TABLE: [(&str, f64, f64); 9] = [
        ("gpt-4o-mini", 0.15, 0.60),
        ("gpt-4o", 2.50, 10.00),
        ("gpt-4.1-nano", 0.10, 0.40),
        ("gpt-4.1-mini", 0.40, 1.60),
        ("gpt-4.1", 2.00, 8.00),
        ("gemini-2.0-flash", 0.10, 0.40),
        ("gemini-2.5-flash", 0.30, 2.50),
        ("gemini-2.5-pro", 1.25, 10.00),
        ("gemini-1.5-flash", 0.075, 0.30),
    ];
    // longest prefix first so that "gpt-4o-mini-2024-07-18" is not priced as gpt-4o
    TABLE
        .iter()
        .filter(|(name, _, _)| model.starts_with(name))
        .max_by_key(|(name, _, _)| name.len())
        .map(|(_, i, o)| (*i, *o))
}

/// Reads `var` from the environment, after loading `.env` from the working directory.
pub fn key_from_env(var: &str) -> Option<String> {
    let _ = dotenvy::dotenv();
    std::env::var(var).ok().filter(|k| !k.trim().is_empty())
}

/// An HTTP oracle.
pub struct RemoteOracle {
    api: Api,
    model: String,
    base_url: String,
    key: Option<String>,
    cfg: RemoteConfig,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    spent: Mutex<f64>,
    cache: Option<Arc<Cache>>,
}

enum Attempt {
    Done(OracleOutcome),
    Retry {
        failure: OracleFailure,
        wait: Option<Duration>,
    },
}

impl RemoteOracle {
    /// `key` may be `None` for a local OpenAI-compatible server that needs none.
    pub fn new(
        api: Api,
        model: &str,
        key: Option<String>,
        cfg: RemoteConfig,
        cache: Option<Arc<Cache>>,
    ) -> Self {
        let base_url = cfg
            .base_url
            .clone()
            .unwrap_or_else(|| api.default_base_url().to_string())
            .trim_end_matches('/')
            .to_string();
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .build()
            .expect("reqwest client");
        Self {
            api,
            model: model.to_string(),
            base_url,
            key,
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            cfg,
            client,
            spent: Mutex::new(0.0),
            cache,
        }
    }

    /// Estimated USD spent so far by this oracle (cache hits are free).
    pub fn spent(&self) -> f64 {
        *self.spent.lock().unwrap()
    }

    fn redact(&self, s: &str) -> String {
        match &self.key {
            Some(k) if k.len() >= 4 => s.replace(k.as_str(), "[REDACTED]"),
            _ => s.to_string(),
        }
    }

    /// The prompt variant, in the cache key: the prompt's version, then whatever differs
    /// from the default request (zero-shot, plain text, a temperature, the vote index),
    /// so that the default's cache entries stay valid and no variant reads another's.
    fn variant(&self, vote: usize) -> String {
        let mut v = PROMPT_VERSION.to_string();
        if !self.cfg.few_shot {
            v += "|zero-shot";
        }
        if !self.cfg.json_mode {
            v += "|plain";
        }
        if self.cfg.temperature != 0.0 {
            v += &format!("|t={}", self.cfg.temperature);
        }
        if vote > 0 {
            v += &format!("|vote={vote}");
        }
        v
    }

    fn request(&self, req: &OracleRequest, json_mode: bool) -> reqwest::RequestBuilder {
        let msgs = prompt::messages(req, self.cfg.few_shot);
        // 0 as the integer it always was on the wire; a sampling temperature as a float
        let temperature = match self.cfg.temperature {
            0.0 => json!(0),
            t => json!(t),
        };
        match self.api {
            Api::OpenAi => {
                let messages: Vec<Value> = msgs
                    .iter()
                    .map(|(r, c)| json!({"role": r, "content": c}))
                    .collect();
                let mut body = json!({
                    "model": self.model,
                    "messages": messages,
                    "temperature": temperature,
                    "max_tokens": self.cfg.max_output_tokens,
                });
                if json_mode {
                    body["response_format"] = json!({"type": "json_object"});
                }
                let mut rb = self
                    .client
                    .post(format!("{}/chat/completions", self.base_url))
                    .json(&body);
                if let Some(k) = &self.key {
                    rb = rb.bearer_auth(k);
                }
                rb
            }
            Api::Gemini => {
                let contents: Vec<Value> = msgs[1..]
                    .iter()
                    .map(|(r, c)| json!({"role": if *r == "assistant" { "model" } else { "user" }, "parts": [{"text": c}]}))
                    .collect();
                let mut gen = json!({"temperature": temperature, "maxOutputTokens": self.cfg.max_output_tokens});
                if json_mode {
                    gen["responseMimeType"] = json!("application/json");
                    gen["responseSchema"] = json!({
                        "type": "OBJECT",
                        "properties": {"first_error": {"type": "STRING", "nullable": true}},
                        "required": ["first_error"]
                    });
                }
                let body = json!({
                    "systemInstruction": {"parts": [{"text": msgs[0].1}]},
                    "contents": contents,
                    "generationConfig": gen,
                });
                let mut rb = self
                    .client
                    .post(format!(
                        "{}/models/{}:generateContent",
                        self.base_url, self.model
                    ))
                    .json(&body);
                if let Some(k) = &self.key {
                    rb = rb.header("x-goog-api-key", k);
                }
                rb
            }
        }
    }

    /// Extracts (text, input tokens, output tokens) from a success body.
    fn parse_body(&self, body: &Value) -> Result<(String, u64, u64), String> {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        match self.api {
            Api::OpenAi => {
                let text = body["choices"][0]["message"]["content"]
                    .as_str()
                    .ok_or("no choices[0].message.content in the reply")?;
                Ok((
                    text.to_string(),
                    u(&body["usage"]["prompt_tokens"]),
                    u(&body["usage"]["completion_tokens"]),
                ))
            }
            Api::Gemini => {
                let parts = body["candidates"][0]["content"]["parts"]
                    .as_array()
                    .ok_or_else(|| match body["promptFeedback"]["blockReason"].as_str() {
                        Some(r) => format!("prompt blocked: {r}"),
                        None => "no candidates[0].content.parts in the reply".to_string(),
                    })?;
                let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
                let meta = &body["usageMetadata"];
                Ok((
                    text,
                    u(&meta["promptTokenCount"]),
                    u(&meta["candidatesTokenCount"]),
                ))
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .cfg
            .base_backoff
            .saturating_mul(1u32 << (attempt - 1).min(16));
        let cap = exp.min(self.cfg.max_backoff);
        // full jitter: uniform in [0, cap]
        cap.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    async fn read_capped(&self, mut resp: reqwest::Response) -> Result<Vec<u8>, OracleFailure> {
        let limit = self.cfg.max_body_bytes;
        if resp.content_length().is_some_and(|n| n as usize > limit) {
            return Err(OracleFailure::TooLarge { limit });
        }
        let mut buf = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > limit {
                        return Err(OracleFailure::TooLarge { limit });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(buf),
                Err(e) if e.is_timeout() => return Err(OracleFailure::Timeout { attempts: 0 }),
                Err(e) => {
                    return Err(OracleFailure::Connection {
                        attempts: 0,
                        message: self.redact(&e.without_url().to_string()),
                    })
                }
            }
        }
    }

    async fn attempt(
        &self,
        req: &OracleRequest,
        json_mode: bool,
        t0: Instant,
        attempt: u32,
    ) -> Attempt {
        let resp = match self.request(req, json_mode).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry {
                    failure: OracleFailure::Timeout { attempts: attempt },
                    wait: None,
                }
            }
            Err(e) => {
                return Attempt::Retry {
                    failure: OracleFailure::Connection {
                        attempts: attempt,
                        message: self.redact(&e.without_url().to_string()),
                    },
                    wait: None,
                }
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s).min(self.cfg.max_retry_after));
        let body = match self.read_capped(resp).await {
            Ok(b) => b,
            Err(OracleFailure::Timeout { .. }) => {
                return Attempt::Retry {
                    failure: OracleFailure::Timeout { attempts: attempt },
                    wait: None,
                }
            }
            Err(OracleFailure::Connection { message, .. }) => {
                return Attempt::Retry {
                    failure: OracleFailure::Connection {
                        attempts: attempt,
                        message,
                    },
                    wait: None,
                }
            }
            Err(f) => return Attempt::Done(Err(f)),
        };
        let text = String::from_utf8_lossy(&body);
        match status {
            200..=299 => {}
            401 | 403 => return Attempt::Done(Err(OracleFailure::Auth { status })),
            429 | 500..=599 => {
                return Attempt::Retry {
                    failure: OracleFailure::Http {
                        status,
                        attempts: attempt,
                        message: self.redact(&prompt::excerpt(&text)),
                    },
                    wait: retry_after,
                }
            }
            _ => {
                return Attempt::Done(Err(OracleFailure::Http {
                    status,
                    attempts: attempt,
                    message: self.redact(&prompt::excerpt(&text)),
                }))
            }
        }
        let bad = |reason: String| {
            Attempt::Done(Err(OracleFailure::BadReply {
                reason,
                raw: self.redact(&prompt::excerpt(&text)),
            }))
        };
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return bad(format!("response body is not JSON: {e}")),
        };
        let (content, input_tokens, output_tokens) = match self.parse_body(&value) {
            Ok(x) => x,
            Err(reason) => return bad(reason),
        };
        let verdict = match prompt::parse_reply(&content) {
            Ok(v) => v,
            Err(reason) => {
                return Attempt::Done(Err(OracleFailure::BadReply {
                    reason,
                    raw: self.redact(&prompt::excerpt(&content)),
                }))
            }
        };
        let (pin, pout) = self
            .cfg
            .price_per_million
            .or_else(|| known_price(&self.model))
            .unwrap_or((0.0, 0.0));
        let cost_usd = (input_tokens as f64 * pin + output_tokens as f64 * pout) / 1e6;
        Attempt::Done(Ok(OracleReply {
            verdict,
            raw: self.redact(&content),
            usage: Usage {
                input_tokens,
                output_tokens,
                latency: t0.elapsed(),
                cost_usd,
                attempts: attempt,
                cached: false,
            },
        }))
    }
}

#[async_trait::async_trait]
impl Oracle for RemoteOracle {
    fn provider(&self) -> &str {
        self.api.name()
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn first_error(&self, req: &OracleRequest) -> OracleOutcome {
        self.sample(req, 0).await
    }

    async fn sample(&self, req: &OracleRequest, vote: usize) -> OracleOutcome {
        let t0 = Instant::now();
        let variant = self.variant(vote);
        let key = cache::key(self.api.name(), &self.model, &self.base_url, &variant, req);
        if let Some(mut hit) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            hit.usage = Usage {
                latency: t0.elapsed(),
                cost_usd: 0.0,
                attempts: 0,
                cached: true,
                ..hit.usage
            };
            return Ok(hit);
        }
        if self.key.is_none() && self.base_url == self.api.default_base_url() {
            return Err(OracleFailure::MissingKey {
                var: self.api.key_var().into(),
            });
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        // latency is the judge's: from the first send (retries included), not the time a
        // request waited here for one of the `concurrency` slots
        let t0 = Instant::now();
        let mut json_mode = self.cfg.json_mode;
        let mut last = OracleFailure::Timeout { attempts: 0 };
        for attempt in 1..=self.cfg.max_attempts.max(1) {
            if let Some(limit) = self.cfg.max_cost {
                if self.spent() >= limit {
                    return Err(OracleFailure::Budget { limit });
                }
            }
            match self.attempt(req, json_mode, t0, attempt).await {
                Attempt::Done(Ok(reply)) => {
                    *self.spent.lock().unwrap() += reply.usage.cost_usd;
                    if let Some(c) = &self.cache {
                        c.put(&key, self.api.name(), &self.model, &variant, &reply);
                    }
                    return Ok(reply);
                }
                // Some compatible servers reject `response_format`: ask again in plain mode.
                Attempt::Done(Err(OracleFailure::Http {
                    status: 400,
                    message,
                    ..
                })) if json_mode
                    && (message.contains("response_format")
                        || message.contains("responseMimeType")) =>
                {
                    json_mode = false;
                    last = OracleFailure::Http {
                        status: 400,
                        attempts: attempt,
                        message,
                    };
                }
                Attempt::Done(Err(f)) => return Err(f),
                Attempt::Retry { failure, wait } => {
                    tracing::debug!(attempt, "oracle attempt failed: {failure}");
                    last = failure;
                    if attempt < self.cfg.max_attempts {
                        tokio::time::sleep(wait.unwrap_or_else(|| self.backoff(attempt))).await;
                    }
                }
            }
        }
        Err(last)
    }
}
