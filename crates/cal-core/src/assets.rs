//! The real assets `scripts/fetch-assets.sh` puts under `assets/` (GSM8K, a Qwen3
//! tokenizer, the SmolLM2 GGUF), for the tests and benchmarks that need them. Those
//! tests are `#[ignore = "needs assets: ..."]`, so a plain `cargo test` lists them as
//! ignored instead of passing silently; CI fetches the assets and runs them with
//! `--include-ignored`.

use std::path::PathBuf;

/// `assets/<rel>` of this checkout; panics, naming the fetch command, when it is absent.
pub fn asset(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets")
        .join(rel);
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/fetch-assets.sh --with-model` first",
        p.display()
    );
    p
}
