//! `cal-grpo compare A B`: two evaluation reports side by side, with curves when both
//! trained.

use anyhow::{bail, Result};
use cal_train::config::RunConfig;
use cal_train::evaluate::EvalReport;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Two results files or run folders, baseline first
    /// [default: runs/baseline-seed42 runs/cal-seed42].
    pub runs: Vec<PathBuf>,
    /// Where to draw the training curves (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// `compare A B`: any two evaluation reports (of `eval`, `train` or an experiment arm).
pub fn run(args: &CompareArgs) -> Result<()> {
    let (runs, out) = (&args.runs[..], args.plot.as_deref());
    let (a, b) = match runs {
        [a, b] => (a.clone(), b.clone()),
        [] => (
            PathBuf::from("runs/baseline-seed42"),
            PathBuf::from("runs/cal-seed42"),
        ),
        _ => bail!("compare takes two results files or run folders (baseline first)"),
    };
    let (ra, rb) = (EvalReport::read(&a)?, EvalReport::read(&b)?);
    let (na, nb) = if ra.name == rb.name {
        // e.g. two `eval --predictions` reports: tell them apart by their files
        (a.display().to_string(), b.display().to_string())
    } else {
        (ra.name.clone(), rb.name.clone())
    };
    if let Some(w) = prompt_warning(&ra, &rb) {
        eprintln!("warning: {w}");
    }
    let c = cal_train::study::compare::compare(&na, &ra.examples, &nb, &rb.examples)?;
    println!("{}", c.table());
    for r in [&ra, &rb] {
        if r.samples > 1 {
            println!("{}: pass@{} {:.2}%", r.name, r.samples, 100.0 * r.pass_at_k);
        }
    }
    let dir_of = |p: &Path| {
        if p.is_dir() {
            p.to_path_buf()
        } else {
            p.parent().unwrap_or(Path::new(".")).to_path_buf()
        }
    };
    let (da, db) = (dir_of(&a), dir_of(&b));
    if !da.join("metrics.jsonl").exists() || !db.join("metrics.jsonl").exists() {
        return Ok(()); // evaluations without training: no curves to draw
    }
    let png = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| db.join("comparison_curves.png"));
    let runs = [(na, da), (nb, db)];
    match cal_train::study::compare::plot_curves(&runs, "reward/accuracy", &png) {
        Ok(()) => println!("training curves: {}", png.display()),
        Err(e) => eprintln!("plot skipped: {e:#}"),
    }
    // held-out accuracy during training, when both runs logged it (--eval-every)
    let per_step = ra
        .config
        .as_ref()
        .and_then(|c| serde_json::from_value::<RunConfig>(c.clone()).ok())
        .map_or(0, |c| {
            c.rollout.prompts_per_step * c.rollout.num_generations
        });
    let arms: Vec<(String, Vec<PathBuf>)> = runs
        .iter()
        .map(|(n, d)| (n.clone(), vec![d.clone()]))
        .collect();
    let held_out = png.with_file_name("held_out_curves.png");
    if cal_train::study::compare::plot_held_out(&arms, per_step, &held_out).is_ok() {
        println!("held-out accuracy curves: {}", held_out.display());
    }
    Ok(())
}

/// Two reports asked their models with different prompts: their accuracies measure the
/// prompt as much as the model. Reports written before prompts were recorded carry none.
fn prompt_warning(a: &EvalReport, b: &EvalReport) -> Option<String> {
    match (&a.prompt, &b.prompt) {
        (Some(pa), Some(pb)) if pa != pb => {
            let mut diffs = Vec::new();
            if pa.template != pb.template {
                diffs.push("template");
            }
            if pa.system != pb.system {
                diffs.push("system prompt");
            }
            if pa.instruction != pb.instruction {
                diffs.push("instruction");
            }
            if pa.shots != pb.shots {
                diffs.push("few-shot examples");
            }
            Some(format!(
                "{} and {} were made with different prompts ({})",
                a.name,
                b.name,
                diffs.join(", ")
            ))
        }
        (Some(_), None) | (None, Some(_)) => Some(format!(
            "only one of {} and {} records its prompt; they may have been made with different prompts",
            a.name, b.name
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cal_train::prompt::PromptFormat;

    #[test]
    fn reports_with_different_prompts_are_flagged() {
        let mut a = EvalReport::new("a", "a", Vec::new(), 0);
        let mut b = EvalReport::new("b", "b", Vec::new(), 0);
        assert_eq!(prompt_warning(&a, &b), None);
        a.prompt = Some(PromptFormat::default());
        b.prompt = Some(PromptFormat::default());
        assert_eq!(prompt_warning(&a, &b), None);
        b.prompt.as_mut().unwrap().system = Some("Be brief.".into());
        let w = prompt_warning(&a, &b).unwrap();
        assert!(w.contains("different prompts (system prompt)"), "{w}");
        b.prompt = None;
        assert!(prompt_warning(&a, &b).unwrap().contains("only one"));
    }
}
