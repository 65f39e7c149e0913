//! Preference pairs in TRL's format: rows with `prompt`, `chosen` and `rejected`, each
//! a string or a list of chat messages (`{"role", "content"}`), as JSONL or parquet.
//! An optional `first_error_start` (a character offset into the rejected answer, as
//! `cal-grpo make-pairs` writes it) places the first wrong step for first-error credit.
//!
//! A row without one of the three fields, or with an empty answer, is an error naming
//! the file, the line and the field; a pair whose two answers are the same teaches
//! nothing and is skipped and counted.

use super::gsm8k::DataError;
use serde_json::Value;
use std::path::Path;

/// A prompt or an answer: plain text, or chat messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    Text(String),
    /// `(role, content)` in order.
    Messages(Vec<(String, String)>),
}

impl Turns {
    /// The text of an answer: the string, or the messages' contents joined (an answer
    /// given as messages is normally one assistant turn).
    pub fn answer_text(&self) -> String {
        match self {
            Turns::Text(s) => s.clone(),
            Turns::Messages(m) => m
                .iter()
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
    /// Character offset of the first error in the rejected answer's text, if known.
    pub first_error_start: Option<usize>,
    /// The row's line (JSONL) or row number (parquet), 1-based, for messages.
    pub line: usize,
}

/// The pairs of a file, and how many rows were skipped because both answers were the
/// same.
#[derive(Debug, Clone, Default)]
pub struct PreferenceSet {
    pub pairs: Vec<PreferencePair>,
    pub identical_skipped: usize,
}

/// Reads a preference file, choosing the reader by extension (`.jsonl`/`.json` or
/// `.parquet`).
pub fn load_pairs(path: &Path) -> Result<PreferenceSet, DataError> {
    let rows: Vec<(usize, Value)> = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => {
            let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
                path: path.into(),
                source,
            })?;
            jsonl_rows(&text, path)?
        }
        Some("parquet") => parquet_rows(path)?,
        _ => {
            return Err(DataError::Format {
                path: path.into(),
                message: "unknown preference file format (expected .jsonl or .parquet)".into(),
            })
        }
    };
    let mut set = PreferenceSet::default();
    for (line, v) in rows {
        let pair = parse_row(&v, line, path)?;
        if pair.chosen == pair.rejected {
            set.identical_skipped += 1;
        } else {
            set.pairs.push(pair);
        }
    }
    Ok(set)
}

/// Parses preference JSONL text; `path` only labels errors.
pub fn parse_pairs_jsonl(text: &str, path: &Path) -> Result<PreferenceSet, DataError> {
    let mut set = PreferenceSet::default();
    for (line, v) in jsonl_rows(text, path)? {
        let pair = parse_row(&v, line, path)?;
        if pair.chosen == pair.rejected {
            set.identical_skipped += 1;
        } else {
            set.pairs.push(pair);
        }
    }
    Ok(set)
}

