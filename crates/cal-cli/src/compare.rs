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
