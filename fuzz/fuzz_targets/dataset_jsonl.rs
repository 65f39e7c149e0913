//! GSM8K JSONL rows: every accepted example has a parseable final answer; every error
//! names the file (and the line, for row errors).
#![no_main]
use cal_core::data::gsm8k::{final_answer, parse_jsonl, DataError};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_jsonl(&text, Path::new("fuzz.jsonl")) {
        Ok(examples) => {
            for ex in examples {
                assert!(final_answer(&ex.answer).is_some(), "{:?}", ex.answer);
            }
        }
        Err(e @ (DataError::Json { .. } | DataError::Field { .. })) => {
            assert!(e.to_string().starts_with("fuzz.jsonl:"), "{e}")
        }
        Err(e) => panic!("unexpected error kind for text input: {e}"),
    }
});
