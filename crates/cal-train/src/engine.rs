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
//! Weights reach the engine after every optimizer step. A LoRA policy goes as an
//! adapter in PEFT's format, hot-loaded under a new name (`<run>-step-N`), the requests
//! naming it, the previous one unloaded (vLLM's runtime LoRA loading,
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`): a few MB per step. A fully fine-tuned one
//! goes as a Hugging Face folder that the servers reload in place
//! (`/collective_rpc` → `reload_weights`, then `/reset_prefix_cache`, both dev routes:
//! `VLLM_SERVER_DEV_MODE=1`): the whole model per step, no restart. After each sync the
//! servers are asked for the log-probs of a fixed completion, which must match the
//! trainer's own within a tolerance ([`VllmEngine::check_served`]): a server that kept
//! old weights is an error, not a silent off-policy run.
//!
//! [`server`] starts and stops a local server when the user gives no URL.

pub mod server;

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
    /// The last weights sent (`<tag>-step-N`), adapter or whole model.
    synced: Option<String>,
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
            synced: None,
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

    /// Sends `model`'s weights after step `step` to every server: its adapter with
    /// LoRA, else the whole model (see the module's doc).
    pub async fn sync(
        &mut self,
        model: &Transformer,
        tok: &TokenizerBundle,
        step: usize,
    ) -> Result<()> {
        if model.lora.is_some() {
            self.sync_lora(model, step).await
        } else {
            self.sync_full(model, tok, step).await
        }
    }

    /// Writes the whole model for step `step` and has every server reload it in place.
    async fn sync_full(
        &mut self,
        model: &Transformer,
        tok: &TokenizerBundle,
        step: usize,
    ) -> Result<()> {
        let name = format!("{}-step-{step}", self.tag);
        let dir = self.sync_dir.join(&name);
        cal_model::load::export_hf_with(model, tok, &dir, true)?;
        let path = std::fs::canonicalize(&dir)?;
        let body = json!({"method": "reload_weights", "kwargs": {"weights_path": path}});
        let hint = "full-weight syncs reload in place through vLLM's dev routes: start the \
                    server with VLLM_SERVER_DEV_MODE=1, or train LoRA (--lora-rank 8)";
        let what = format!("reloading weights from {}", path.display());
        self.post_to_all("/collective_rpc", &body, &what, hint)
            .await?;
        // cached prefixes hold keys and values of the old weights
        self.post_to_all(
            "/reset_prefix_cache",
            &json!({}),
            "resetting the prefix cache",
            hint,
        )
        .await?;
        if let Some(old) = self.synced.replace(name) {
            let _ = std::fs::remove_dir_all(self.sync_dir.join(&old));
        }
        Ok(())
    }

    /// POSTs `body` to `route` on every server. One that does not answer is left out
    /// with a warning and the others carry on; one that answers with an error fails,
    /// with `what` and `hint` in the message; none left is an error naming them.
    async fn post_to_all(
        &mut self,
        route: &str,
        body: &Value,
        what: &str,
        hint: &str,
    ) -> Result<()> {
        let (mut live, mut down) = (Vec::new(), Vec::new());
        for u in &self.urls {
            let r = match self
                .client
                .post(format!("{u}{route}"))
                .json(body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("warning: rollout server {u} is gone ({e}); going on without it");
                    down.push(format!("{u}: {e}"));
                    continue;
                }
            };
            if !r.status().is_success() {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!("rollout server {u}: {what} failed ({status}): {text} ({hint})");
            }
            live.push(u.clone());
        }
        if live.is_empty() {
            bail!("no rollout server left: {}", down.join("; "));
        }
        self.urls = live;
        Ok(())
    }

    /// The servers' log-probs of `completion` after `prompt` (greedy, prompt echoed),
    /// from every server, judged by [`judge_served`] against the trainer's `expected`
    /// (and its `previous`, before the step): the largest mean absolute difference.
    pub async fn check_served(
        &mut self,
        prompt: &[u32],
        completion: &[u32],
        expected: &[f32],
        previous: Option<&[f32]>,
        tol: f64,
    ) -> Result<f64> {
        let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        let body = json!({
            "model": self.served(),
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": true,
            "logprobs": 0,
            "return_tokens_as_token_ids": true,
        });
        let mut worst = 0.0f64;
        let mut down = Vec::new();
        for u in self.urls.clone() {
            let v = match post_with_failover(&self.client, std::slice::from_ref(&u), 0, &body).await
            {
                Ok(v) => v,
                Err(e) => {
                    // gone since the sync (killed): the others carry on, as in a sync
                    eprintln!(
                        "warning: rollout server {u} does not answer ({e:#}); going on without it"
                    );
                    self.urls.retain(|x| *x != u);
                    down.push(format!("{u}: {e:#}"));
                    continue;
                }
            };
            let lp = v["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .ok_or_else(|| {
                    anyhow!("rollout server {u}: echoed reply without log-probs: {v}")
                })?;
            // echoed prompt first (its first token has none), then the one new token
            let got = lp
                .get(prompt.len()..prompt.len() + completion.len())
                .ok_or_else(|| {
                    anyhow!(
                        "rollout server {u}: echoed {} log-probs for {} tokens",
                        lp.len(),
                        ids.len()
                    )
                })?;
            let got = got
                .iter()
                .map(|g| g.as_f64().map_or(f32::NAN, |g| g as f32))
                .collect::<Vec<f32>>();
            let diff = judge_served(&got, expected, previous, tol).map_err(|why| {
                let hint = if self.adapter.is_none() && self.synced.is_some() {
                    " (a fully fine-tuned model with tied embeddings must be served untied, \
                     or vLLM's in-place reload keeps the old output head: \
                     cal-grpo export --untie-embeddings)"
                } else {
                    ""
                };
                anyhow!(
                    "rollout server {u} does not serve the trainer's weights after the sync of {}: {why}{hint}",
                    self.synced.as_deref().unwrap_or("the base"),
                )
            })?;
            worst = worst.max(diff);
        }
        if self.urls.is_empty() {
            bail!("no rollout server left: {}", down.join("; "));
        }
        Ok(worst)
    }

    /// Writes `model`'s adapters for step `step` and hot-loads them on every server;
    /// the previous adapter is unloaded once the new one is everywhere.
    async fn sync_lora(&mut self, model: &Transformer, step: usize) -> Result<()> {
        let name = format!("{}-step-{step}", self.tag);
        let dir = self.sync_dir.join(&name);
        cal_model::peft::export_adapter(model, &dir)?;
        let path = std::fs::canonicalize(&dir)?;
        // in place: a resumed run loads its step again under the same name
        let body = json!({"lora_name": name, "lora_path": path, "load_inplace": true});
        let what = format!("loading adapter {name}");
        let hint = "start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True";
        self.post_to_all("/v1/load_lora_adapter", &body, &what, hint)
            .await?;
        self.synced = Some(name.clone());
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

/// Mean |a − b| (a NaN counts as infinitely far).
fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x as f64 - *y as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .sum();
    s / a.len().max(1) as f64
}

/// Does a server that gave log-probs `got` serve the weights that give `expected`?
/// Its mean |Δ| must be within `tol` (0: no bound), and when the step moved the
/// trainer measurably (from `previous`), it must be nearer the new log-probs than the
/// old: that catches stale weights even when the step was too small to cross `tol`.
/// `Ok` is the mean |Δ|.
pub fn judge_served(
    got: &[f32],
    expected: &[f32],
    previous: Option<&[f32]>,
    tol: f64,
) -> std::result::Result<f64, String> {
    if got.len() != expected.len() {
        return Err(format!(
            "{} log-probs for {} tokens",
            got.len(),
            expected.len()
        ));
    }
    let diff = mean_abs_diff(got, expected);
    if tol > 0.0 && diff > tol {
        return Err(format!(
            "mean |logp_server - logp_trainer| = {diff:.4} on a fixed completion, above \
             rollout.sync-check-tol = {tol}"
        ));
    }
    if let Some(prev) = previous {
        let (moved, to_old) = (mean_abs_diff(expected, prev), mean_abs_diff(got, prev));
        if moved > 1e-3 && to_old <= diff {
            return Err(format!(
                "on a fixed completion it is nearer the weights before the step (mean |Δlogp| \
                 {to_old:.4}) than after it ({diff:.4}); the step moved them by {moved:.4}"
            ));
        }
    }
    Ok(diff)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_serves_the_new_weights_passes() {
        let (prev, new) = ([-1.0, -2.0, -3.0], [-1.5, -1.5, -2.5]);
        let got = [-1.5001, -1.4999, -2.5];
        let d = judge_served(&got, &new, Some(&prev), 0.05).unwrap();
        assert!(d < 1e-3, "{d}");
    }

    #[test]
    fn stale_weights_are_caught_below_the_tolerance() {
        // a small step: old and new within tol of each other, the server on the old
        let (prev, new) = ([-1.0, -2.0], [-1.01, -2.01]);
        let err = judge_served(&prev, &new, Some(&prev), 0.05).unwrap_err();
        assert!(err.contains("nearer the weights before the step"), "{err}");
        // a step too small to tell apart is not an error
        let (prev, new) = ([-1.0, -2.0], [-1.0001, -2.0]);
        assert!(judge_served(&prev, &new, Some(&prev), 0.05).is_ok());
    }

    #[test]
    fn other_weights_beyond_the_tolerance_are_an_error() {
        let err = judge_served(&[-1.0, -1.0], &[-1.2, -0.9], None, 0.05).unwrap_err();
        assert!(
            err.contains("0.1500") && err.contains("sync-check-tol"),
            "{err}"
        );
        // 0 turns the bound off; NaN is never within it
        assert!(judge_served(&[-1.0], &[-1.2], None, 0.0).is_ok());
        assert!(judge_served(&[f32::NAN], &[-1.2], None, 1.0).is_err());
        assert!(judge_served(&[-1.0], &[-1.0, -2.0], None, 1.0).is_err());
    }
}
