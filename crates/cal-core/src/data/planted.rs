//! Wrong solutions whose first error is known exactly, for measuring first-error
//! oracles: a reference solution (GSM8K's, or a generated chain's, both with
//! `<<a op b = c>>` notes) with one step corrupted and the corruption carried forward
//! through the later steps, which stay correct arithmetic on the wrong values.
//!
//! Three kinds of error, as models make them:
//! - [`Slip::Result`]: the step's result is wrong (`48 / 2 = 26`); the calculator sees it.
//! - [`Slip::Operand`]: an operand is misread (`48 / 3 = 16`); every statement is true,
//!   so only an oracle that knows the problem sees it.
//! - [`Slip::Operation`]: the wrong operation (`48 + 2 = 50`); true arithmetic, as above.
//!
//! The response is the solution as a model writes it (notes removed); the label is the
//! corrupted step's statement, with its character offset in the response.

use super::gsm8k::Example;
use super::sets::fmt_number;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The kind of planted error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slip {
    Result,
    Operand,
    Operation,
}

impl Slip {
    pub const ALL: [Slip; 3] = [Slip::Result, Slip::Operand, Slip::Operation];

    pub fn name(self) -> &'static str {
        match self {
            Slip::Result => "result",
            Slip::Operand => "operand",
            Slip::Operation => "operation",
        }
    }
}

/// One labeled response, the row format `oracle-bench --labels` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub question: String,
    pub reference: String,
    pub response: String,
    /// The first erroneous segment (a substring of `response`), or `None` for a response
    /// without error.
    pub first_error: Option<String>,
    /// Character offset of `first_error` in `response`, where the text repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error_start: Option<usize>,
    /// What was planted (`result`, `operand`, `operation`; none for a correct response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Slip>,
    /// The source problem's `idx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idx: Option<u64>,
}

/// A note `<<a op b = c>>` whose visible statement (`a op b = c`, `$` signs and `x`
/// allowed) stands right before it, as in `48/2 = <<48/2=24>>24`.
#[derive(Debug, Clone)]
struct Step {
    /// Byte range of the visible statement and the note, through the result after it.
    span: std::ops::Range<usize>,
    a: f64,
    op: char,
    b: f64,
    /// The visible operator (`x` for `*` where the text writes it so) and `$` prefixes.
    op_text: String,
    dollar: bool,
}

fn parse_num(s: &str) -> Option<f64> {
    let t: String = s.chars().filter(|c| *c != ',' && *c != '$').collect();
    t.trim().parse().ok()
}

fn apply(a: f64, op: char, b: f64) -> Option<f64> {
    let v = match op {
        '+' => a + b,
        '-' => a - b,
        '*' => a * b,
        '/' if b != 0.0 => a / b,
        _ => return None,
    };
    v.is_finite().then_some(v)
}

/// The steps of `answer`, in order: its `<<a op b = c>>` notes with their visible
/// statements (GSM8K), or, in a solution without notes (the embedded chains), its
/// `a op b = c` statements. `None` when a step is not of that one-operation shape (the
/// whole solution is then left alone: a step that cannot be rewritten could not carry
/// the corruption forward).
fn steps(answer: &str) -> Option<Vec<Step>> {
    let noted = answer.contains("<<");
    let note = if noted { r"<<(?P<note>[^<>]*)>>" } else { "" };
    let re = regex::Regex::new(&format!(
        r"(?P<a>\$?[0-9][0-9.,]*)\s*(?P<op>[-+*/x×])\s*(?P<b>\$?[0-9][0-9.,]*)\s*=\s*(?P<dollar>\$?){note}(?P<c>[0-9][0-9.,]*)"
    ))
    .ok()?;
    let ok = |x: f64, y: f64| (x - y).abs() <= 1e-6 * y.abs().max(1.0);
    let mut out = Vec::new();
    for c in re.captures_iter(answer) {
        let vis_op = c.name("op")?.as_str();
        let op = match vis_op {
            "x" | "×" => '*',
            o => o.chars().next()?,
        };
        let (a, b) = (
            parse_num(c.name("a")?.as_str())?,
            parse_num(c.name("b")?.as_str())?,
        );
        let shown = parse_num(c.name("c")?.as_str())?;
        // the note must say what its visible statement says
        if let Some(note) = c.name("note") {
            let (expr, res) = note.as_str().split_once('=')?;
            let ops: Vec<(usize, char)> = expr
                .char_indices()
                .skip(1)
                .filter(|(_, ch)| "+-*/".contains(*ch))
                .collect();
            let [(i, note_op)] = ops[..] else { return None };
            let (na, nb) = (parse_num(&expr[..i])?, parse_num(&expr[i + 1..])?);
            if !(ok(na, a) && ok(nb, b) && note_op == op && ok(shown, parse_num(res)?)) {
                return None;
            }
        }
        if !ok(apply(a, op, b)?, shown) {
            return None;
        }
        let m = c.get(0)?;
        // a trailing `.` of the result belongs to the sentence, not the number
        let mut end = m.end();
        if c.name("c")?.as_str().ends_with(['.', ',']) {
            end -= 1;
        }
        out.push(Step {
            span: m.start()..end,
            a,
            op,
            b,
            op_text: vis_op.to_string(),
            dollar: !c.name("dollar")?.as_str().is_empty(),
        });
    }
    // every note (or, without notes, every `=`) must be a step
    let expected = if noted {
        answer.matches("<<").count()
    } else {
        answer.matches('=').count()
    };
    (out.len() == expected && !out.is_empty()).then_some(out)
}

