//! A seeded generator of GSM8K-format multi-step arithmetic word problems.
//!
//! It is the embedded default dataset: no download, any size, and difficulty that can
//! be tuned so that a small policy is sometimes right and sometimes slips in one step,
//! which is where first-error credit matters. Solutions are written exactly like
//! GSM8K's (`a + b = <<a+b=c>>c` notes, a final `#### N` line), so the same grader and
//! the same calculator oracle serve both.
//!
//! Every problem is a function of `(seed, index)` only: asking for more problems never
//! changes the earlier ones.
//!
//! ```
//! use cal_core::data::{generate, GenConfig};
//! let ex = generate(3, 42, &GenConfig::default());
//! assert_eq!(ex.len(), 3);
//! assert!(ex[0].answer.contains("<<") && ex[0].answer.contains("#### "));
//! assert_eq!(ex, generate(3, 42, &GenConfig::default()));
//! ```

use super::Example;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a problem is worded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// A GSM8K-like word problem ("Mia has 7 apples. She buys 5 more apples. ...") with
    /// `<<a+b=c>>` notes in the solution.
    #[default]
    Story,
    /// The bare chain ("Start with 7. Add 5. Multiply by 3. What is the result?"), one
    /// `a op b = c` line per step: few tokens per step, so a small model's capacity and
    /// a short SFT go to the arithmetic.
    Chain,
}

impl Style {
    fn is_story(&self) -> bool {
        *self == Style::Story
    }
}

/// Difficulty knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenConfig {
    /// Number of arithmetic steps (operations after the starting quantity), inclusive.
    pub min_steps: usize,
    pub max_steps: usize,
    /// Largest starting quantity and largest addend/subtrahend.
    pub max_operand: u64,
    /// Largest multiplier/divisor (at least 2 to allow × and ÷).
    pub max_factor: u64,
    /// Allow multiplication and division steps.
    pub mul_div: bool,
    /// Wording; not serialised when `story`, so that specs (and caches keyed by them)
    /// written before it existed keep their identity.
    #[serde(default, skip_serializing_if = "Style::is_story")]
    pub style: Style,
    /// Largest intermediate value (`None`: only `max_operand` and `max_factor` bound
    /// them, up to `max_operand × max_factor²`). Two-digit chains keep the arithmetic
    /// within what a small model learns in minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value: Option<u64>,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            min_steps: 2,
            max_steps: 3,
            max_operand: 20,
            max_factor: 5,
            mul_div: true,
            style: Style::Story,
            max_value: None,
        }
    }
}

const NAMES: [(&str, &str, &str); 12] = [
    ("Mia", "She", "her"),
    ("Liam", "He", "his"),
    ("Ava", "She", "her"),
    ("Noah", "He", "his"),
    ("Emma", "She", "her"),
    ("Omar", "He", "his"),
    ("Sofia", "She", "her"),
    ("Ken", "He", "his"),
    ("Zoe", "She", "her"),
    ("Ravi", "He", "his"),
    ("Lena", "She", "her"),
    ("Tom", "He", "his"),
];

const ITEMS: [&str; 12] = [
    "apples", "books", "coins", "stickers", "marbles", "pencils", "cookies", "shells", "cards",
    "eggs", "flowers", "stamps",
];

#[derive(Debug, Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// Generates `n` problems from `seed`.
pub fn generate(n: usize, seed: u64, cfg: &GenConfig) -> Vec<Example> {
    (0..n as u64).map(|i| generate_one(i, seed, cfg)).collect()
}

