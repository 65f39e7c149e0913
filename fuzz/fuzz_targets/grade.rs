//! Answer grading: extraction must not panic on any text, what it extracts must be a
//! number that occurs in the response, and equality must be reflexive.
#![no_main]
use cal_core::grade::{extract, grade, is_correct, numbers_equal, parse_number};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // First line is the gold answer, the rest the response.
    let (gold, response) = text.split_once('\n').unwrap_or((&text, ""));
    let g = grade(response, gold);
    let e = extract(response);
    assert_eq!(g.extraction, e, "extraction is deterministic");
    for found in [&e.strict, &e.flexible].into_iter().flatten() {
        assert!(
            response.contains(found.as_str()),
            "{found:?} not in the response"
        );
        assert!(
            parse_number(found).is_some(),
            "{found:?} extracted but not a number"
        );
        assert!(numbers_equal(found, found), "{found:?} not equal to itself");
    }
    assert_eq!(is_correct(Some(gold), gold), parse_number(gold).is_some());
    assert!(!g.correct || parse_number(gold).is_some());
});
