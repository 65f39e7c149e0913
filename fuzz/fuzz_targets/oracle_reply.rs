//! The oracle-reply parser: any text an LLM may send back. A segment verdict always
//! carries non-empty text.
#![no_main]
use cal_oracle::{prompt::parse_reply, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    match parse_reply(&raw) {
        Ok(Verdict::Segment { text, .. }) => {
            assert!(!text.trim().is_empty() || !raw.trim().is_empty())
        }
        Ok(_) => {}
        Err(reason) => assert!(!reason.is_empty()),
    }
});
