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

impl CacheError {
    /// The file is not a database, or a damaged one.
    fn is_damage(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        matches!(
            self.source.sqlite_error_code(),
            Some(NotADatabase | DatabaseCorrupt)
        )
    }
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
    /// Opens (creating if needed) the cache database at `path`. A file there that is
    /// not a usable cache (corrupt, truncated, another kind of file) is moved aside to
    /// `<path>.corrupt-<unix time>` with a warning and a fresh cache is started: a lost
    /// cache costs repeated oracle calls, never a run.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        match Self::open_once(path) {
            Ok(c) => Ok(c),
            // Only a damaged file is moved aside; a busy one (another run holding a
            // lock past the wait below) is an error to report, not a cache to drop.
            Err(e) if path.is_file() && e.is_damage() => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = path.with_extension(format!("sqlite.corrupt-{stamp}"));
                if std::fs::rename(path, &aside).is_err() {
                    return Err(e);
                }
                for ext in ["-wal", "-shm"] {
                    let side = format!("{}{ext}", path.display());
                    let _ = std::fs::rename(&side, format!("{}{ext}", aside.display()));
                }
                eprintln!(
                    "warning: {e}; moved it to {} and started a new cache",
                    aside.display()
                );
                Self::open_once(path)
            }
            Err(e) => Err(e),
        }
    }

    fn open_once(path: &Path) -> Result<Self, CacheError> {
        let err = |source| CacheError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        // Runs side by side (`experiment --jobs`) share the cache: wait for the other's
        // write lock rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(err)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_cache_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("oracle-cache.sqlite");
        let garbage =
            b"this is not an SQLite database, it was truncated by a full disk".repeat(100);
        std::fs::write(&db, &garbage).unwrap();
        let cache = Cache::open(&db).expect("a corrupt cache must not stop a run");
        assert_eq!(cache.len(), 0);
        let reply = OracleReply {
            verdict: crate::Verdict::NoError,
            raw: "ok".into(),
            usage: crate::Usage::default(),
        };
        cache.put("k", "p", "m", "v1", &reply);
        assert!(cache.get("k").is_some());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the bad file is kept aside");
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), garbage);
    }
}
