//! GSM8K in its published layouts: JSONL rows (`question`, `answer`, optional `idx`)
//! and the Hugging Face parquet files (`question`, `answer` columns).
//!
//! The `answer` field is the full worked solution with `<<a*b=c>>` calculator notes and
//! a final `#### N` line. It is kept whole: the oracles need the worked solution, not
//! only the final number.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The row's `idx` field if present, else its 0-based position in the file.
    pub idx: u64,
    pub question: String,
    /// The full reference solution (worked steps and `#### N`).
    pub answer: String,
    /// The number after `####`, with `,` removed.
    pub final_answer: String,
}

impl Example {
    /// Builds an example from a GSM8K-format `answer`, extracting the final number.
    pub fn new(idx: u64, question: String, answer: String) -> Result<Self, String> {
        let final_answer =
            final_answer(&answer).ok_or_else(|| "has no `#### N` final answer line".to_string())?;
        Ok(Self {
            idx,
            question,
            answer,
            final_answer,
        })
    }

    /// The worked steps without the `#### N` line.
    pub fn solution_steps(&self) -> &str {
        self.answer.split("####").next().unwrap_or("").trim_end()
    }
}

/// Removes GSM8K's `<<a*b=c>>` calculator notes (the visible `a*b = c` text stays).
///
/// ```
/// assert_eq!(cal_core::data::gsm8k::strip_notes("48/2 = <<48/2=24>>24 clips"), "48/2 = 24 clips");
/// ```
pub fn strip_notes(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(start) = rest.find("<<") {
        match rest[start..].find(">>") {
            Some(end) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + end + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// The reference final answer: the text after the last `####`, commas stripped.
pub fn final_answer(answer: &str) -> Option<String> {
    let (_, tail) = answer.rsplit_once("####")?;
    let n: String = tail.trim().chars().filter(|c| *c != ',').collect();
    crate::grade::parse_number(&n).map(|_| n)
}

/// A load error that names the file, the line (1-based, JSONL) or row (parquet) and
/// the field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: invalid JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: field `{field}` {problem}")]
    Field {
        path: PathBuf,
        line: usize,
        field: &'static str,
        problem: String,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

/// Loads a dataset file, choosing the reader by extension (`.jsonl`/`.json` or
/// `.parquet`).
pub fn load(path: &Path) -> Result<Vec<Example>, DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => load_parquet(path),
        Some("jsonl") | Some("json") => load_jsonl(path),
        _ => Err(DataError::Format {
            path: path.into(),
            message: "unknown dataset format (expected .jsonl or .parquet)".into(),
        }),
    }
}

/// Reads GSM8K JSONL. Blank lines are skipped; any bad row is an error naming its line.
pub fn load_jsonl(path: &Path) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    parse_jsonl(&text, path)
}

/// Parses GSM8K JSONL text; `path` only labels errors.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| DataError::Json {
            path: path.into(),
            line,
            message: e.to_string(),
        })?;
        let field_err = |field: &'static str, problem: &str| DataError::Field {
            path: path.into(),
            line,
            field,
            problem: problem.to_string(),
        };
        let text_field = |field: &'static str| -> Result<String, DataError> {
            match value.get(field) {
                None => Err(field_err(field, "is missing")),
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(serde_json::Value::String(_)) => Err(field_err(field, "is empty")),
                Some(_) => Err(field_err(field, "is not a string")),
            }
        };
        let question = text_field("question")?;
        let answer = text_field("answer")?;
        let idx = match value.get("idx") {
            None => out.len() as u64,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| field_err("idx", "is not a non-negative integer"))?,
        };
        out.push(Example::new(idx, question, answer).map_err(|p| field_err("answer", &p))?);
    }
    Ok(out)
}

#[cfg(feature = "parquet")]
fn load_parquet(path: &Path) -> Result<Vec<Example>, DataError> {
    let data = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    parse_parquet(data, path)
}

/// Parses a GSM8K parquet file held in memory; `path` only labels errors.
///
/// The parquet crate still asserts (panics) on some damaged pages (fuzzing found one
/// in its bit unpacker within minutes), so decoding runs under `catch_unwind` and such a
/// panic becomes an error naming the file. The panic's own message is still printed
/// by the process's panic hook.
#[cfg(feature = "parquet")]
pub fn parse_parquet(data: Vec<u8>, path: &Path) -> Result<Vec<Example>, DataError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_parquet_inner(data, path)
    }))
    .unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(DataError::Format {
            path: path.into(),
            message: format!("damaged parquet file (the parquet reader failed: {why})"),
        })
    })
}

