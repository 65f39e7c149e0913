//! Span location and token mapping: any response and oracle segment (split at the
//! first NUL byte). A located span must be a non-empty range on char boundaries of the
//! response, and mapping it to tokens must return tokens that overlap it.
#![no_main]
use cal_core::locate::{locate, LocateConfig, Method};
use cal_core::map::map_span;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some((response, segment)) = text.split_once('\0') else {
        return;
    };
    // A smaller fuzzy budget than the default keeps each input fast; the limit path
    // itself is exercised too.
    let cfg = LocateConfig {
        min_similarity: 0.8,
        max_fuzzy_cells: 200_000,
    };
    let Ok(loc) = locate(response, segment, &cfg) else {
        return;
    };
    assert!(loc.start < loc.end && loc.end <= response.len(), "{loc:?}");
    assert!(response.is_char_boundary(loc.start) && response.is_char_boundary(loc.end));
    assert!(
        (cfg.min_similarity..=1.0).contains(&loc.similarity),
        "{loc:?}"
    );
    if loc.method == Method::Exact {
        assert_eq!(loc.similarity, 1.0);
    }
    // Tokens: one per char, as a byte-level tokenizer would give.
    let offsets: Vec<(usize, usize)> = response
        .char_indices()
        .map(|(i, c)| (i, i + c.len_utf8()))
        .collect();
    let cap = data.len() % 70;
    let span = map_span(&offsets, loc.start..loc.end, cap).expect("a located span covers a token");
    assert!(span.start < span.end && span.end <= offsets.len());
    assert!(cap == 0 || span.len() <= cap);
    let (s, e) = offsets[span.start];
    assert!(
        s < loc.end && e > loc.start,
        "first token does not overlap the span"
    );
});