/// Plants `kind` at a step drawn by `rng` and carries it forward. `None` when the
/// solution has no rewritable steps or the kind does not apply (an operation swap that
/// leaves the value unchanged, a division by zero).
pub fn plant(ex: &Example, kind: Slip, rng: &mut impl Rng) -> Option<Label> {
    let body = ex.solution_steps();
    let steps = steps(body)?;
    let k = rng.random_range(0..steps.len());
    let old_c = apply(steps[k].a, steps[k].op, steps[k].b)?;
    // the corrupted step: its (a, op, b, shown result)
    let (a, op, b) = (steps[k].a, steps[k].op, steps[k].b);
    let (na, nop, nb, shown) = match kind {
        Slip::Result => {
            let delta = [1.0, 2.0, 10.0][rng.random_range(0..3)];
            let sign = if rng.random_bool(0.5) || old_c - delta < 0.0 {
                1.0
            } else {
                -1.0
            };
            (a, op, b, old_c + sign * delta)
        }
        Slip::Operand => {
            let delta = [1.0, 2.0][rng.random_range(0..2)];
            let na = if a > delta { a - delta } else { a + delta };
            (na, op, b, apply(na, op, b)?)
        }
        Slip::Operation => {
            let nop = match op {
                '+' => '-',
                '-' => '+',
                '*' => '+',
                _ => '*',
            };
            (a, nop, b, apply(a, nop, b)?)
        }
    };
    if (shown - old_c).abs() < 1e-9 || shown < 0.0 {
        return None;
    }
    // values the later steps read: each old value maps to its corrupted one
    let mut changed: Vec<(f64, f64)> = vec![(old_c, shown)];
    let same = |x: f64, y: f64| (x - y).abs() <= 1e-9 * y.abs().max(1.0);
    let swap = |x: f64, changed: &[(f64, f64)]| {
        changed
            .iter()
            .rev()
            .find(|(o, _)| same(x, *o))
            .map_or(x, |(_, n)| *n)
    };
    let op_text = |s: &Step, op: char| {
        if op == s.op {
            s.op_text.clone()
        } else {
            op.to_string()
        }
    };
    let statement = |s: &Step, a: f64, op: char, b: f64, c: f64| {
        let d = if s.dollar { "$" } else { "" };
        format!(
            "{} {} {} = {d}{}",
            fmt_number(a),
            op_text(s, op),
            fmt_number(b),
            fmt_number(c)
        )
    };
    let mut out = String::new();
    let mut last = 0;
    let mut first_error = (0, String::new());
    for (i, s) in steps.iter().enumerate() {
        // plain text up to this step, notes removed
        out.push_str(&super::gsm8k::strip_notes(&body[last..s.span.start]));
        last = s.span.end;
        let text = match i.cmp(&k) {
            // steps before the error stay as the solution wrote them
            std::cmp::Ordering::Less => super::gsm8k::strip_notes(&body[s.span.clone()]),
            std::cmp::Ordering::Equal => {
                let t = statement(s, na, nop, nb, shown);
                first_error = (out.chars().count(), t.clone());
                t
            }
            std::cmp::Ordering::Greater => {
                let (a2, b2) = (swap(s.a, &changed), swap(s.b, &changed));
                let old = apply(s.a, s.op, s.b)?;
                let new = apply(a2, s.op, b2)?;
                if !same(new, old) {
                    changed.push((old, new));
                }
                statement(s, a2, s.op, b2, new)
            }
        };
        out.push_str(&text);
    }
    out.push_str(&super::gsm8k::strip_notes(&body[last..]));
    // the final answer follows the last step it depends on
    let old_final: f64 = ex.final_answer.parse().ok()?;
    let new_final = swap(old_final, &changed);
    out.push_str(&format!("\n#### {}", fmt_number(new_final)));
    let (start, text) = first_error;
    let repeats = out.matches(text.as_str()).count() > 1
        || out.find(text.as_str()).map(|b| out[..b].chars().count()) != Some(start);
    Some(Label {
        question: ex.question.clone(),
        reference: ex.answer.clone(),
        response: out,
        first_error: Some(text),
        first_error_start: repeats.then_some(start),
        kind: Some(kind),
        idx: Some(ex.idx),
    })
}