fn generate_one(index: u64, seed: u64, cfg: &GenConfig) -> Example {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    let (name, pron, poss) = NAMES[rng.random_range(0..NAMES.len())];
    let items = ITEMS[rng.random_range(0..ITEMS.len())];
    let max_operand = cfg.max_operand.max(2);
    let max_factor = cfg.max_factor.max(2);
    let steps = rng.random_range(cfg.min_steps.max(1)..=cfg.max_steps.max(cfg.min_steps.max(1)));

    let mut cur = rng.random_range(2..=max_operand);
    let chain = cfg.style == Style::Chain;
    let mut question = vec![if chain {
        format!("Start with {cur}.")
    } else {
        format!("{name} has {cur} {items}.")
    }];
    let mut solution = Vec::new();
    for _ in 0..steps {
        let divisors: Vec<u64> = (2..=max_factor)
            .filter(|k| cur % k == 0 && cur / k >= 1)
            .collect();
        let cap = cfg.max_value.map_or(u64::MAX, |v| v.max(max_operand));
        let mut ops = Vec::new();
        if cur < cap {
            ops.push(Op::Add);
        }
        if cur >= 2 {
            ops.push(Op::Sub);
        }
        if cfg.mul_div
            && cur * max_factor <= max_operand * max_factor * max_factor
            && cur * 2 <= cap
        {
            ops.push(Op::Mul);
        }
        if cfg.mul_div && !divisors.is_empty() {
            ops.push(Op::Div);
        }
        let op = ops[rng.random_range(0..ops.len())];
        let (k, new, sym, q, verb) = match op {
            Op::Add => {
                let k = rng.random_range(1..=max_operand.min(cap - cur));
                let q = match rng.random_range(0..3) {
                    0 => format!("{pron} buys {k} more {items}."),
                    1 => format!("{pron} finds {k} more {items}."),
                    _ => format!("A friend gives {name} {k} more {items}."),
                };
                (k, cur + k, '+', q, "has")
            }
            Op::Sub => {
                let k = rng.random_range(1..cur.min(max_operand + 1));
                let q = match rng.random_range(0..3) {
                    0 => format!("{pron} gives away {k} {items}."),
                    1 => format!("{pron} loses {k} {items}."),
                    _ => format!("{pron} uses {k} of {poss} {items}."),
                };
                (k, cur - k, '-', q, "has")
            }
            Op::Mul => {
                let k = rng.random_range(2..=max_factor.min(cap / cur));
                let q =
                    format!("Then the number of {items} {name} has becomes {k} times as large.");
                (k, cur * k, '*', q, "has")
            }
            Op::Div => {
                let k = divisors[rng.random_range(0..divisors.len())];
                let q = format!(
                    "{pron} splits {poss} {items} into {k} equal groups and keeps one group."
                );
                (k, cur / k, '/', q, "keeps")
            }
        };
        if chain {
            let q = match op {
                Op::Add => format!("Add {k}."),
                Op::Sub => format!("Subtract {k}."),
                Op::Mul => format!("Multiply by {k}."),
                Op::Div => format!("Divide by {k}."),
            };
            question.push(q);
            solution.push(format!("{cur} {sym} {k} = {new}"));
        } else {
            question.push(q);
            solution.push(format!(
                "{name} {verb} {cur} {sym} {k} = <<{cur}{sym}{k}={new}>>{new} {items}."
            ));
        }
        cur = new;
    }
    question.push(if chain {
        "What is the result?".to_string()
    } else {
        format!("How many {items} does {name} have now?")
    });
    solution.push(format!("#### {cur}"));
    Example::new(index, question.join(" "), solution.join("\n"))
        .expect("generated answers end in #### N")
}

