//! Locate the oracle's first-error segment inside the response text.
//!
//! An LLM oracle quotes the response imperfectly: different case, collapsed
//! whitespace, a dropped comma, wrapping quotes, a typo. Three stages, from the most
//! to the least trustworthy, each returning a byte range of the *original* response
//! (always on UTF-8 boundaries):
//!
//! 1. [`Method::Exact`]: the first exact occurrence.
//! 2. [`Method::Normalized`]: compare only letters and digits, case-folded, so that
//!    whitespace runs and punctuation do not matter; the match must start and end on
//!    word boundaries so that "is 5" does not match inside "this 5".
//! 3. [`Method::Fuzzy`]: the window of the response with the smallest edit distance to
//!    the segment (Sellers' semi-global alignment), accepted when
//!    `1 - distance / len(segment) >= min_similarity`. Bounded by `max_fuzzy_cells`.
//!
//! Junk is rejected with a typed reason ([`NotLocated`]): an empty segment, one longer
//! than the response, or one holding chat-template markers.
//!
//! ```
//! use cal_core::locate::{locate, LocateConfig, Method};
//! let response = "He has 5 + 3 = 9 apples.\n#### 9";
//! let hit = locate(response, "5 + 3 = 9", &LocateConfig::default()).unwrap();
//! assert_eq!(&response[hit.start..hit.end], "5 + 3 = 9");
//! assert_eq!(hit.method, Method::Exact);
//!
//! let hit = locate(response, "\"HE HAS 5+3=9\"", &LocateConfig::default()).unwrap();
//! assert_eq!(&response[hit.start..hit.end], "He has 5 + 3 = 9");
//! assert_eq!(hit.method, Method::Normalized);
//! ```

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Knobs of the matcher: the `[locate]` section of a run configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LocateConfig {
    /// Minimum `1 - edit_distance / segment_len` for a fuzzy match.
    pub min_similarity: f64,
    /// Upper bound on `segment_len * response_len` for the fuzzy stage (cost is O(m·n)).
    pub max_fuzzy_cells: usize,
}

impl Default for LocateConfig {
    fn default() -> Self {
        Self {
            min_similarity: 0.8,
            max_fuzzy_cells: 4_000_000,
        }
    }
}

/// Which stage found the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Exact,
    Normalized,
    Fuzzy,
}

/// A located segment: byte range `start..end` of the response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Located {
    pub start: usize,
    pub end: usize,
    pub method: Method,
    /// 1.0 for exact and normalized matches.
    pub similarity: f64,
}

/// Why a segment could not be located.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum NotLocated {
    #[error("segment is empty")]
    Empty,
    #[error(
        "segment ({segment_chars} visible chars) is longer than the response ({response_chars})"
    )]
    LongerThanResponse {
        segment_chars: usize,
        response_chars: usize,
    },
    #[error("segment contains the chat-template marker {marker:?}")]
    TemplateMarker { marker: String },
    #[error("segment is too long for fuzzy matching ({cells} cells > {limit})")]
    TooLongForFuzzy { cells: usize, limit: usize },
    #[error("segment not found (best similarity {best_similarity:.2})")]
    NotFound { best_similarity: f64 },
}

fn marker_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"<\|[A-Za-z0-9_]+\|>|</?s>|\[/?INST\]|<(start|end)_of_turn>|<\|?(im_start|im_end|endoftext|eot_id)\|?>").unwrap()
    })
}

const QUOTES: [(char, char); 5] = [
    ('"', '"'),
    ('\'', '\''),
    ('`', '`'),
    ('\u{201c}', '\u{201d}'),
    ('\u{2018}', '\u{2019}'),
];

/// Strips one layer of matching wrapping quotes, if any.
fn unquote(s: &str) -> Option<&str> {
    let first = s.chars().next()?;
    let last = s.chars().next_back()?;
    QUOTES
        .iter()
        .find(|(open, close)| first == *open && last == *close && s.len() > 2 * open.len_utf8())
        .map(|(open, close)| s[open.len_utf8()..s.len() - close.len_utf8()].trim())
}

