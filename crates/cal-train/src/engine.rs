//! Rollouts on a serving engine: vLLM's OpenAI-compatible `/v1/completions`.
//!
//! Prompts go out as token ids and completions come back as token ids with the engine's
//! sampling log-probs (`logprobs: 0`, `return_tokens_as_token_ids`), so nothing is
//! re-tokenised: a different split of the same text would change the log-probs the
//! loss sees. Several URLs are data-parallel replicas: a step's prompts are spread over
//! them, and a server that errors is retried with backoff, its prompts going to the
//! others; with none left the step fails with the servers named (the run then stops
//! with its last checkpoint, never training on a partial group).
//!
//! Weights reach the engine as LoRA adapters in PEFT's format, hot-loaded after every
//! optimizer step under a new name (`<run>-step-N`), the requests naming it, the
//! previous one unloaded (vLLM's runtime LoRA loading, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).

use anyhow::{anyhow, bail, Context, Result};
use cal_model::generate::{decode_with_offsets, FinishReason, Generation};
use cal_model::tokenizer::TokenizerBundle;
use cal_model::Transformer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Sampling settings of one step's requests.
#[derive(Debug, Clone, Copy)]
pub struct EngineSampling {
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
}

/// A client of one or more vLLM servers serving the same base model.
pub struct VllmEngine {
    urls: Vec<String>,
    client: reqwest::Client,
    /// The served base model's name (from `/v1/models`).
    base: String,
    /// The adapter the requests name, once one is loaded.
    adapter: Option<String>,
    /// Where adapters are written for the servers to read.
    sync_dir: PathBuf,
    /// Names this run's adapters (`<tag>-step-N`), so that runs sharing a server, such
    /// as an experiment's two arms, never replace each other's.
    tag: String,
}

/// One completion with the engine's log-prob of each of its tokens.
pub struct EngineCompletion {
    pub generation: Generation,
    pub logprobs: Vec<f32>,
}

const ATTEMPTS_PER_SERVER: usize = 2;

impl VllmEngine {
    /// Connects to `urls` (each `http://host:port`, with or without `/v1`) and reads the
    /// base model each serves; they must agree. A server that does not answer is left
    /// out with a warning; none answering is an error naming them all.
    pub async fn connect(
        urls: &[String],
        sync_dir: PathBuf,
        tag: &str,
        timeout: Duration,
    ) -> Result<Self> {
        if urls.is_empty() {
            bail!("rollout.engine = \"vllm\" needs at least one server URL (--rollout-url)");
        }
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim_end_matches('/').trim_end_matches("/v1").to_string())
            .collect();
        let mut base: Option<String> = None;
        let (mut live, mut down) = (Vec::new(), Vec::new());
        for u in &urls {
            let reply = client
                .get(format!("{u}/v1/models"))
                .send()
                .await
                .and_then(|r| r.error_for_status());
            let v: Value = match reply {
                Ok(r) => r
                    .json()
                    .await
                    .with_context(|| format!("rollout server {u}: /v1/models is not JSON"))?,
                Err(e) => {
                    tracing::warn!("rollout server {u} does not answer, left out: {e}");
                    eprintln!(
                        "warning: rollout server {u} does not answer ({e}); going on without it"
                    );
                    down.push(format!("{u}: {e}"));
                    continue;
                }
            };
            let name = v["data"]
                .as_array()
                .and_then(|d| d.iter().find(|m| m["parent"].is_null()))
                .and_then(|m| m["id"].as_str())
                .ok_or_else(|| anyhow!("rollout server {u}: /v1/models lists no base model"))?
                .to_string();
            match &base {
                Some(b) if *b != name => {
                    bail!("rollout servers serve different models: {b} and {name} ({u})")
                }
                _ => base = Some(name),
            }
            live.push(u.clone());
        }
        if live.is_empty() {
            bail!("no rollout server answers: {}", down.join("; "));
        }
        let urls = live;
        std::fs::create_dir_all(&sync_dir)
            .with_context(|| format!("creating {}", sync_dir.display()))?;
        Ok(Self {
            urls,
            client,
            base: base.unwrap_or_default(),
            adapter: None,
            sync_dir,
            tag: tag.to_string(),
        })
    }

    /// The model name the next requests use: the latest adapter, or the base.
    pub fn served(&self) -> &str {
        self.adapter.as_deref().unwrap_or(&self.base)
    }

    /// `s.n` completions for each prompt, prompt `i` first asked of server `i mod N`.
    /// `seeds[i]` seeds prompt `i`'s request, so a rerun asks for the same samples.
    pub async fn complete(
        &self,
        prompts: &[Vec<u32>],
        seeds: &[u64],
        s: EngineSampling,
        tok: &TokenizerBundle,
    ) -> Result<Vec<Vec<EngineCompletion>>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (p, &seed)) in prompts.iter().zip(seeds).enumerate() {
            let body = json!({
                "model": self.served(),
                "prompt": p,
                "n": s.n,
                "max_tokens": s.max_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "seed": seed,
                "logprobs": 0,
                "return_tokens_as_token_ids": true,
                "skip_special_tokens": false,
            });
            let (client, urls) = (self.client.clone(), self.urls.clone());
            tasks.spawn(async move { (i, post_with_failover(&client, &urls, i, &body).await) });
        }
        let mut replies: Vec<Option<Value>> = vec![None; prompts.len()];
        while let Some(joined) = tasks.join_next().await {
            let (i, reply) = joined.context("rollout request task")?;
            replies[i] = Some(reply?);
        }
        replies
            .into_iter()
            .map(|r| parse_choices(&r.unwrap_or_default(), s.n, tok))
            .collect()
    }

    /// Writes `model`'s adapters for step `step` and hot-loads them on every server;
    /// the previous adapter is unloaded once the new one is everywhere.
    pub async fn sync_lora(&mut self, model: &Transformer, step: usize) -> Result<()> {
        let name = format!("{}-step-{step}", self.tag);
        let dir = self.sync_dir.join(&name);
        cal_model::peft::export_adapter(model, &dir)?;
        let path = std::fs::canonicalize(&dir)?;
        let mut live = Vec::new();
        let mut down = Vec::new();
        for u in &self.urls {
            // in place: a resumed run loads its step again under the same name
            let body = json!({"lora_name": name, "lora_path": path, "load_inplace": true});
            let r = match self
                .client
                .post(format!("{u}/v1/load_lora_adapter"))
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    // a server that went away is left out; the others carry on
                    eprintln!("warning: rollout server {u} is gone ({e}); going on without it");
                    down.push(format!("{u}: {e}"));
                    continue;
                }
            };
            if !r.status().is_success() {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!(
                    "rollout server {u}: loading adapter {name} failed ({status}): {text} \
                     (start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
                );
            }
            live.push(u.clone());
        }
        if live.is_empty() {
            bail!("no rollout server left: {}", down.join("; "));
        }
        self.urls = live;
        if let Some(old) = self.adapter.replace(name) {
            for u in &self.urls {
                // A failed unload only costs the server memory; the next request names the
                // new adapter either way.
                let _ = self
                    .client
                    .post(format!("{u}/v1/unload_lora_adapter"))
                    .json(&json!({"lora_name": old}))
                    .send()
                    .await;
            }
            let _ = std::fs::remove_dir_all(self.sync_dir.join(&old));
        }
        Ok(())
    }
}

