//! On-disk SQLite cache of oracle replies, so that a rerun never pays twice.
//!
//! The key is a SHA-256 over provider, model, endpoint, prompt version and the three
//! inputs; API keys are never part of it or of the stored rows.

use crate::{OracleReply, OracleRequest};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Mutex;

pub struct Cache {
    conn: Mutex<Connection>,
}

#[derive(Debug, thiserror::Error)]
#[error("oracle cache {path}: {source}")]
pub struct CacheError {
    path: String,
    #[source]
    source: rusqlite::Error,
}

/// The cache key of one request.
pub fn key(
    provider: &str,
    model: &str,
    endpoint: &str,
    prompt_version: &str,
    req: &OracleRequest,
) -> String {
    let mut h = Sha256::new();
    for part in [
        provider,
        model,
        endpoint,
        prompt_version,
        &req.question,
        &req.reference,
        &req.response,
    ] {
        // length-prefixed so that field boundaries cannot collide
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    format!("{:x}", h.finalize())
}

impl Cache {
    /// Opens (creating if needed) the cache database at `path`.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let err = |source| CacheError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS oracle_cache (
                 key TEXT PRIMARY KEY,
                 provider TEXT NOT NULL,
                 model TEXT NOT NULL,
                 prompt_version TEXT NOT NULL,
                 reply TEXT NOT NULL,
                 created_at INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub fn get(&self, key: &str) -> Option<OracleReply> {
        let conn = self.conn.lock().ok()?;
        let row: Option<String> = conn
            .query_row(
                "SELECT reply FROM oracle_cache WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .unwrap_or_else(|e| {
                tracing::warn!("oracle cache read failed: {e}");
                None
            });
        row.and_then(|s| serde_json::from_str(&s).ok())
    }

    pub fn put(
        &self,
        key: &str,
        provider: &str,
        model: &str,
        prompt_version: &str,
        reply: &OracleReply,
    ) {
        let Ok(conn) = self.conn.lock() else { return };
        let Ok(json) = serde_json::to_string(reply) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Err(e) = conn.execute(
            "INSERT OR REPLACE INTO oracle_cache (key, provider, model, prompt_version, reply, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key, provider, model, prompt_version, json, now],
        ) {
            // A cache that cannot be written costs money later, not correctness now.
            tracing::warn!("oracle cache write failed: {e}");
        }
    }

    pub fn len(&self) -> usize {
        self.conn
            .lock()
            .ok()
            .and_then(|c| {
                c.query_row("SELECT COUNT(*) FROM oracle_cache", [], |r| {
                    r.get::<_, i64>(0)
                })
                .ok()
            })
            .unwrap_or(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
