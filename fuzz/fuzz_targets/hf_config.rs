//! A Hugging Face `config.json`: any JSON is a config or an error naming the file.
#![no_main]
use cal_model::config::ModelConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match ModelConfig::from_hf_json(&text, Path::new("fuzz/config.json")) {
        Ok(cfg) => {
            cfg.check().expect("a parsed config passes its own check");
            let _ = cfg.num_params();
            let _ = cfg.rope_inv_freq();
        }
        Err(e) => assert!(format!("{e}").starts_with("fuzz/config.json"), "{e:#}"),
    }
});