/// Finds `segment` in `response`; see the module docs for the stages.
pub fn locate(response: &str, segment: &str, cfg: &LocateConfig) -> Result<Located, NotLocated> {
    let trimmed = segment.trim();
    if trimmed.is_empty() {
        return Err(NotLocated::Empty);
    }
    if let Some(m) = marker_re().find(trimmed) {
        return Err(NotLocated::TemplateMarker {
            marker: m.as_str().to_string(),
        });
    }
    let mut candidates = vec![trimmed];
    let mut cur = trimmed;
    while let Some(inner) = unquote(cur) {
        if inner.is_empty() {
            break;
        }
        candidates.push(inner);
        cur = inner;
    }
    // Exact first, for every candidate (the quoted text may itself be in the response).
    for cand in &candidates {
        if let Some(start) = response.find(cand) {
            return Ok(Located {
                start,
                end: start + cand.len(),
                method: Method::Exact,
                similarity: 1.0,
            });
        }
    }
    let seg = *candidates.last().unwrap();
    // Compare visible characters: a segment with extra spaces is not "longer".
    let visible = |s: &str| s.chars().filter(|c| !c.is_whitespace()).count();
    let (seg_chars, resp_chars) = (visible(seg), visible(response));
    if seg_chars > resp_chars {
        return Err(NotLocated::LongerThanResponse {
            segment_chars: seg_chars,
            response_chars: resp_chars,
        });
    }
    if let Some((start, end)) = normalized_match(response, seg) {
        return Ok(Located {
            start,
            end,
            method: Method::Normalized,
            similarity: 1.0,
        });
    }
    fuzzy_match(response, seg, cfg)
}

/// A folded character and the byte range of the original character it came from.
#[derive(Debug, Clone, Copy)]
struct Folded {
    ch: char,
    start: usize,
    end: usize,
}

/// Letters and digits only, lower-cased, with their original byte ranges and whether
/// they begin/end a word.
fn fold_alnum(s: &str) -> Vec<(Folded, bool, bool)> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let mut out = Vec::new();
    for (k, &(pos, c)) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            continue;
        }
        let word_start = k == 0 || !chars[k - 1].1.is_alphanumeric();
        let word_end = k + 1 == chars.len() || !chars[k + 1].1.is_alphanumeric();
        let lower: Vec<char> = c.to_lowercase().collect();
        let n = lower.len();
        for (i, lc) in lower.into_iter().enumerate() {
            out.push((
                Folded {
                    ch: lc,
                    start: pos,
                    end: pos + c.len_utf8(),
                },
                word_start && i == 0,
                word_end && i + 1 == n,
            ));
        }
    }
    out
}

fn normalized_match(response: &str, seg: &str) -> Option<(usize, usize)> {
    let resp = fold_alnum(response);
    let needle: Vec<char> = fold_alnum(seg).into_iter().map(|(f, _, _)| f.ch).collect();
    if needle.is_empty() || needle.len() > resp.len() {
        return None;
    }
    (0..=resp.len() - needle.len()).find_map(|i| {
        let window = &resp[i..i + needle.len()];
        let same = window.iter().zip(&needle).all(|((f, _, _), c)| f.ch == *c);
        let (first, last) = (&window[0], &window[needle.len() - 1]);
        (same && first.1 && last.2).then_some((first.0.start, last.0.end))
    })
}

/// Lower-cased characters with whitespace runs collapsed to one space.
fn fold_spaces(s: &str) -> Vec<Folded> {
    let mut out: Vec<Folded> = Vec::new();
    for (pos, c) in s.char_indices() {
        let end = pos + c.len_utf8();
        if c.is_whitespace() {
            match out.last_mut() {
                Some(prev) if prev.ch == ' ' => prev.end = end,
                _ => out.push(Folded {
                    ch: ' ',
                    start: pos,
                    end,
                }),
            }
        } else {
            for lc in c.to_lowercase() {
                out.push(Folded {
                    ch: lc,
                    start: pos,
                    end,
                });
            }
        }
    }
    out
}

