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

/// All found by the `dataset_parquet` fuzz target: parquet 57.3 panicked on the first
/// footer (`Option::unwrap` in its thrift reader; 60.1 returns an error), 60.1 asserts
/// on the second's negative column-chunk offset (checked by us first) and on the third's
/// page (`bit_util`: caught, reported as a damaged file).
#[test]
fn damaged_footers_are_errors_naming_the_file() {
    for (fixture, want) in [
        (
            "tests/fixtures/fuzz-parquet-thrift-bool.parquet",
            "not a readable parquet file",
        ),
        (
            "tests/fixtures/fuzz-parquet-negative-chunk.parquet",
            "lies outside the file",
        ),
        (
            "tests/fixtures/fuzz-parquet-bit-unpack.parquet",
            "damaged parquet file",
        ),
    ] {
        let (bytes, _) = file(fixture);
        let err = parse_parquet(bytes, Path::new("damaged.parquet"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("damaged.parquet: ") && err.contains(want),
            "{fixture}: {err}"
        );
    }
}
