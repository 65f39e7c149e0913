//! vLLM as a rollout engine: its OpenAI-compatible `/v1/completions`, its weight-sync
//! routes, and [`Vllm`], the [`RolloutBackend`] over them.
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
//! [`super::server`] starts and stops a local server when the user gives no URL.

use super::pool::{post_with_failover, ServerPool};
use super::{judge_served, EngineSampling, RolloutBackend, Samples, StepSeeds, SyncProbe};
use crate::collective::Collective;
use crate::config::RolloutConfig;
use crate::policy::Policy;
use anyhow::{anyhow, bail, Context, Result};
use cal_model::generate::{decode_with_offsets, FinishReason, Generation};
use cal_model::tokenizer::TokenizerBundle;
use cal_model::Transformer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The OpenAI-compatible completions route.
const COMPLETIONS: &str = "/v1/completions";

/// A client of one or more vLLM servers serving the same base model.
pub struct VllmEngine {
    pool: ServerPool,
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
            pool: ServerPool { urls, client },
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
            let (client, urls) = (self.pool.client.clone(), self.pool.urls.clone());
            tasks.spawn(async move {
                let reply = post_with_failover(&client, &urls, i, COMPLETIONS, &body).await;
                (i, reply)
            });
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
        self.pool
            .post_to_all("/collective_rpc", &body, &what, hint)
            .await?;
        // cached prefixes hold keys and values of the old weights
        self.pool
            .post_to_all(
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
        for u in self.pool.urls.clone() {
            let one = std::slice::from_ref(&u);
            let v = match post_with_failover(&self.pool.client, one, 0, COMPLETIONS, &body).await {
                Ok(v) => v,
                Err(e) => {
                    // gone since the sync (killed): the others carry on, as in a sync
                    eprintln!(
                        "warning: rollout server {u} does not answer ({e:#}); going on without it"
                    );
                    self.pool.drop_server(&u);
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
        if self.pool.urls.is_empty() {
            bail!("no rollout server left: {}", down.join("; "));
        }
        Ok(worst)
    }

    /// What [`VllmEngine::sync`] leaves behind, without sending anything: another
    /// data-parallel rank synced the shared servers to step `step`, and this one's
    /// requests name the same weights.
    pub fn follow(&mut self, lora: bool, step: usize) {
        let name = format!("{}-step-{step}", self.tag);
        self.synced = Some(name.clone());
        if lora {
            self.adapter = Some(name);
        }
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
        self.pool
            .post_to_all("/v1/load_lora_adapter", &body, &what, hint)
            .await?;
        self.synced = Some(name.clone());
        if let Some(old) = self.adapter.replace(name) {
            for u in &self.pool.urls {
                // A failed unload only costs the server memory; the next request names the
                // new adapter either way.
                let _ = self
                    .pool
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

/// vLLM servers as the run's rollout engine: the client, the probe its syncs are
/// checked with, and the runtime its requests run on.
pub struct Vllm {
    engine: VllmEngine,
    probe: SyncProbe,
    rt: tokio::runtime::Handle,
    tol: f64,
    /// Data parallel: the ranks share the servers. Rank 0 sends the weights; the others
    /// wait for it and name the same ones.
    ranks: Arc<dyn Collective>,
}

impl Vllm {
    /// Connects to `cfg.urls`, sends them the policy's weights (a resumed run's
    /// included, as of `step`; rank 0 alone when `ranks` share them) and checks that
    /// they serve them.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: &RolloutConfig,
        sync_dir: PathBuf,
        tag: &str,
        policy: &Policy,
        probe: SyncProbe,
        step: usize,
        rt: tokio::runtime::Handle,
        ranks: Arc<dyn Collective>,
    ) -> Result<Self> {
        let timeout = Duration::from_secs(600);
        let engine = rt.block_on(VllmEngine::connect(&cfg.urls, sync_dir, tag, timeout))?;
        let mut v = Self {
            engine,
            probe,
            rt,
            tol: cfg.sync_check_tol,
            ranks,
        };
        v.sync(policy, step)?;
        let (diff, _) = v.check_served(policy)?;
        if v.ranks.is_main() {
            eprintln!("rollout servers serve the trainer's weights (mean |Δlogp| {diff:.2e} on a fixed completion)");
        }
        Ok(v)
    }
}

impl RolloutBackend for Vllm {
    /// One request per prompt asks for its `G` completions, seeded from the run's RNG.
    fn complete(
        &mut self,
        policy: &Policy,
        prompts: &[Vec<u32>],
        cfg: &RolloutConfig,
        _share_prompts: bool,
        mut seeds: StepSeeds<'_>,
    ) -> Result<Samples> {
        let seeds = seeds.prompt_seeds(prompts.len());
        let replies = self.rt.block_on(self.engine.complete(
            prompts,
            &seeds,
            cfg.engine_sampling(),
            &policy.tok,
        ))?;
        let mut gens = Vec::with_capacity(prompts.len() * cfg.num_generations);
        let mut logq = Vec::with_capacity(gens.capacity());
        for c in replies.into_iter().flatten() {
            gens.push(c.generation);
            logq.push(c.logprobs);
        }
        Ok(Samples {
            gens,
            engine_logp: Some(logq),
        })
    }

    fn remote(&self) -> bool {
        true
    }

    /// Rank 0 sends the weights; every rank then checks what the servers serve
    /// ([`RolloutBackend::check_served`]), so a rank naming stale weights is caught too.
    fn sync(&mut self, policy: &Policy, step: usize) -> Result<()> {
        let p = policy;
        if self.ranks.is_main() {
            self.rt.block_on(self.engine.sync(&p.model, &p.tok, step))?;
        }
        if self.ranks.world() > 1 {
            self.ranks.barrier()?;
            if !self.ranks.is_main() {
                self.engine.follow(p.model.lora.is_some(), step);
            }
        }
        Ok(())
    }

    fn check_served(&mut self, policy: &Policy) -> Result<(f64, f64)> {
        let (engine, rt, tol) = (&mut self.engine, &self.rt, self.tol);
        self.probe
            .check(policy, |prompt, completion, expected, previous| {
                rt.block_on(engine.check_served(prompt, completion, expected, previous, tol))
            })
    }
}
