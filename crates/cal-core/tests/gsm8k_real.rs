//! The real GSM8K files (fetched by `scripts/fetch-assets.sh`; CI requires them).

use cal_core::data;
use cal_core::evaluate::{accuracy, grade_example};
use std::path::PathBuf;

fn asset(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets")
        .join(rel);
    if p.exists() {
        Some(p)
    } else if std::env::var("CAL_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("{} is missing; run scripts/fetch-assets.sh", p.display());
    } else {
        eprintln!(
            "skipping: {} not fetched (scripts/fetch-assets.sh)",
            p.display()
        );
        None
    }
}

#[test]
fn reference_answers_score_100_percent() {
    for (rel, rows) in [("gsm8k/test.jsonl", 1319), ("gsm8k/train.jsonl", 7473)] {
        let Some(path) = asset(rel) else { return };
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
fn first_n_is_deterministic_on_real_data() {
    let Some(path) = asset("gsm8k/test.jsonl") else {
        return;
    };
    let ds = data::load(&path).unwrap();
    let first = data::select(ds.clone(), 5, None);
    assert_eq!(
        first.iter().map(|e| e.idx).collect::<Vec<_>>(),
        ds[..5].iter().map(|e| e.idx).collect::<Vec<_>>()
    );
    assert!(first[0].question.starts_with("Janet"));
    assert_eq!(first[0].final_answer, "18");
}
