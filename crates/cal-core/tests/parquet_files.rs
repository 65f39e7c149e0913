//! GSM8K parquet files written by pyarrow (`fuzz/seeds/make_seeds.py`), and damaged
//! files found by fuzzing (`scripts/fuzz.sh`), kept as regression inputs.
#![cfg(feature = "parquet")]

use cal_core::data::gsm8k::parse_parquet;
use std::path::{Path, PathBuf};

fn file(rel: &str) -> (Vec<u8>, PathBuf) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    (
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        p,
    )
}

#[test]
fn reads_files_written_by_pyarrow() {
    let (bytes, p) = file("../../fuzz/seeds/dataset_parquet/gsm8k.parquet");
    let ex = parse_parquet(bytes, &p).unwrap();
    let answers: Vec<&str> = ex.iter().map(|e| e.final_answer.as_str()).collect();
    assert_eq!(answers, ["7", "42"]);
    let (bytes, p) = file("../../fuzz/seeds/dataset_parquet/with-idx.parquet");
    let ex = parse_parquet(bytes, &p).unwrap();
    assert_eq!((ex[0].idx, ex[0].final_answer.as_str()), (5, "1000"));
    let (bytes, p) = file("../../fuzz/seeds/dataset_parquet/missing-answer.parquet");
    let err = parse_parquet(bytes, &p).unwrap_err().to_string();
    assert!(
        err.contains("missing-answer.parquet:1: field `answer`"),
        "{err}"
    );
}

/// parquet 57.3 panicked on this footer (`Option::unwrap` in its thrift reader); 60.1
/// returns an error. Found by the `dataset_parquet` fuzz target in 60 s.
#[test]
fn damaged_footer_is_an_error_naming_the_file() {
    let (bytes, _) = file("tests/fixtures/fuzz-parquet-thrift-bool.parquet");
    let err = parse_parquet(bytes, Path::new("damaged.parquet"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("damaged.parquet: "), "{err}");
}