#[cfg(feature = "parquet")]
fn parse_parquet_inner(data: Vec<u8>, path: &Path) -> Result<Vec<Example>, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let fmt = |message: String| DataError::Format {
        path: path.into(),
        message,
    };
    let file_len = data.len() as i64;
    let reader = SerializedFileReader::new(bytes::Bytes::from(data))
        .map_err(|e| fmt(format!("not a readable parquet file: {e}")))?;
    // The reader asserts (panics) on negative column-chunk extents (its
    // `ColumnChunkMetaData::byte_range`), so a damaged footer is checked here first.
    for (g, rg) in reader.metadata().row_groups().iter().enumerate() {
        for col in rg.columns() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or(col.data_page_offset());
            let len = col.compressed_size();
            if start < 0 || len < 0 || start.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(fmt(format!(
                    "damaged parquet file: row group {g}, column {}: chunk of {len} bytes at offset {start} lies outside the file ({file_len} bytes)",
                    col.column_path()
                )));
            }
        }
    }
    let mut out = Vec::new();
    for (i, row) in reader
        .get_row_iter(None)
        .map_err(|e| fmt(e.to_string()))?
        .enumerate()
    {
        let line = i + 1;
        let row = row.map_err(|e| fmt(format!("row {line}: {e}")))?;
        let (mut question, mut answer, mut idx) = (None, None, None);
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("question", Field::Str(s)) => question = Some(s.clone()),
                ("answer", Field::Str(s)) => answer = Some(s.clone()),
                ("idx", Field::Long(v)) => idx = u64::try_from(*v).ok(),
                ("idx", Field::Int(v)) => idx = u64::try_from(*v).ok(),
                _ => {}
            }
        }
        let field_err = |field: &'static str| DataError::Field {
            path: path.into(),
            line,
            field,
            problem: "is missing or not a string (parquet row)".into(),
        };
        let question = question.ok_or_else(|| field_err("question"))?;
        let answer = answer.ok_or_else(|| field_err("answer"))?;
        let ex = Example::new(idx.unwrap_or(i as u64), question, answer).map_err(|problem| {
            DataError::Field {
                path: path.into(),
                line,
                field: "answer",
                problem,
            }
        })?;
        out.push(ex);
    }
    Ok(out)
}

#[cfg(not(feature = "parquet"))]
fn load_parquet(path: &Path) -> Result<Vec<Example>, DataError> {
    Err(DataError::Format {
        path: path.into(),
        message: "parquet support is not compiled in (enable cal-core's `parquet` feature)".into(),
    })
}

/// Selects `num_samples` examples: all when negative (`--num-samples -1`), otherwise the
/// first N, after a seeded shuffle when `shuffle_seed` is given. Deterministic.
pub fn select(
    mut examples: Vec<Example>,
    num_samples: i64,
    shuffle_seed: Option<u64>,
) -> Vec<Example> {
    if let Some(seed) = shuffle_seed {
        examples.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    }
    if num_samples >= 0 {
        examples.truncate(num_samples as usize);
    }
    examples
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: &str = r#"{"question": "Q1?", "answer": "2*3=<<2*3=6>>6\n#### 6", "idx": 7}

{"question": "Q2?", "answer": "It is 1,000.\n#### 1,000"}
"#;

    #[test]
    fn parses_rows() {
        let ex = parse_jsonl(ROWS, Path::new("t.jsonl")).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!((ex[0].idx, ex[0].final_answer.as_str()), (7, "6"));
        assert_eq!((ex[1].idx, ex[1].final_answer.as_str()), (1, "1000"));
        assert_eq!(ex[0].solution_steps(), "2*3=<<2*3=6>>6");
    }

    #[test]
    fn errors_name_file_line_field() {
        let cases = [
            (
                "{\"question\": \"q\"}",
                "t.jsonl:1: field `answer` is missing",
            ),
            (
                "\n{\"question\": 3, \"answer\": \"#### 1\"}",
                "t.jsonl:2: field `question` is not a string",
            ),
            (
                "{\"question\": \"q\", \"answer\": \"no final\"}",
                "t.jsonl:1: field `answer` has no `#### N`",
            ),
            (
                "{\"question\": \"q\", \"answer\": \"#### 1\", \"idx\": -1}",
                "t.jsonl:1: field `idx`",
            ),
            ("{oops", "t.jsonl:1: invalid JSON"),
        ];
        for (text, want) in cases {
            let err = parse_jsonl(text, Path::new("t.jsonl"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }

    #[test]
    fn selection_is_deterministic() {
        let ex: Vec<Example> = (0..10)
            .map(|i| Example::new(i, format!("q{i}"), format!("#### {i}")).unwrap())
            .collect();
        assert_eq!(select(ex.clone(), -1, None).len(), 10);
        let first3: Vec<u64> = select(ex.clone(), 3, None).iter().map(|e| e.idx).collect();
        assert_eq!(first3, vec![0, 1, 2]);
        let a: Vec<u64> = select(ex.clone(), 4, Some(1))
            .iter()
            .map(|e| e.idx)
            .collect();
        let b: Vec<u64> = select(ex.clone(), 4, Some(1))
            .iter()
            .map(|e| e.idx)
            .collect();
        let c: Vec<u64> = select(ex, 4, Some(2)).iter().map(|e| e.idx).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// Writes a GSM8K-layout parquet file (snappy, as Hugging Face publishes) and reads it back.
    #[cfg(feature = "parquet")]
    #[test]
    fn parquet_layout() {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        let write = |rows: &[(&str, &str)]| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("test-00000-of-00001.parquet");
            let schema = Arc::new(
                parse_message_type(
                    "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
                )
                .unwrap(),
            );
            let props = Arc::new(
                WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .build(),
            );
            let mut writer =
                SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, props)
                    .unwrap();
            let mut rg = writer.next_row_group().unwrap();
            let mut col_idx = 0;
            while let Some(mut col) = rg.next_column().unwrap() {
                let vals: Vec<ByteArray> = rows
                    .iter()
                    .map(|r| ByteArray::from(if col_idx == 0 { r.0 } else { r.1 }))
                    .collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&vals, None, None)
                    .unwrap();
                col.close().unwrap();
                col_idx += 1;
            }
            rg.close().unwrap();
            writer.close().unwrap();
            (dir, path)
        };
        let (_dir, path) = write(&[("Q1?", "1+1=<<1+1=2>>2\n#### 2"), ("Q2?", "#### 1,000")]);
        let ex = load(&path).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!((ex[1].idx, ex[1].final_answer.as_str()), (1, "1000"));
        let (_dir, path) = write(&[("Q1?", "no final answer")]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains(":1: field `answer`"), "{err}");
    }
}