fn jsonl_rows(text: &str, path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(raw).map_err(|e| DataError::Json {
            path: path.into(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push((i + 1, v));
    }
    Ok(out)
}

#[cfg(feature = "parquet")]
fn parquet_rows(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let fmt = |message: String| DataError::Format {
        path: path.into(),
        message,
    };
    let data = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let read = || -> Result<Vec<(usize, Value)>, DataError> {
        let reader = SerializedFileReader::new(bytes::Bytes::from(data))
            .map_err(|e| fmt(format!("not a readable parquet file: {e}")))?;
        let mut out = Vec::new();
        let rows = reader.get_row_iter(None).map_err(|e| fmt(e.to_string()))?;
        for (i, row) in rows.enumerate() {
            let row = row.map_err(|e| fmt(format!("row {}: {e}", i + 1)))?;
            out.push((i + 1, row_json(&row)));
        }
        Ok(out)
    };
    // as for GSM8K files: the parquet reader panics on some damaged pages
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
        .unwrap_or_else(|_| Err(fmt("damaged parquet file".into())))
}

/// A parquet row as JSON: strings, integers, lists and nested rows (the shapes of
/// TRL's columns: strings, or lists of `{role, content}` structs).
#[cfg(feature = "parquet")]
fn row_json(row: &parquet::record::Row) -> Value {
    use parquet::record::Field;
    fn field(f: &Field) -> Value {
        match f {
            Field::Str(s) => Value::String(s.clone()),
            Field::Long(v) => Value::from(*v),
            Field::Int(v) => Value::from(*v),
            Field::Group(r) => row_json(r),
            Field::ListInternal(l) => Value::Array(l.elements().iter().map(field).collect()),
            _ => Value::Null,
        }
    }
    Value::Object(
        row.get_column_iter()
            .map(|(k, f)| (k.clone(), field(f)))
            .collect(),
    )
}

#[cfg(not(feature = "parquet"))]
fn parquet_rows(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    Err(DataError::Format {
        path: path.into(),
        message: "parquet support is not compiled in (enable cal-core's `parquet` feature)".into(),
    })
}

fn parse_row(v: &Value, line: usize, path: &Path) -> Result<PreferencePair, DataError> {
    let err = |field: &'static str, problem: &str| DataError::Field {
        path: path.into(),
        line,
        field,
        problem: problem.to_string(),
    };
    let turns = |field: &'static str| -> Result<Turns, DataError> {
        let t = match v.get(field) {
            None | Some(Value::Null) => return Err(err(field, "is missing")),
            Some(Value::String(s)) => Turns::Text(s.clone()),
            Some(Value::Array(items)) => {
                let mut m = Vec::with_capacity(items.len());
                for item in items {
                    let (Some(role), Some(content)) = (
                        item.get("role").and_then(Value::as_str),
                        item.get("content").and_then(Value::as_str),
                    ) else {
                        return Err(err(
                            field,
                            "is a list whose items are not {\"role\", \"content\"} messages",
                        ));
                    };
                    m.push((role.to_string(), content.to_string()));
                }
                Turns::Messages(m)
            }
            Some(_) => return Err(err(field, "is not a string or a list of messages")),
        };
        Ok(t)
    };
    let prompt = turns("prompt")?;
    let chosen = turns("chosen")?;
    let rejected = turns("rejected")?;
    for (field, t) in [("chosen", &chosen), ("rejected", &rejected)] {
        if t.answer_text().trim().is_empty() {
            return Err(err(field, "is empty"));
        }
    }
    let first_error_start = match v.get("first_error_start") {
        None | Some(Value::Null) => None,
        Some(x) => {
            let at = x
                .as_u64()
                .ok_or_else(|| err("first_error_start", "is not a non-negative integer"))?
                as usize;
            if at >= rejected.answer_text().chars().count() {
                return Err(err(
                    "first_error_start",
                    "is past the end of the rejected answer",
                ));
            }
            Some(at)
        }
    };
    Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
        first_error_start,
        line,
    })
}

/// The answers' first differing step, for first-error credit: in the rejected answer,
/// the line holding the first error (where the two answers first differ, or the
/// labelled `first_error_start` when that is later: a rejected answer may differ
/// harmlessly first); in the chosen answer, the line with the same index. Each as a
/// character range, its newline included; everything after it is carried forward from
/// the error and dropped. `None` when one answer is a prefix of the other.
pub fn first_differing_step(
    chosen: &str,
    rejected: &str,
    first_error_start: Option<usize>,
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let c: Vec<char> = chosen.chars().collect();
    let r: Vec<char> = rejected.chars().collect();
    let common = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
    if common == c.len() || common == r.len() {
        return None;
    }
    let error = first_error_start
        .unwrap_or(common)
        .max(common)
        .min(r.len() - 1);
    let k = r[..error].iter().filter(|&&ch| ch == '\n').count();
    Some((nth_line(&c, k), nth_line(&r, k)))
}