/// POSTs `body` to `/v1/completions`, starting at server `first mod N` and moving on
/// to the next on an error, with exponential backoff between rounds.
async fn post_with_failover(
    client: &reqwest::Client,
    urls: &[String],
    first: usize,
    body: &Value,
) -> Result<Value> {
    let mut errors = Vec::new();
    for attempt in 0..urls.len() * ATTEMPTS_PER_SERVER {
        let u = &urls[(first + attempt) % urls.len()];
        if attempt >= urls.len() {
            tokio::time::sleep(Duration::from_millis(250 << (attempt / urls.len()))).await;
        }
        let reply = async {
            let r = client
                .post(format!("{u}/v1/completions"))
                .json(body)
                .send()
                .await?;
            let status = r.status();
            let text = r.text().await?;
            if !status.is_success() {
                bail!("{status}: {}", text.chars().take(300).collect::<String>());
            }
            Ok::<Value, anyhow::Error>(serde_json::from_str(&text)?)
        }
        .await;
        match reply {
            Ok(v) => return Ok(v),
            Err(e) => errors.push(format!("{u}: {e:#}")),
        }
    }
    bail!(
        "every rollout server failed for a prompt: {}",
        errors.join("; ")
    )
}

/// The `n` choices of one reply, in index order, as token ids and log-probs.
fn parse_choices(reply: &Value, n: usize, tok: &TokenizerBundle) -> Result<Vec<EngineCompletion>> {
    let choices = reply["choices"]
        .as_array()
        .ok_or_else(|| anyhow!("rollout reply without choices: {reply}"))?;
    if choices.len() != n {
        bail!("rollout reply has {} choices, asked for {n}", choices.len());
    }
    let mut out: Vec<(u64, EngineCompletion)> = Vec::with_capacity(n);
    for c in choices {
        let lp = &c["logprobs"];
        let (Some(tokens), Some(logprobs)) =
            (lp["tokens"].as_array(), lp["token_logprobs"].as_array())
        else {
            bail!("rollout reply without token log-probs (the server must accept `logprobs`): {c}");
        };
        let ids = tokens
            .iter()
            .map(|t| {
                t.as_str()
                    .and_then(|s| s.strip_prefix("token_id:"))
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| {
                        anyhow!(
                            "rollout token {t} is not `token_id:N` (return_tokens_as_token_ids)"
                        )
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        let logprobs = logprobs
            .iter()
            .map(|x| x.as_f64().map(|v| v as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| anyhow!("rollout log-prob that is not a number: {c}"))?;
        if logprobs.len() != ids.len() {
            bail!(
                "rollout reply: {} tokens but {} log-probs",
                ids.len(),
                logprobs.len()
            );
        }
        let finish = match c["finish_reason"].as_str() {
            Some("stop") => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        let (text, offsets) = decode_with_offsets(tok, &ids)?;
        out.push((
            c["index"].as_u64().unwrap_or(out.len() as u64),
            EngineCompletion {
                generation: Generation {
                    ids,
                    text,
                    offsets,
                    finish,
                },
                logprobs,
            },
        ));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, c)| c).collect())
}
