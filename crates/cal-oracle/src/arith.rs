//! Arithmetic claims in free text: `a op b = c` statements, chains such as
//! `16 - 3 - 4 = 9`, and GSM8K's `<<expr=value>>` calculator notes.
//!
//! The text is split into arithmetic tokens (numbers with `$`, `,` and `%`, operators
//! `+ - * / x × ÷`, parentheses, `=`, `<<`, `>>`); anything else breaks an expression.
//! Around every `=` the longest valid expression on each side is taken, so that list
//! numbers, words and markdown (`**`) do not leak into a claim. A note
//! `48/2 = <<48/2=24>>24` gives two claims: the note itself (`48/2=24`) and the
//! visible one (`48/2 = 24`, whose right side is the number after `>>`).

use std::ops::Range;

/// One checked equality.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// Byte range of the claim in the text (left side start to right side end).
    pub range: Range<usize>,
    pub lhs: f64,
    pub rhs: f64,
    pub holds: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Num(f64, u32), // value, decimals written
    Op(char),
    LParen,
    RParen,
    Eq,
    NoteOpen,
    NoteClose,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

/// Reads a number at `i`: `1,234.5`, `12`, `.5`, with an optional `$` before and `%`
/// after. Returns (value, decimals, end).
fn read_number(b: &[u8], mut i: usize) -> Option<(f64, u32, usize)> {
    if b.get(i) == Some(&b'$') {
        i += 1;
    }
    let start = i;
    let mut digits = String::new();
    while i < b.len() && b[i].is_ascii_digit() {
        digits.push(b[i] as char);
        i += 1;
    }
    // thousands separators: a comma followed by exactly three digits
    while !digits.is_empty()
        && i + 3 < b.len() + 1
        && b.get(i) == Some(&b',')
        && b.get(i + 1..i + 4)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
        && !b.get(i + 4).is_some_and(u8::is_ascii_digit)
    {
        digits.push_str(std::str::from_utf8(&b[i + 1..i + 4]).ok()?);
        i += 4;
    }
    let mut decimals = 0;
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        digits.push('.');
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            digits.push(b[i] as char);
            decimals += 1;
            i += 1;
        }
    }
    if i == start || digits.is_empty() || digits == "." {
        return None;
    }
    let mut value: f64 = digits.parse().ok()?;
    if b.get(i) == Some(&b'%') {
        value /= 100.0;
        decimals += 2;
        i += 1;
    }
    Some((value, decimals, i))
}

fn tokenize(text: &str) -> Vec<Token> {
    let b = text.as_bytes();
    let mut out: Vec<Token> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = text[i..].chars().next().unwrap();
        let clen = c.len_utf8();
        if c.is_whitespace() {
            i += clen;
            continue;
        }
        let push = |out: &mut Vec<Token>, tok, end| out.push(Token { tok, start: i, end });
        if b[i].is_ascii_digit()
            || (b[i] == b'.' || b[i] == b'$')
                && b.get(i + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == b'.')
        {
            // a number glued to letters ("3rd", "2x4") is not arithmetic unless it is "x"
            if let Some((v, d, end)) = read_number(b, i) {
                let glued_before = out
                    .last()
                    .is_some_and(|t| t.end == i && t.tok == Tok::Other);
                push(
                    &mut out,
                    if glued_before {
                        Tok::Other
                    } else {
                        Tok::Num(v, d)
                    },
                    end,
                );
                i = end;
                continue;
            }
        }
        if b[i..].starts_with(b"<<") {
            push(&mut out, Tok::NoteOpen, i + 2);
            i += 2;
            continue;
        }
        if b[i..].starts_with(b">>") {
            push(&mut out, Tok::NoteClose, i + 2);
            i += 2;
            continue;
        }
        let tok = match c {
            '+' => Tok::Op('+'),
            '-' | '\u{2212}' | '\u{2013}' => Tok::Op('-'),
            '*' | '\u{d7}' | '\u{b7}' => Tok::Op('*'),
            '/' | '\u{f7}' => Tok::Op('/'),
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '=' => Tok::Eq,
            'x' | 'X' => {
                // "3 x 4": a lone x between a number and a number
                let prev_num = matches!(
                    out.last(),
                    Some(Token {
                        tok: Tok::Num(..) | Tok::RParen,
                        ..
                    })
                );
                let next = text[i + 1..].trim_start().as_bytes().first().copied();
                let lone = !text[i + 1..].starts_with(|ch: char| ch.is_alphanumeric());
                if prev_num
                    && lone
                    && next.is_some_and(|n| n.is_ascii_digit() || n == b'$' || n == b'(')
                {
                    Tok::Op('*')
                } else {
                    Tok::Other
                }
            }
            _ => Tok::Other,
        };
        // Merge runs of "other" characters into one token (cheaper, same meaning).
        match (tok, out.last_mut()) {
            (Tok::Other, Some(last)) if last.tok == Tok::Other && last.end == i => {
                last.end = i + clen
            }
            _ => push(&mut out, tok, i + clen),
        }
        i += clen;
    }
    out
}

