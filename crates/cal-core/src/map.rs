//! Map a located character range to the completion tokens it covers.
//!
//! Input is the byte range from [`crate::locate`] and each completion token's byte
//! offsets into the same response text (from the tokenizer or the generator). A token
//! counts as soon as it overlaps the range, so spans that start or end mid-token
//! include that token. Zero-width tokens (special tokens, offsets `(x, x)`) never
//! count. The range is then capped at `max_tokens` tokens, keeping the *first* ones:
//! the beginning of the first error is what the credit should point at.
//!
//! ```
//! use cal_core::map::map_span;
//! // "12 + 7 = 20" tokenised as ["12", " +", " 7", " =", " 20"]
//! let offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 11)];
//! let span = map_span(&offsets, 5..11, 64).unwrap(); // "7 = 20"
//! assert_eq!((span.start, span.end, span.capped), (2, 5, false));
//! let capped = map_span(&offsets, 0..11, 2).unwrap();
//! assert_eq!((capped.start, capped.end, capped.capped, capped.uncapped_len), (0, 2, true, 5));
//! ```

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Token range `start..end` (end exclusive) of a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSpan {
    pub start: usize,
    pub end: usize,
    /// Whether `max_tokens` shortened the span.
    pub capped: bool,
    /// Number of tokens the range covered before capping.
    pub uncapped_len: usize,
}

impl TokenSpan {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// Maps the byte range `bytes` of the text to the tokens whose (byte) offsets overlap it.
///
/// `max_tokens == 0` disables the cap. Returns `None` when no token overlaps the
/// range (an empty range, or one past the last token's text).
pub fn map_span(
    offsets: &[(usize, usize)],
    bytes: Range<usize>,
    max_tokens: usize,
) -> Option<TokenSpan> {
    if bytes.start >= bytes.end {
        return None;
    }
    let overlaps = |&(s, e): &(usize, usize)| s < e && s < bytes.end && e > bytes.start;
    let first = offsets.iter().position(overlaps)?;
    let last = offsets.iter().rposition(overlaps)?;
    let uncapped_len = last + 1 - first;
    let len = if max_tokens == 0 {
        uncapped_len
    } else {
        uncapped_len.min(max_tokens)
    };
    Some(TokenSpan {
        start: first,
        end: first + len,
        capped: len < uncapped_len,
        uncapped_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mid_token_edges_are_included() {
        let offsets = [(0, 3), (3, 7), (7, 10)];
        assert_eq!(map_span(&offsets, 4..8, 0).unwrap().range(), 1..3);
        assert_eq!(map_span(&offsets, 2..3, 0).unwrap().range(), 0..1);
    }

    #[test]
    fn zero_width_and_out_of_range() {
        let offsets = [(0, 0), (0, 3), (3, 3), (3, 6)];
        assert_eq!(map_span(&offsets, 0..6, 0).unwrap().range(), 1..4);
        assert_eq!(map_span(&offsets, 6..9, 0), None);
        assert_eq!(map_span(&offsets, 2..2, 0), None);
    }

    #[test]
    fn shared_offsets_of_split_multibyte_char() {
        // Byte-level BPE can split "€" (3 bytes) into two tokens that both report 0..3.
        let offsets = [(0, 3), (0, 3), (3, 4)];
        assert_eq!(map_span(&offsets, 0..3, 0).unwrap().range(), 0..2);
    }

    proptest! {
        #[test]
        fn covers_exactly_overlapping_tokens(lens in proptest::collection::vec(1usize..6, 1..40), a in 0usize..200, b in 0usize..200, cap in 0usize..10) {
            let mut offsets = Vec::new();
            let mut pos = 0;
            for l in &lens { offsets.push((pos, pos + l)); pos += l; }
            let (a, b) = (a % (pos + 1), b % (pos + 1));
            let (s, e) = (a.min(b), a.max(b));
            match map_span(&offsets, s..e, cap) {
                None => prop_assert!(s == e),
                Some(span) => {
                    prop_assert!(span.start < span.end && span.end <= offsets.len());
                    if cap > 0 { prop_assert!(span.len() <= cap); }
                    prop_assert_eq!(span.capped, span.len() < span.uncapped_len);
                    // every covered token overlaps; the neighbours do not
                    for t in span.range() { prop_assert!(offsets[t].0 < e && offsets[t].1 > s); }
                    if span.start > 0 { prop_assert!(offsets[span.start - 1].1 <= s); }
                    let full_end = span.start + span.uncapped_len;
                    if full_end < offsets.len() { prop_assert!(offsets[full_end].0 >= e); }
                    prop_assert!(offsets[full_end - 1].1 > s);
                }
            }
        }
    }
}
