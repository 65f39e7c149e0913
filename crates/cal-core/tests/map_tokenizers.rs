//! Span → token mapping against real `tokenizers` tokenizers: a byte-level BPE trained
//! here on GSM8K-style text, and the real Qwen3 `tokenizer.json` when
//! `scripts/fetch-assets.sh` has fetched it (ignored otherwise; CI includes it).

use cal_core::locate::{locate, LocateConfig};
use cal_core::map::map_span;
use proptest::prelude::*;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{Tokenizer, TokenizerBuilder};

const CORPUS: &[&str] = &[
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
    "Altogether she sold 48 + 24 = <<48+24=72>>72 clips.",
    "Café costs €5 × 3 = €15 in total.",
    "日本のりんごは 12 + 7 = 19 個です。",
    "The 🍎 costs $3, so 4 🍎 cost 4 * 3 = $12.",
    "#### 72",
];

fn trained_bpe() -> Tokenizer {
    let bl = ByteLevel::new(false, false, true);
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(bl))
        .with_post_processor(Some(bl))
        .with_decoder(Some(bl))
        .build()
        .unwrap();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(400)
        .min_frequency(1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tok.train(&mut trainer, CORPUS.iter().cycle().take(60))
        .unwrap();
    tok.into()
}

/// Locates `segment` in `text`, maps it and checks the tokens decode to a superset.
fn check(tok: &Tokenizer, text: &str, segment: &str) -> (usize, usize) {
    let enc = tok.encode(text, false).unwrap();
    let hit = locate(text, segment, &LocateConfig::default()).unwrap();
    let span = map_span(enc.get_offsets(), hit.start..hit.end, 0).unwrap();
    let ids = &enc.get_ids()[span.range()];
    let decoded = tok.decode(ids, false).unwrap();
    assert!(
        decoded.contains(&text[hit.start..hit.end]),
        "tokens {ids:?} decode to {decoded:?}, which misses {:?}",
        &text[hit.start..hit.end]
    );
    // The neighbours are outside the range.
    let offs = enc.get_offsets();
    if span.start > 0 {
        assert!(offs[span.start - 1].1 <= hit.start);
    }
    if span.end < offs.len() {
        assert!(offs[span.end].0 >= hit.end);
    }
    (span.start, span.end)
}

#[test]
fn trained_bpe_multibyte_and_mid_token() {
    let tok = trained_bpe();
    for text in CORPUS {
        // every word-ish piece, plus pieces that start and end mid-token
        for seg in text.split(' ').filter(|s| !s.is_empty()) {
            check(&tok, text, seg);
        }
    }
    let text = CORPUS[1];
    let (s, e) = check(&tok, text, "ogether she so");
    assert!(e > s);
    check(&tok, CORPUS[2], "€5 × 3");
    check(&tok, CORPUS[3], "12 + 7 = 19");
    check(&tok, CORPUS[4], "🍎 cost");
    // the cap keeps the first tokens
    let enc = tok.encode(CORPUS[1], false).unwrap();
    let full = map_span(enc.get_offsets(), 0..CORPUS[1].len(), 0).unwrap();
    let capped = map_span(enc.get_offsets(), 0..CORPUS[1].len(), 3).unwrap();
    assert_eq!(
        (capped.start, capped.end, capped.capped),
        (full.start, full.start + 3, true)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_ranges_decode_to_superset(which in 0usize..CORPUS.len(), a in 0usize..200, b in 0usize..200) {
        thread_local!(static TOK: Tokenizer = trained_bpe());
        let text = CORPUS[which];
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let (a, b) = (bounds[a % bounds.len()], bounds[b % bounds.len()]);
        let (a, b) = (a.min(b), a.max(b));
        let seg = text[a..b].trim();
        prop_assume!(!seg.is_empty());
        TOK.with(|tok| { check(tok, text, seg); });
    }
}

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh"]
fn real_qwen3_tokenizer() {
    let path = cal_core::assets::asset("tokenizer-qwen3/tokenizer.json");
    let tok = Tokenizer::from_file(&path).unwrap();
    let text = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning.\n\
                She sells the remainder at $2 per egg: 16 - 3 - 4 = <<16-3-4=9>>9 eggs, 9 * 2 = $17.\n#### 17 – café 日本 🍎";
    for seg in [
        "9 * 2 = $17",
        "16 - 3 - 4 = <<16-3-4=9>>9",
        "café 日本 🍎",
        "ucks lay 1",
        "’s",
    ] {
        check(&tok, text, seg);
    }
}