/// Recursive-descent evaluation of `toks` as one complete expression.
fn eval(toks: &[Token]) -> Option<f64> {
    struct P<'a> {
        t: &'a [Token],
        i: usize,
    }
    impl P<'_> {
        fn peek(&self) -> Option<Tok> {
            self.t.get(self.i).map(|t| t.tok)
        }
        fn expr(&mut self) -> Option<f64> {
            let mut v = self.term()?;
            while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek() {
                self.i += 1;
                let r = self.term()?;
                v = if op == '+' { v + r } else { v - r };
            }
            Some(v)
        }
        fn term(&mut self) -> Option<f64> {
            let mut v = self.factor()?;
            while let Some(Tok::Op(op @ ('*' | '/'))) = self.peek() {
                self.i += 1;
                let r = self.factor()?;
                v = if op == '*' { v * r } else { v / r };
            }
            Some(v)
        }
        fn factor(&mut self) -> Option<f64> {
            match self.peek()? {
                Tok::Num(v, _) => {
                    self.i += 1;
                    Some(v)
                }
                Tok::Op('-') => {
                    self.i += 1;
                    self.factor().map(|v| -v)
                }
                Tok::LParen => {
                    self.i += 1;
                    let v = self.expr()?;
                    (self.peek()? == Tok::RParen).then(|| self.i += 1)?;
                    Some(v)
                }
                _ => None,
            }
        }
    }
    if toks.is_empty() {
        return None;
    }
    let mut p = P { t: toks, i: 0 };
    let v = p.expr()?;
    (p.i == toks.len()).then_some(v)
}

fn is_arith(t: &Token) -> bool {
    matches!(t.tok, Tok::Num(..) | Tok::Op(_) | Tok::LParen | Tok::RParen)
}

fn has_op(toks: &[Token]) -> bool {
    toks.iter().any(|t| matches!(t.tok, Tok::Op(_)))
        && !(toks.len() == 2 && toks[0].tok == Tok::Op('-')) // "-5" is a number, not a computation
}

/// Longest valid expression ending at `end` (exclusive): returns its start.
fn expr_ending_at(toks: &[Token], end: usize) -> Option<usize> {
    let mut run_start = end;
    while run_start > 0 && is_arith(&toks[run_start - 1]) {
        run_start -= 1;
    }
    (run_start..end).find(|&s| eval(&toks[s..end]).is_some())
}

/// Longest valid expression starting at `start`: returns its end (exclusive).
fn expr_starting_at(toks: &[Token], start: usize) -> Option<usize> {
    let mut run_end = start;
    while run_end < toks.len() && is_arith(&toks[run_end]) {
        run_end += 1;
    }
    (start + 1..=run_end)
        .rev()
        .find(|&e| eval(&toks[start..e]).is_some())
}

/// Whether `lhs = rhs` holds, allowing the rounding the writer showed (`10/3 = 3.33`).
fn close(lhs: f64, rhs: f64, rhs_decimals: u32) -> bool {
    if !lhs.is_finite() || !rhs.is_finite() {
        return false;
    }
    let rel = 1e-6 * lhs.abs().max(rhs.abs()).max(1.0);
    let rounding = if rhs_decimals > 0 {
        0.5 * 10f64.powi(-(rhs_decimals as i32)) + 1e-9
    } else {
        0.0
    };
    (lhs - rhs).abs() <= rel.max(rounding)
}

fn decimals_of(toks: &[Token]) -> u32 {
    match toks {
        [Token {
            tok: Tok::Num(_, d),
            ..
        }] => *d,
        [Token {
            tok: Tok::Op('-'), ..
        }, Token {
            tok: Tok::Num(_, d),
            ..
        }] => *d,
        _ => 0,
    }
}

