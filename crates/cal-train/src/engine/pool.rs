//! A pool of replicas of one served model, with failover: a request goes to one server
//! and moves on to the next on an error, with exponential backoff between rounds; a
//! broadcast (a weight sync) leaves out a server that no longer answers and fails only
//! when none is left. Nothing here knows an engine's wire format.

use anyhow::{bail, Result};
use serde_json::Value;
use std::time::Duration;

/// Tries per server before a request fails.
const ATTEMPTS_PER_SERVER: usize = 2;

/// The live servers (`http://host:port`) and one HTTP client for them.
pub struct ServerPool {
    pub urls: Vec<String>,
    pub client: reqwest::Client,
}

impl ServerPool {
    /// POSTs `body` to `route` on every server. One that does not answer is left out
    /// with a warning and the others carry on; one that answers with an error fails,
    /// with `what` and `hint` in the message; none left is an error naming them.
    pub async fn post_to_all(
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

    /// Leaves `url` out of the pool (it stopped answering).
    pub fn drop_server(&mut self, url: &str) {
        self.urls.retain(|x| x != url);
    }
}

/// POSTs `body` to `route`, starting at server `first mod N` and moving on to the next
/// on an error, with exponential backoff between rounds.
pub async fn post_with_failover(
    client: &reqwest::Client,
    urls: &[String],
    first: usize,
    route: &str,
    body: &Value,
) -> Result<Value> {
    let mut errors = Vec::new();
    for attempt in 0..urls.len() * ATTEMPTS_PER_SERVER {
        let u = &urls[(first + attempt) % urls.len()];
        if attempt >= urls.len() {
            tokio::time::sleep(Duration::from_millis(250 << (attempt / urls.len()))).await;
        }
        let reply = async {
            let r = client.post(format!("{u}{route}")).json(body).send().await?;
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