/// A question as compared for overlap between splits: lower case, letters and digits
/// only, words separated by single spaces. Two problems that differ only in spacing,
/// case or punctuation are the same problem.
pub fn normalize_question(q: &str) -> String {
    q.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Problems for several splits from one seed, no question in two of them (nor twice in
/// one): the generator's stream is read in order, each new problem whose normalised
/// question was already taken is skipped, and the rest are dealt to the splits in turn
/// (the first `sizes[0]` to split 0, and so on). Different seeds alone do not give
/// this: short problems repeat across seeds. An error when the knobs allow fewer
/// distinct problems than asked for.
pub fn generate_disjoint(
    sizes: &[usize],
    seed: u64,
    cfg: &GenConfig,
) -> Result<Vec<Vec<Example>>, String> {
    let total: usize = sizes.iter().sum();
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<Vec<Example>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    let (mut split, mut index, mut skipped) = (0, 0u64, 0usize);
    // a budget of draws: the stream rarely repeats, but narrow knobs run out of problems
    let budget = 20 * total as u64 + 1000;
    while split < sizes.len() {
        if out[split].len() == sizes[split] {
            split += 1;
            continue;
        }
        if index == budget {
            return Err(format!(
                "only {} distinct problems in {budget} draws ({skipped} repeats) for the {total} \
                 asked for: widen the knobs (more steps, larger operands) or ask for fewer",
                seen.len()
            ));
        }
        let ex = generate_one(index, seed, cfg);
        index += 1;
        if seen.insert(normalize_question(&ex.question)) {
            out[split].push(ex);
        } else {
            skipped += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grade::parse_number;
    use regex::Regex;

    #[test]
    fn notes_are_correct_and_chain() {
        let re = Regex::new(r"<<(\d+)([-+*/])(\d+)=(\d+)>>").unwrap();
        for cfg in [
            GenConfig::default(),
            GenConfig {
                min_steps: 4,
                max_steps: 6,
                max_operand: 99,
                max_factor: 9,
                mul_div: true,
                style: Style::Story,
                max_value: None,
            },
            GenConfig {
                mul_div: false,
                ..Default::default()
            },
            GenConfig {
                min_steps: 6,
                max_steps: 6,
                max_value: Some(99),
                ..Default::default()
            },
        ] {
            for ex in generate(300, 7, &cfg) {
                let mut last = None;
                let mut n = 0;
                for c in re.captures_iter(&ex.answer) {
                    let (a, b, r): (u64, u64, u64) = (
                        c[1].parse().unwrap(),
                        c[3].parse().unwrap(),
                        c[4].parse().unwrap(),
                    );
                    let want = match &c[2] {
                        "+" => a + b,
                        "-" => a - b,
                        "*" => a * b,
                        _ => {
                            assert_eq!(a % b, 0, "inexact division in {}", ex.answer);
                            a / b
                        }
                    };
                    assert_eq!(r, want, "{}", ex.answer);
                    if let Some(prev) = last {
                        assert_eq!(a, prev, "steps must chain: {}", ex.answer);
                    }
                    if !cfg.mul_div {
                        assert!(matches!(&c[2], "+" | "-"));
                    }
                    if let Some(cap) = cfg.max_value {
                        assert!(r <= cap, "{r} over the cap {cap}: {}", ex.answer);
                    }
                    last = Some(r);
                    n += 1;
                }
                assert!((cfg.min_steps..=cfg.max_steps).contains(&n), "{n} steps");
                assert_eq!(parse_number(&ex.final_answer), Some(last.unwrap() as f64));
            }
        }
    }

    #[test]
    fn chain_style_states_each_step_once() {
        let re = Regex::new(r"(?m)^(\d+) ([-+*/]) (\d+) = (\d+)$").unwrap();
        let cfg = GenConfig {
            min_steps: 4,
            max_steps: 4,
            style: Style::Chain,
            ..GenConfig::default()
        };
        let story = generate(
            50,
            3,
            &GenConfig {
                style: Style::Story,
                ..cfg
            },
        );
        for (ex, st) in generate(50, 3, &cfg).iter().zip(&story) {
            assert!(
                ex.question.starts_with("Start with ")
                    && ex.question.ends_with("What is the result?")
            );
            assert_eq!(re.captures_iter(&ex.answer).count(), 4, "{}", ex.answer);
            assert!(!ex.answer.contains("<<"));
            // the same numbers as the story wording of the same (seed, index)
            assert_eq!(ex.final_answer, st.final_answer);
        }
        // the default style is not serialised: specs written before it keep their form
        let json = serde_json::to_string(&GenConfig::default()).unwrap();
        assert!(!json.contains("style"), "{json}");
        assert!(serde_json::to_string(&cfg)
            .unwrap()
            .contains("\"style\":\"chain\""));
    }

    #[test]
    fn prefix_stable_and_seed_sensitive() {
        let cfg = GenConfig::default();
        let a = generate(20, 1, &cfg);
        assert_eq!(a[..5], generate(5, 1, &cfg)[..]);
        assert_ne!(a, generate(20, 2, &cfg));
    }

    #[test]
    fn disjoint_splits_share_no_question() {
        let cfg = GenConfig::default();
        let parts = generate_disjoint(&[300, 200, 100], 5, &cfg).unwrap();
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![300, 200, 100]
        );
        let distinct = |xs: &[Example]| {
            let mut q: Vec<String> = xs.iter().map(|e| normalize_question(&e.question)).collect();
            q.sort();
            q.dedup();
            q.len()
        };
        assert_eq!(distinct(&parts.concat()), 600, "a question in two splits");
        // narrow knobs repeat within a few hundred draws: the filter has work to do
        let small = GenConfig {
            min_steps: 1,
            max_steps: 2,
            max_operand: 6,
            max_factor: 3,
            ..GenConfig::default()
        };
        assert!(distinct(&generate(300, 5, &small)) < 300);
        let parts = generate_disjoint(&[150, 150], 5, &small).unwrap();
        assert_eq!(distinct(&parts.concat()), 300);
        assert_eq!(
            normalize_question("Mia has  7 Apples. She buys 5!"),
            "mia has 7 apples she buys 5"
        );
        // knobs too narrow for the ask
        let narrow = GenConfig {
            min_steps: 1,
            max_steps: 1,
            max_operand: 3,
            max_factor: 2,
            ..GenConfig::default()
        };
        let err = generate_disjoint(&[5000], 1, &narrow).unwrap_err();
        assert!(err.contains("distinct problems"), "{err}");
    }
}
