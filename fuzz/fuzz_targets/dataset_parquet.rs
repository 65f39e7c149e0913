//! GSM8K parquet files: damaged files are errors naming the file, never panics.
#![no_main]
use cal_core::data::gsm8k::parse_parquet;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(init: {
    // `parse_parquet` catches the parquet crate's own panics and reports a damaged file;
    // libFuzzer's hook would abort before that. A panic that escapes still crashes.
    std::panic::set_hook(Box::new(|_| {}));
}, |data: &[u8]| {
    if let Err(e) = parse_parquet(data.to_vec(), Path::new("fuzz.parquet")) {
        assert!(e.to_string().starts_with("fuzz.parquet"), "{e}");
    }
});
