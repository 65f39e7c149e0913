//! The prompt an LLM oracle receives, and a tolerant parser for its reply.
//!
//! The prompt is versioned: [`PROMPT_VERSION`] is part of the cache key, so changing
//! the wording never serves stale answers. The worked examples are our own
//! GSM8K-style problems.

use crate::{OracleRequest, Verdict};
use serde_json::Value;

/// Bump whenever [`SYSTEM_PROMPT`], [`EXAMPLES`] or [`user_message`] change.
pub const PROMPT_VERSION: &str = "cal-first-error-v1";

pub const SYSTEM_PROMPT: &str = "You are a meticulous grader of grade-school math solutions. \
You receive a math word problem, a correct reference solution, and an INCORRECT solution written by a student. \
Find the FIRST place where the incorrect solution goes wrong: a wrong calculation, a misread or invented quantity, \
a wrong operation, or an unjustified step. Copy that erroneous segment EXACTLY, character for character, from the \
incorrect solution: the shortest span (usually one equation or clause, at most one sentence) that contains the error. \
Do not paraphrase, do not fix it, do not copy from the reference. \
Reply with JSON only: {\"first_error\": \"<exact text from the incorrect solution>\"}. \
If you cannot find any error, reply {\"first_error\": null}.";

/// (question, reference, incorrect solution, first error).
pub const EXAMPLES: [(&str, &str, &str, &str); 3] = [
    (
        "A baker makes 24 muffins. She sells 3 boxes of 6 muffins. How many muffins are left?",
        "She sells 3 * 6 = <<3*6=18>>18 muffins.\n24 - 18 = <<24-18=6>>6 muffins are left.\n#### 6",
        "She sells 3 * 6 = 16 muffins. So 24 - 16 = 8 muffins are left.\n#### 8",
        "3 * 6 = 16",
    ),
    (
        "Leo reads 12 pages a day for 5 days, then 20 pages on Saturday. How many pages does he read?",
        "12 * 5 = <<12*5=60>>60 pages on weekdays.\n60 + 20 = <<60+20=80>>80 pages.\n#### 80",
        "In 5 days he reads 12 * 4 = 48 pages. Adding Saturday: 48 + 20 = 68 pages.\n#### 68",
        "12 * 4 = 48",
    ),
    (
        "A ticket costs $15 and a snack costs $4. Ana buys 2 tickets and 3 snacks. What does she spend?",
        "Tickets: 2 * 15 = <<2*15=30>>30 dollars.\nSnacks: 3 * 4 = <<3*4=12>>12 dollars.\n30 + 12 = <<30+12=42>>42\n#### 42",
        "Tickets cost 2 * 15 = 30 dollars. Snacks cost 2 * 4 = 8 dollars. Total 30 + 8 = 38.\n#### 38",
        "Snacks cost 2 * 4 = 8 dollars",
    ),
];

fn render(question: &str, reference: &str, response: &str) -> String {
    format!(
        "Problem:\n{question}\n\nCorrect reference solution:\n{reference}\n\nIncorrect solution:\n{response}\n\n\
         Copy the first erroneous segment of the incorrect solution exactly. Reply with JSON only."
    )
}

/// Chat messages (role, content): system, the worked examples as turns (`few_shot`),
/// the request.
pub fn messages(req: &OracleRequest, few_shot: bool) -> Vec<(&'static str, String)> {
    let mut out = vec![("system", SYSTEM_PROMPT.to_string())];
    let examples = if few_shot { &EXAMPLES[..] } else { &[] };
    for &(q, r, resp, err) in examples {
        out.push(("user", render(q, r, resp)));
        out.push((
            "assistant",
            serde_json::json!({ "first_error": err }).to_string(),
        ));
    }
    out.push(("user", render(&req.question, &req.reference, &req.response)));
    out
}

const KEYS: [&str; 5] = [
    "first_error",
    "error_segment",
    "segment",
    "first_error_segment",
    "error",
];

fn verdict_from_value(v: &Value) -> Option<Verdict> {
    let field = match v {
        Value::Object(map) => KEYS.iter().find_map(|k| map.get(*k))?,
        other => other,
    };
    match field {
        Value::Null => Some(Verdict::NoError),
        Value::String(s) if is_none_text(s) => Some(Verdict::NoError),
        Value::String(s) => Some(Verdict::Segment {
            text: s.clone(),
            range: None,
        }),
        _ => None,
    }
}

fn is_none_text(s: &str) -> bool {
    let t = s
        .trim()
        .trim_matches(|c: char| c == '.' || c == '"')
        .to_ascii_lowercase();
    t.is_empty()
        || matches!(
            t.as_str(),
            "none" | "null" | "no error" | "n/a" | "no errors"
        )
}

/// Parses an oracle reply: JSON (possibly inside a code fence or prose), a bare JSON
/// string, or plain text. `Err` carries the reason.
///
/// ```
/// use cal_oracle::{prompt::parse_reply, Verdict};
/// let seg = |t: &str| Verdict::Segment { text: t.into(), range: None };
/// assert_eq!(parse_reply("{\"first_error\": \"3 * 6 = 16\"}"), Ok(seg("3 * 6 = 16")));
/// assert_eq!(parse_reply("Sure!\n```json\n{\"first_error\": \"3 * 6 = 16\"}\n```"), Ok(seg("3 * 6 = 16")));
/// assert_eq!(parse_reply("{\"first_error\": null}"), Ok(Verdict::NoError));
/// assert!(parse_reply("{\"first_error\": 5}").is_err());
/// assert!(parse_reply("{\"first_error\": \"3 * 6").is_err()); // truncated inside the value
/// assert_eq!(parse_reply("{\"first_error\": \"3 * 6 = 16\", \"why"), Ok(seg("3 * 6 = 16")));
/// ```
pub fn parse_reply(raw: &str) -> Result<Verdict, String> {
    let text = raw.trim();
    if text.is_empty() {
        return Err("empty reply".into());
    }
    // Whole reply as JSON, then the outermost {...} inside prose or a code fence.
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return verdict_from_value(&v).ok_or_else(|| {
            format!(
                "JSON reply without a usable `first_error`: {}",
                excerpt(text)
            )
        });
    }
    if let Some(a) = text.find('{') {
        if let Some(b) = text.rfind('}').filter(|b| *b > a) {
            if let Ok(v) = serde_json::from_str::<Value>(&text[a..=b]) {
                return verdict_from_value(&v).ok_or_else(|| {
                    format!(
                        "JSON reply without a usable `first_error`: {}",
                        excerpt(text)
                    )
                });
            }
        }
        // Broken JSON (e.g. truncated by the token limit after the value): keep the
        // value when its string literal is complete, else give up.
        let key_value = first_error_key_value(&text[a..]);
        return key_value.ok_or_else(|| format!("malformed JSON reply: {}", excerpt(text)));
    }
    // Plain text: the segment itself, fences and quotes stripped.
    let plain = text.trim_matches('`').trim();
    if is_none_text(plain) {
        return Ok(Verdict::NoError);
    }
    Ok(Verdict::Segment {
        text: plain.to_string(),
        range: None,
    })
}

/// `"first_error": "<complete JSON string>"` inside broken JSON.
fn first_error_key_value(s: &str) -> Option<Verdict> {
    let after_key = &s[s.find("\"first_error\"")? + "\"first_error\"".len()..];
    let rest = after_key.trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with("null") {
        return Some(Verdict::NoError);
    }
    let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
    let text = de.next()?.ok()?;
    (!is_none_text(&text)).then_some(Verdict::Segment { text, range: None })
}

/// At most 200 chars of a reply, for error messages.
pub fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}