/// The reference solution as a correct response (notes removed): a case where an
/// oracle must find no error.
pub fn correct(ex: &Example) -> Label {
    Label {
        question: ex.question.clone(),
        reference: ex.answer.clone(),
        response: super::gsm8k::strip_notes(&ex.answer),
        first_error: None,
        first_error_start: None,
        kind: None,
        idx: Some(ex.idx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn natalia() -> Example {
        Example::new(
            0,
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?".into(),
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72".into(),
        )
        .unwrap()
    }

    fn at_step(kind: Slip, step: usize) -> Label {
        // draw seeds until the planted step is `step` (the step is the rng's first draw)
        (0..200)
            .filter_map(|s| {
                plant(
                    &natalia(),
                    kind,
                    &mut rand_chacha::ChaCha8Rng::seed_from_u64(s),
                )
            })
            .find(|l| {
                let first = l.response.lines().next().unwrap();
                (step == 0) == first.contains(l.first_error.as_deref().unwrap())
            })
            .unwrap()
    }

    #[test]
    fn a_result_slip_is_carried_into_the_later_steps() {
        let l = at_step(Slip::Result, 0);
        let e = l.first_error.clone().unwrap();
        assert!(e.starts_with("48 / 2 = ") && e != "48 / 2 = 24", "{e}");
        let wrong: f64 = e.rsplit(' ').next().unwrap().parse().unwrap();
        let second = l.response.lines().nth(1).unwrap();
        let want = format!("48 + {} = {}", wrong, 48.0 + wrong);
        assert!(second.contains(&want), "{second} should hold {want}");
        assert!(l.response.ends_with(&format!("#### {}", 48.0 + wrong)));
        assert!(!l.response.contains("<<"));
        assert_eq!(
            l.response.find(&e),
            Some(l.response.lines().next().unwrap().find(&e).unwrap())
        );
    }

    #[test]
    fn operand_and_operation_errors_are_true_arithmetic_on_wrong_values() {
        let l = at_step(Slip::Operand, 0);
        let e = l.first_error.unwrap();
        assert!(e == "46 / 2 = 23" || e == "47 / 2 = 23.5", "{e}");
        let l = at_step(Slip::Operation, 1);
        assert_eq!(l.first_error.as_deref(), Some("48 - 24 = 24"));
        assert!(l
            .response
            .starts_with("Natalia sold 48/2 = 24 clips in May."));
        assert!(l.response.ends_with("#### 24"));
        // the label text occurs twice ("48 / 2 = 24" vs "48 - 24 = 24" do not; offsets hold)
        let start = l
            .first_error_start
            .unwrap_or_else(|| l.response.find("48 - 24").unwrap());
        let chars: String = l.response.chars().skip(start).take(12).collect();
        assert_eq!(chars, "48 - 24 = 24");
    }

    #[test]
    fn chains_without_notes_are_planted_too() {
        let ex = Example::new(
            3,
            "Start with 3. Subtract 1. Add 13. Multiply by 3. What is the result?".into(),
            "3 - 1 = 2\n2 + 13 = 15\n15 * 3 = 45\n#### 45".into(),
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut seen = 0;
        for kind in Slip::ALL {
            for _ in 0..5 {
                let Some(l) = plant(&ex, kind, &mut rng) else {
                    continue;
                };
                seen += 1;
                let err = l.first_error.clone().unwrap();
                let at = l.response.find(&err).unwrap();
                // before the error: the solution as written; the answer follows the error
                assert!(ex.answer.starts_with(&l.response[..at]), "{}", l.response);
                assert_ne!(l.response.lines().last(), ex.answer.lines().last());
            }
        }
        assert!(seen >= 10, "{seen}");
        // a false statement in the solution: not a reference to plant into
        let bad = Example::new(
            3,
            ex.question.clone(),
            "3 - 1 = 2\n2 + 13 = 16\n#### 16".into(),
        )
        .unwrap();
        assert!(plant(&bad, Slip::Result, &mut rng).is_none());
    }

    #[test]
    fn solutions_that_cannot_be_rewritten_are_left_out() {
        let multi = Example::new(
            1,
            "q".into(),
            "It is 2+3*4 = <<2+3*4=14>>14.\n#### 14".into(),
        )
        .unwrap();
        assert!(plant(
            &multi,
            Slip::Result,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0)
        )
        .is_none());
        let none = Example::new(2, "q".into(), "It is 5.\n#### 5".into()).unwrap();
        assert!(plant(
            &none,
            Slip::Result,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0)
        )
        .is_none());
        assert_eq!(
            correct(&natalia()).response.lines().next().unwrap(),
            "Natalia sold 48/2 = 24 clips in May."
        );
    }
}