fn fuzzy_match(response: &str, seg: &str, cfg: &LocateConfig) -> Result<Located, NotLocated> {
    let resp = fold_spaces(response);
    let needle: Vec<char> = fold_spaces(seg.trim()).into_iter().map(|f| f.ch).collect();
    let (m, n) = (needle.len(), resp.len());
    let cells = m.saturating_mul(n);
    if cells > cfg.max_fuzzy_cells {
        return Err(NotLocated::TooLongForFuzzy {
            cells,
            limit: cfg.max_fuzzy_cells,
        });
    }
    // Sellers: dist[i] = edit distance of needle[..i] to the best suffix of resp[..j];
    // from[i] = where that suffix starts. A free start in row 0 gives substring matching.
    let mut dist: Vec<usize> = (0..=m).collect();
    let mut from: Vec<usize> = vec![0; m + 1];
    let mut best = (m, 0usize, 0usize); // (distance, start, end) of the empty window
    for j in 1..=n {
        let (mut diag, mut diag_from) = (dist[0], from[0]);
        dist[0] = 0;
        from[0] = j;
        for i in 1..=m {
            let sub = diag + usize::from(needle[i - 1] != resp[j - 1].ch);
            let del = dist[i] + 1; // skip a response char
            let ins = dist[i - 1] + 1; // skip a needle char
            let (d, f) = if sub <= del && sub <= ins {
                (sub, diag_from)
            } else if del <= ins {
                (del, from[i])
            } else {
                (ins, from[i - 1])
            };
            diag = dist[i];
            diag_from = from[i];
            dist[i] = d;
            from[i] = f;
        }
        if dist[m] < best.0 {
            best = (dist[m], from[m], j);
        }
    }
    let similarity = if m == 0 {
        0.0
    } else {
        1.0 - best.0 as f64 / m as f64
    };
    // Trim spaces at the window's edges so the range starts and ends on real text.
    let window: Vec<&Folded> = resp[best.1..best.2]
        .iter()
        .filter(|f| f.ch != ' ')
        .collect();
    match (window.first(), window.last()) {
        (Some(first), Some(last)) if similarity >= cfg.min_similarity => Ok(Located {
            start: first.start,
            end: last.end,
            method: Method::Fuzzy,
            similarity,
        }),
        _ => Err(NotLocated::NotFound {
            best_similarity: similarity.max(0.0),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn find(resp: &str, seg: &str) -> Result<(String, Method), NotLocated> {
        locate(resp, seg, &LocateConfig::default())
            .map(|l| (resp[l.start..l.end].to_string(), l.method))
    }

    const RESP: &str = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48 + 24 = 62 clips.\n#### 62";

    #[test]
    fn exact() {
        assert_eq!(
            find(RESP, "48 + 24 = 62").unwrap(),
            ("48 + 24 = 62".into(), Method::Exact)
        );
    }

    #[test]
    fn quoted_and_padded() {
        assert_eq!(find(RESP, "  `48 + 24 = 62`\n").unwrap().0, "48 + 24 = 62");
        assert_eq!(
            find(RESP, "\u{201c}48 + 24 = 62\u{201d}").unwrap().0,
            "48 + 24 = 62"
        );
    }

    #[test]
    fn normalized_case_space_punct() {
        let (txt, m) = find(RESP, "altogether she  sold 48+24=62").unwrap();
        assert_eq!(txt, "Altogether she sold 48 + 24 = 62");
        assert_eq!(m, Method::Normalized);
    }

    #[test]
    fn normalized_respects_word_boundaries() {
        // "is 5" must not be found inside "This 5" by the normalized stage.
        assert_eq!(normalized_match("This 5 is wrong", "IS 5"), None);
        assert_eq!(normalized_match("This 5 is 5", "IS 5"), Some((7, 11)));
    }

    #[test]
    fn fuzzy_typo() {
        let (txt, m) = find(RESP, "Altogther she sold 48 + 24 = 62 clip").unwrap();
        assert_eq!(m, Method::Fuzzy);
        assert!(
            txt.starts_with("Altogether") && txt.contains("62 clip"),
            "{txt}"
        );
    }

    #[test]
    fn rejects_junk() {
        assert_eq!(find(RESP, "   "), Err(NotLocated::Empty));
        assert!(matches!(
            find(RESP, "<|im_end|>"),
            Err(NotLocated::TemplateMarker { .. })
        ));
        assert!(matches!(
            find("short", "much longer than short"),
            Err(NotLocated::LongerThanResponse { .. })
        ));
        assert!(matches!(
            find(RESP, "The cat sat on the mat quietly"),
            Err(NotLocated::NotFound { .. })
        ));
    }

    #[test]
    fn multibyte() {
        let resp = "Café costs €5 × 3 = €16.\n#### 16";
        let (txt, m) = find(resp, "€5 × 3 = €16").unwrap();
        assert_eq!((txt.as_str(), m), ("€5 × 3 = €16", Method::Exact));
        let (txt, m) = find(resp, "CAFÉ COSTS 5 × 3 = 16").unwrap();
        assert_eq!(m, Method::Normalized);
        assert_eq!(txt, "Café costs €5 × 3 = €16");
    }

    #[test]
    fn fuzzy_bounded() {
        let long = "a".repeat(3000);
        let r = locate(&long, &"b".repeat(2000), &LocateConfig::default());
        assert!(matches!(r, Err(NotLocated::TooLongForFuzzy { .. })));
    }

    proptest! {
        #[test]
        fn substrings_are_found_exactly(resp in "[a-zA-Z0-9 .,=+€é\n]{1,80}", a in 0usize..80, len in 1usize..40) {
            let chars: Vec<(usize, char)> = resp.char_indices().collect();
            let a = a % chars.len();
            let b = (a + len).min(chars.len());
            let start = chars[a].0;
            let end = if b == chars.len() { resp.len() } else { chars[b].0 };
            let seg = resp[start..end].trim();
            prop_assume!(!seg.is_empty());
            let hit = locate(&resp, seg, &LocateConfig::default()).unwrap();
            prop_assert_eq!(hit.method, Method::Exact);
            prop_assert_eq!(&resp[hit.start..hit.end], seg);
            prop_assert_eq!(hit.start, resp.find(seg).unwrap());
        }

        #[test]
        fn ranges_are_valid(resp in "\\PC{0,120}", seg in "\\PC{0,40}") {
            if let Ok(hit) = locate(&resp, &seg, &LocateConfig::default()) {
                prop_assert!(hit.start < hit.end && hit.end <= resp.len());
                prop_assert!(resp.is_char_boundary(hit.start) && resp.is_char_boundary(hit.end));
                prop_assert!(hit.similarity >= LocateConfig::default().min_similarity);
            }
        }

        #[test]
        fn case_and_space_changes_are_normalized(words in proptest::collection::vec("[a-z0-9]{1,6}", 2..8), pick in 0usize..8) {
            let resp = words.join(" ");
            let k = pick % words.len();
            let seg = words[k..].join("   ").to_uppercase();
            let hit = locate(&resp, &seg, &LocateConfig::default()).unwrap();
            // Covers the original words (possibly an earlier identical occurrence).
            let got = &resp[hit.start..hit.end];
            prop_assert_eq!(got.split_whitespace().collect::<Vec<_>>().join(" ").to_uppercase(),
                words[k..].join(" ").to_uppercase());
        }
    }
}