/// All arithmetic claims of `text`, in order of where they start.
pub fn claims(text: &str) -> Vec<Claim> {
    let toks = tokenize(text);
    let mut out = Vec::new();
    for (k, t) in toks.iter().enumerate() {
        if t.tok != Tok::Eq {
            continue;
        }
        let Some(ls) = expr_ending_at(&toks, k) else {
            continue;
        };
        // `expr = <<note>> result`: the visible right side is the number after `>>`.
        let mut rs = k + 1;
        if toks.get(rs).map(|t| t.tok) == Some(Tok::NoteOpen) {
            match toks[rs..].iter().position(|t| t.tok == Tok::NoteClose) {
                Some(off) => rs += off + 1,
                None => continue,
            }
        }
        let Some(re) = expr_starting_at(&toks, rs) else {
            continue;
        };
        let (lhs_t, rhs_t) = (&toks[ls..k], &toks[rs..re]);
        if !has_op(lhs_t) && !has_op(rhs_t) {
            continue; // "x = 5", "2 = 2": nothing computed
        }
        let (Some(lhs), Some(rhs)) = (eval(lhs_t), eval(rhs_t)) else {
            continue;
        };
        let mut holds = close(lhs, rhs, decimals_of(rhs_t));
        // Running totals "3 * 4 = 12 + 5 = 17": the middle side starts with the result.
        if !holds && toks.get(re).map(|t| t.tok) == Some(Tok::Eq) {
            if let Tok::Num(first, d) = rhs_t[0].tok {
                holds = close(lhs, first, d);
            }
        }
        out.push(Claim {
            range: toks[ls].start..toks[re - 1].end,
            lhs,
            rhs,
            holds,
        });
    }
    // The number written after a note must be the note's value: "<<48/2=24>>23".
    for (k, t) in toks.iter().enumerate() {
        if t.tok != Tok::NoteClose {
            continue;
        }
        let Some(open) = toks[..k].iter().rposition(|t| t.tok == Tok::NoteOpen) else {
            continue;
        };
        let Some(eq) = toks[open..k]
            .iter()
            .rposition(|t| t.tok == Tok::Eq)
            .map(|e| e + open)
        else {
            continue;
        };
        let (
            Some(note_value),
            Some(Token {
                tok: Tok::Num(shown, _),
                end,
                ..
            }),
        ) = (eval(&toks[eq + 1..k]), toks.get(k + 1))
        else {
            continue;
        };
        if !close(note_value, *shown, decimals_of(&toks[k + 1..k + 2])) {
            out.push(Claim {
                range: toks[open].start..*end,
                lhs: note_value,
                rhs: *shown,
                holds: false,
            });
        }
    }
    out.sort_by_key(|c| (c.range.start, std::cmp::Reverse(c.range.end)));
    out
}

/// Every number written in `text` (for the reference oracle).
pub fn numbers(text: &str) -> Vec<(f64, Range<usize>)> {
    tokenize(text)
        .into_iter()
        .filter_map(|t| match t.tok {
            Tok::Num(v, _) => Some((v, t.start..t.end)),
            _ => None,
        })
        .collect()
}

/// Whether two values are equal up to floating error (for the reference oracle).
pub fn same_value(a: f64, b: f64) -> bool {
    close(a, b, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(t: &str) -> Vec<(String, bool)> {
        claims(t)
            .into_iter()
            .map(|c| (t[c.range].to_string(), c.holds))
            .collect()
    }

    #[test]
    fn plain_and_chain() {
        assert_eq!(
            texts("So 16 - 3 - 4 = 9 eggs."),
            vec![("16 - 3 - 4 = 9".into(), true)]
        );
        assert_eq!(
            texts("She pays $1,200 + $300 = $1,600."),
            vec![("$1,200 + $300 = $1,600".into(), false)]
        );
        assert_eq!(texts("1. 5 + 3 = 8"), vec![("5 + 3 = 8".into(), true)]);
        assert_eq!(texts("**2 x 4 = 8**"), vec![("2 x 4 = 8".into(), true)]);
        assert_eq!(texts("10 / 3 = 3.33"), vec![("10 / 3 = 3.33".into(), true)]);
        assert_eq!(texts("50% * 40 = 20"), vec![("50% * 40 = 20".into(), true)]);
        assert_eq!(texts("x = 5 and 2 = 2"), vec![]);
    }

    #[test]
    fn notes() {
        assert_eq!(
            texts("48/2 = <<48/2=24>>24 clips"),
            vec![
                ("48/2 = <<48/2=24>>24".into(), true),
                ("48/2=24".into(), true)
            ]
        );
        let t = texts("48/2 = <<48/2=24>>23 clips");
        assert_eq!(t[0], ("48/2 = <<48/2=24>>23".into(), false));
        assert!(t.iter().any(|(s, h)| s == "<<48/2=24>>23" && !h));
        assert_eq!(texts("<<3*5=16>>16"), vec![("3*5=16".into(), false)]);
    }

    #[test]
    fn running_total() {
        assert!(texts("3 * 4 = 12 + 5 = 17").iter().all(|(_, h)| *h));
        assert!(!texts("3 * 4 = 13 + 5 = 18").iter().all(|(_, h)| *h));
    }
}
