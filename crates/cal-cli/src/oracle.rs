//! `cal-grpo oracle`: one oracle request, with the character range it located and the
//! token range it maps to.

use crate::config::{OracleFlags, PlacementFlags};
use anyhow::{anyhow, Context, Result};
use cal_core::credit::CreditConfig;
use cal_core::locate::LocateConfig;
use cal_core::map::map_span;
use cal_oracle::{locate_error, OracleRequest, SpanOutcome};
use clap::Args;
use std::io::Read;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct OracleArgs {
    #[command(flatten)]
    pub oracle: OracleFlags,
    #[arg(long)]
    pub question: String,
    /// The reference worked solution (GSM8K `answer`).
    #[arg(long)]
    pub reference: String,
    /// File holding the incorrect response, or `-` for stdin.
    #[arg(long)]
    pub response: String,
    /// `tokenizer.json` to report the token range with.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A model (Hugging Face folder or `.gguf`) whose tokenizer reports the token range.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub placement: PlacementFlags,
    /// At most this many tokens of the span are reported (0 = no cap) [default: 64].
    #[arg(long)]
    pub max_error_span: Option<usize>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn load_tokenizer(
    tokenizer: Option<&PathBuf>,
    model: Option<&PathBuf>,
    placement: &PlacementFlags,
) -> Result<Option<tokenizers::Tokenizer>> {
    if let Some(p) = tokenizer {
        return tokenizers::Tokenizer::from_file(p)
            .map(Some)
            .map_err(|e| anyhow!("{}: {e}", p.display()));
    }
    if let Some(m) = model {
        let (dev, dtype) = placement.placement().resolve()?;
        let l = cal_model::load::load(m, dtype, &dev)?;
        return Ok(Some(l.tokenizer.tokenizer));
    }
    Ok(None)
}

pub fn run(args: &OracleArgs) -> Result<()> {
    let response = if args.response == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.response)
            .with_context(|| format!("reading {}", args.response))?
    };
    let oracle = args.oracle.spec()?.build().map_err(anyhow::Error::msg)?;
    let req = OracleRequest {
        question: args.question.clone(),
        reference: args.reference.clone(),
        response: response.clone(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(locate_error(
        oracle.as_ref(),
        &req,
        &LocateConfig::default(),
    ));
    let tok = load_tokenizer(
        args.tokenizer.as_ref(),
        args.model.as_ref(),
        &args.placement,
    )?;
    let cap = args
        .max_error_span
        .unwrap_or(CreditConfig::default().max_error_span);
    let token_span = match (&tok, outcome.range()) {
        (Some(t), Some(r)) => {
            let enc = t
                .encode(response.as_str(), false)
                .map_err(|e| anyhow!("tokenizer: {e}"))?;
            map_span(enc.get_offsets(), r, cap)
        }
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"provider": oracle.provider(), "model": oracle.model(), "outcome": outcome, "token_span": token_span})
        );
        return Ok(());
    }
    match &outcome {
        SpanOutcome::Located {
            located,
            segment,
            usage,
        } => {
            println!("first error: {segment:?}");
            println!(
                "characters:  {}..{} ({:?}, similarity {:.2})",
                located.start, located.end, located.method, located.similarity
            );
            if let Some(ts) = token_span {
                println!(
                    "tokens:      {}..{}{}",
                    ts.start,
                    ts.end,
                    if ts.capped {
                        format!(" (capped from {})", ts.uncapped_len)
                    } else {
                        String::new()
                    }
                );
            }
            println!(
                "usage:       {} in / {} out tokens, {:.0} ms, ${:.6}{}",
                usage.input_tokens,
                usage.output_tokens,
                usage.latency.as_secs_f64() * 1e3,
                usage.cost_usd,
                if usage.cached { " (cached)" } else { "" }
            );
        }
        SpanOutcome::NoError { .. } => println!("no error found"),
        SpanOutcome::NotLocated {
            reason, segment, ..
        } => {
            println!("the oracle quoted {segment:?}, which is not in the response: {reason}")
        }
        SpanOutcome::Failed { failure } => {
            println!("oracle failed: {failure}");
            std::process::exit(3);
        }
    }
    Ok(())
}
