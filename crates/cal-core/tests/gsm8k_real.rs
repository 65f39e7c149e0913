//! The real GSM8K files (fetched by `scripts/fetch-assets.sh`; ignored without them,
//! CI runs them with `--include-ignored`).

use cal_core::assets::asset;
use cal_core::data;
use cal_core::evaluate::{accuracy, grade_example};

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh"]
fn reference_answers_score_100_percent() {
    for (rel, rows) in [("gsm8k/test.jsonl", 1319), ("gsm8k/train.jsonl", 7473)] {
        let path = asset(rel);
        let ds = data::load(&path).unwrap();
        assert_eq!(ds.len(), rows, "{rel}");
        let graded: Vec<_> = ds.iter().map(|ex| grade_example(ex, &ex.answer)).collect();
        let acc = accuracy(&graded, ds.len());
        let wrong: Vec<_> = graded
            .iter()
            .filter(|g| !g.strict_correct || !g.flexible_correct)
            .take(3)
            .collect();
        assert!(wrong.is_empty(), "{rel}: {wrong:#?}");
        assert_eq!((acc.strict_accuracy, acc.flexible_accuracy), (1.0, 1.0));
        // every worked solution carries calculator notes the offline oracle can check
        let with_notes = ds.iter().filter(|e| e.answer.contains("<<")).count();
        assert!(
            with_notes as f64 > 0.95 * rows as f64,
            "{with_notes}/{rows}"
        );
    }
}

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh"]
fn first_n_is_deterministic_on_real_data() {
    let path = asset("gsm8k/test.jsonl");
    let ds = data::load(&path).unwrap();
    let first = data::select(ds.clone(), 5, None);
    assert_eq!(
        first.iter().map(|e| e.idx).collect::<Vec<_>>(),
        ds[..5].iter().map(|e| e.idx).collect::<Vec<_>>()
    );
    assert!(first[0].question.starts_with("Janet"));
    assert_eq!(first[0].final_answer, "18");
}
