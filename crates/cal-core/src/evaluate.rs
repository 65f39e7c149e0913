//! Grading a set of responses against a dataset: per-example records and accuracies.
//!
//! Used by `cal-grpo eval --predictions` (precomputed responses, no model) and by the
//! model-based evaluation, so both report the same metrics the same way.

use crate::data::Example;
use crate::grade::{grade, Extraction};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One response to grade, keyed by dataset `idx` or by question text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub idx: Option<u64>,
    pub question: Option<String>,
    pub response: String,
}

/// One graded response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradedExample {
    pub idx: u64,
    pub question: String,
    pub response: String,
    pub extracted: Extraction,
    /// The answer used for `correct` ([`Extraction::best`]).
    pub extracted_answer: Option<String>,
    pub gold: String,
    pub strict_correct: bool,
    pub flexible_correct: bool,
    pub correct: bool,
}

/// Accuracy summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub total: usize,
    pub strict_correct: usize,
    pub flexible_correct: usize,
    pub correct: usize,
    pub strict_accuracy: f64,
    pub flexible_accuracy: f64,
    pub accuracy: f64,
    /// Distinct dataset items that received at least one response.
    pub items_covered: usize,
    pub dataset_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PredictionError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Row {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// Reads prediction rows (`response` plus `idx` or `question`) from JSONL.
pub fn load_predictions(path: &Path) -> Result<Vec<(usize, Prediction)>, PredictionError> {
    let text = std::fs::read_to_string(path).map_err(|source| PredictionError::Io {
        path: path.into(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let row_err = |problem: String| PredictionError::Row {
            path: path.into(),
            line,
            problem,
        };
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| row_err(format!("invalid JSON: {e}")))?;
        let response = match v.get("response") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => return Err(row_err("field `response` is not a string".into())),
            None => return Err(row_err("field `response` is missing".into())),
        };
        let idx = match v.get("idx") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .ok_or_else(|| row_err("field `idx` is not a non-negative integer".into()))?,
            ),
        };
        let question = v
            .get("question")
            .and_then(|q| q.as_str())
            .map(str::to_string);
        if idx.is_none() && question.is_none() {
            return Err(row_err(
                "needs an `idx` or a `question` field to match the dataset".into(),
            ));
        }
        out.push((
            line,
            Prediction {
                idx,
                question,
                response,
            },
        ));
    }
    Ok(out)
}

/// Grades one response against one example.
pub fn grade_example(ex: &Example, response: &str) -> GradedExample {
    let g = grade(response, &ex.final_answer);
    GradedExample {
        idx: ex.idx,
        question: ex.question.clone(),
        response: response.to_string(),
        extracted_answer: g.extraction.best().map(str::to_string),
        extracted: g.extraction,
        gold: ex.final_answer.clone(),
        strict_correct: g.strict_correct,
        flexible_correct: g.flexible_correct,
        correct: g.correct,
    }
}

/// Matches predictions to dataset items (by `idx`, else by trimmed question text) and
/// grades them. An unmatched prediction is an error naming its line.
pub fn grade_predictions(
    dataset: &[Example],
    predictions: &[(usize, Prediction)],
    predictions_path: &Path,
) -> Result<Vec<GradedExample>, PredictionError> {
    let by_idx: HashMap<u64, &Example> = dataset.iter().map(|e| (e.idx, e)).collect();
    let by_question: HashMap<&str, &Example> =
        dataset.iter().map(|e| (e.question.trim(), e)).collect();
    predictions
        .iter()
        .map(|(line, p)| {
            let ex = match (&p.idx, &p.question) {
                (Some(i), _) => by_idx.get(i).copied(),
                (None, Some(q)) => by_question.get(q.trim()).copied(),
                (None, None) => None,
            };
            let ex = ex.ok_or_else(|| PredictionError::Row {
                path: predictions_path.into(),
                line: *line,
                problem: match p.idx {
                    Some(i) => format!("idx {i} is not in the dataset"),
                    None => "question is not in the dataset".into(),
                },
            })?;
            Ok(grade_example(ex, &p.response))
        })
        .collect()
}

/// Summarises graded examples.
pub fn accuracy(graded: &[GradedExample], dataset_size: usize) -> Accuracy {
    let total = graded.len();
    let count = |f: fn(&GradedExample) -> bool| graded.iter().filter(|g| f(g)).count();
    let frac = |n: usize| {
        if total == 0 {
            0.0
        } else {
            n as f64 / total as f64
        }
    };
    let (strict_correct, flexible_correct, correct) = (
        count(|g| g.strict_correct),
        count(|g| g.flexible_correct),
        count(|g| g.correct),
    );
    let items_covered = graded
        .iter()
        .map(|g| g.idx)
        .collect::<std::collections::HashSet<_>>()
        .len();
    Accuracy {
        total,
        strict_correct,
        flexible_correct,
        correct,
        strict_accuracy: frac(strict_correct),
        flexible_accuracy: frac(flexible_correct),
        accuracy: frac(correct),
        items_covered,
        dataset_size,
    }
}
