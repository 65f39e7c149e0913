//! Where cached artefacts live (the trained `tiny` models, the oracle's SQLite cache).

use std::path::{Path, PathBuf};

/// `$CAL_GRPO_CACHE`, else `~/.cache/cal-grpo`.
pub fn cache_root() -> PathBuf {
    if let Ok(p) = std::env::var("CAL_GRPO_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    Path::new(&home).join(".cache/cal-grpo")
}
