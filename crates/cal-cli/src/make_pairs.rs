//! `cal-grpo make-pairs`: preference pairs in TRL's format from labeled responses (what
//! `plant-errors` writes, or graded model rollouts in the same rows): the chosen answer
//! is the reference solution (its calculator notes removed, as in the responses), the rejected one the wrong response, with the first
//! error's character offset for first-error credit.

use anyhow::{Context, Result};
use cal_core::data::gsm8k::strip_notes;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct MakePairsArgs {
    /// Labeled responses (JSONL: question, reference, response, first_error or null,
    /// optional first_error_start), e.g. from `cal-grpo plant-errors`. Responses
    /// without an error make no pair.
    #[arg(long)]
    pub labels: PathBuf,
    /// Write the prompt and answers as chat messages (user, assistant), so a chat
    /// model's template applies; plain strings otherwise.
    #[arg(long)]
    pub chat: bool,
    /// The JSONL file to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: &MakePairsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.labels)
        .with_context(|| format!("reading {}", args.labels.display()))?;
    let cases = cal_oracle::bench::parse_labels(&text, &args.labels).map_err(anyhow::Error::msg)?;
    let (mut out, mut pairs, mut correct) = (String::new(), 0, 0);
    for c in &cases {
        let Some(gold) = &c.gold else {
            correct += 1;
            continue;
        };
        let l = &c.label;
        let start = l.response[..gold.start].chars().count();
        // the chosen answer in the rejected one's form (planted responses carry no
        // `<<a*b=c>>` notes): the two then differ only from the error on, and DPO
        // cannot learn "notes mean chosen"
        let chosen = strip_notes(&l.reference);
        let (prompt, chosen, rejected) = if args.chat {
            let turn = |role: &str, content: &str| json!([{"role": role, "content": content}]);
            (
                turn("user", &l.question),
                turn("assistant", &chosen),
                turn("assistant", &l.response),
            )
        } else {
            (json!(l.question), json!(chosen), json!(l.response))
        };
        let row = json!({
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "first_error_start": start,
        });
        out.push_str(&serde_json::to_string(&row)?);
        out.push('\n');
        pairs += 1;
    }
    std::fs::write(&args.output, out)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "{pairs} pairs written to {} ({correct} responses without an error make none)",
        args.output.display()
    );
    Ok(())
}