/// Line `k` of `s` (the last line when there are fewer) as a character range, its
/// newline included.
fn nth_line(s: &[char], k: usize) -> std::ops::Range<usize> {
    let mut start = 0;
    for _ in 0..k {
        match s[start..].iter().position(|&ch| ch == '\n') {
            Some(p) if start + p + 1 < s.len() => start += p + 1,
            _ => break,
        }
    }
    let end = s[start..]
        .iter()
        .position(|&ch| ch == '\n')
        .map_or(s.len(), |p| start + p + 1);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PreferenceSet, DataError> {
        parse_pairs_jsonl(text, Path::new("prefs.jsonl"))
    }

    #[test]
    fn strings_and_messages_are_read_as_trl_writes_them() {
        let set = parse(concat!(
            r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"#,
            "\n\n",
            r#"{"prompt": [{"role": "user", "content": "2+3?"}], "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}], "first_error_start": 0}"#,
            "\n",
            r#"{"prompt": "same", "chosen": "a", "rejected": "a"}"#,
        ))
        .unwrap();
        assert_eq!(set.pairs.len(), 2);
        assert_eq!(set.identical_skipped, 1);
        assert_eq!(set.pairs[0].chosen, Turns::Text("4".into()));
        assert_eq!(
            set.pairs[1].prompt,
            Turns::Messages(vec![("user".into(), "2+3?".into())])
        );
        assert_eq!(set.pairs[1].rejected.answer_text(), "6");
        assert_eq!(
            (set.pairs[1].first_error_start, set.pairs[1].line),
            (Some(0), 3)
        );
    }

    #[test]
    fn bad_rows_name_the_file_line_and_field() {
        let cases = [
            (
                r#"{"prompt": "q", "chosen": "a"}"#,
                "prefs.jsonl:1: field `rejected` is missing",
            ),
            (
                r#"{"prompt": "q", "chosen": "  ", "rejected": "b"}"#,
                "field `chosen` is empty",
            ),
            (
                r#"{"chosen": "a", "rejected": "b"}"#,
                "field `prompt` is missing",
            ),
            (
                r#"{"prompt": 3, "chosen": "a", "rejected": "b"}"#,
                "field `prompt` is not a string",
            ),
            (
                r#"{"prompt": "q", "chosen": [{"role": "x"}], "rejected": "b"}"#,
                "field `chosen` is a list",
            ),
            (
                r#"{"prompt": "q", "chosen": "a", "rejected": "b", "first_error_start": 9}"#,
                "past the end",
            ),
            ("not json", "prefs.jsonl:1: invalid JSON"),
        ];
        for (row, want) in cases {
            let e = parse(row).unwrap_err().to_string();
            assert!(e.contains(want), "{row}: {e}");
        }
        let e = parse("{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{}")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("prefs.jsonl:2:"), "{e}");
    }

    #[test]
    fn the_first_differing_step_is_the_line_where_the_answers_part() {
        let chosen = "3 * 4 = 12\n12 + 5 = 17\n17 - 2 = 15\n#### 15";
        let rejected = "3 * 4 = 12\n12 + 5 = 18\n18 - 2 = 16\n#### 16";
        let (c, r) = first_differing_step(chosen, rejected, None).unwrap();
        let cs: String = chosen.chars().collect::<Vec<_>>()[c].iter().collect();
        let rs: String = rejected.chars().collect::<Vec<_>>()[r].iter().collect();
        assert_eq!(
            (cs.as_str(), rs.as_str()),
            ("12 + 5 = 17\n", "12 + 5 = 18\n")
        );
        // a labelled first error later than the first difference moves the step there
        let rejected2 = "3 * 4 = 12.\n12 + 5 = 18\n18 - 2 = 16\n#### 16";
        let at = rejected2.find("12 + 5 = 18").unwrap();
        let (c, r) = first_differing_step(chosen, rejected2, Some(at)).unwrap();
        let rs: String = rejected2.chars().collect::<Vec<_>>()[r].iter().collect();
        let cs: String = chosen.chars().collect::<Vec<_>>()[c].iter().collect();
        assert_eq!(
            (cs.as_str(), rs.as_str()),
            ("12 + 5 = 17\n", "12 + 5 = 18\n")
        );
        // one answer a prefix of the other: no step to credit
        assert!(first_differing_step("ab", "abc", None).is_none());
    }
}
