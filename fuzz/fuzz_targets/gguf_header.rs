//! The GGUF header and metadata reader (candle's parser plus our checks and the
//! tokenizer built from metadata): damaged files are errors, never panics or absurd
//! allocations.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    if let Err(e) = cal_model::load::read_gguf_header(&mut cursor, "fuzz.gguf") {
        assert!(format!("{e}").starts_with("fuzz.gguf"), "{e:#}");
    }
});
