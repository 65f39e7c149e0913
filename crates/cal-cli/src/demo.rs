//! `cal-grpo demo`: one wrong answer through oracle → locate → map → token rewards,
//! with the penalised tokens marked.

use crate::config::OracleFlags;
use anyhow::{anyhow, Context, Result};
use cal_core::credit::{token_advantages, CreditConfig, CreditMode, RolloutCredit};
use cal_core::locate::LocateConfig;
use cal_core::map::map_span;
use cal_model::tokenizer::TokenizerBundle;
use cal_oracle::{locate_error, OracleRequest};
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub oracle: OracleFlags,
    /// `tokenizer.json` to tokenise with (default: a byte-level BPE trained on the spot).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

const QUESTION: &str =
    "A bakery makes 24 muffins. It sells 3 boxes of 6 muffins and gives away 2 muffins. \
How many muffins are left?";
const REFERENCE: &str = "The bakery sells 3 * 6 = <<3*6=18>>18 muffins.\nIt has 24 - 18 - 2 = <<24-18-2=4>>4 muffins left.\n#### 4";
const CORRECT: &str =
    "The bakery sells 3 * 6 = 18 muffins. Then 24 - 18 - 2 = 4 muffins are left.\n#### 4";
const WRONG: &str =
    "The bakery sells 3 * 6 = 16 muffins. Then 24 - 16 - 2 = 6 muffins are left.\n#### 6";

pub fn run(args: &DemoArgs) -> Result<()> {
    let tok = match &args.tokenizer {
        Some(p) => {
            tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow!("{}: {e}", p.display()))?
        }
        None => {
            let corpus = cal_core::data::generate(300, 1, &Default::default())
                .into_iter()
                .map(|e| format!("{} {}", e.question, e.answer))
                .chain([QUESTION, REFERENCE, CORRECT, WRONG].map(String::from));
            let b: TokenizerBundle = cal_model::tokenizer::train_tiny(corpus, 500)?;
            b.tokenizer
        }
    };
    println!(
        "question:  {QUESTION}\nreference: {}\n",
        REFERENCE.replace('\n', " | ")
    );
    println!(
        "a group of G = 2 rollouts: one correct, one wrong\n  correct: {}\n  wrong:   {}\n",
        CORRECT.replace('\n', " | "),
        WRONG.replace('\n', " | ")
    );
    let oracle = args.oracle.spec()?.build().map_err(anyhow::Error::msg)?;
    let req = OracleRequest {
        question: QUESTION.into(),
        reference: REFERENCE.into(),
        response: WRONG.into(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(locate_error(
        oracle.as_ref(),
        &req,
        &LocateConfig::default(),
    ));
    println!("1. oracle ({} / {}):", oracle.provider(), oracle.model());
    let Some(range) = outcome.range() else {
        println!(
            "   no span: {outcome:?}\n   the wrong rollout falls back to its outcome advantage"
        );
        return Ok(());
    };
    println!("   first error {:?}", &WRONG[range.clone()]);
    println!("2. locate: characters {}..{}", range.start, range.end);
    let enc = |t: &str| tok.encode(t, false).map_err(|e| anyhow!("tokenizer: {e}"));
    let (ec, ew) = (enc(CORRECT)?, enc(WRONG)?);
    let cap = CreditConfig::default().max_error_span;
    let span = map_span(ew.get_offsets(), range, cap).context("span maps to no token")?;
    println!(
        "3. map: tokens {}..{} of {}",
        span.start,
        span.end,
        ew.len()
    );
    let width = ec.len().max(ew.len());
    let row = |n: usize, correct: bool, span: Option<std::ops::Range<usize>>| RolloutCredit {
        reward: f64::from(u8::from(correct)),
        correct,
        mask: (0..width).map(|t| t < n).collect(),
        span,
    };
    let rollouts = [
        row(ec.len(), true, None),
        row(ew.len(), false, Some(span.range())),
    ];
    println!("4. credit: token advantages of the wrong rollout ([[...]] = penalised)");
    let color = std::io::stdout().is_terminal();
    for mode in [CreditMode::Outcome, CreditMode::Span] {
        let adv = token_advantages(
            &rollouts,
            2,
            &CreditConfig {
                mode,
                ..CreditConfig::default()
            },
        )?;
        let mut line = String::new();
        for (t, tokstr) in ew.get_tokens().iter().enumerate() {
            let text = tokstr.replace('Ġ', " ").replace('Ċ', "⏎");
            let a = adv.row(1)[t];
            if a < 0.0 && mode == CreditMode::Span {
                if color {
                    line.push_str(&format!("\x1b[1;31m[[{text}]]\x1b[0m"));
                } else {
                    line.push_str(&format!("[[{text}]]"));
                }
            } else {
                line.push_str(&text);
            }
        }
        let nonzero = adv.row(1).iter().filter(|a| **a != 0.0).count();
        println!(
            "   {:<8} {nonzero:>2} of {} tokens carry signal (value {:+.3}): {line}",
            mode.name(),
            ew.len(),
            adv.row(1)
                .iter()
                .find(|a| **a != 0.0)
                .copied()
                .unwrap_or(0.0)
        );
    }
    println!("\noutcome GRPO blames every token of the wrong answer equally; CAL blames only the first error.");
    Ok(())
}
