//! Times the tiny SFT + eval recipe (calibration aid).
use cal_train::evaluate::{evaluate, EvalConfig};
use cal_train::tiny::{tiny_policy, TinySpec};

fn main() -> anyhow::Result<()> {
    let mut spec = TinySpec::default();
    if let Ok(s) = std::env::var("SFT_STEPS") {
        spec.sft.steps = s.parse()?;
    }
    if let Ok(s) = std::env::var("HIDDEN") {
        spec.hidden_size = s.parse()?;
    }
    let root = std::path::PathBuf::from(std::env::var("ROOT").unwrap_or("/tmp/calcache".into()));
    let t0 = std::time::Instant::now();
    let tp = tiny_policy(&spec, &root)?;
    eprintln!("sft: {:?} in {:.1}s", tp.sft, t0.elapsed().as_secs_f64());
    let (_, test) = spec.splits();
    let t1 = std::time::Instant::now();
    let r = evaluate(
        &tp.policy,
        &test[..100],
        &EvalConfig {
            max_new_tokens: 96,
            ..Default::default()
        },
        "eval",
    )?;
    eprintln!(
        "eval acc {:.3} in {:.1}s",
        r.accuracy.accuracy,
        t1.elapsed().as_secs_f64()
    );
    for g in r.examples.iter().take(3) {
        eprintln!("---\n{}\n=> {}", g.question, g.response);
    }
    let wrong: Vec<_> = r.examples.iter().filter(|g| !g.correct).collect();
    let located = wrong
        .iter()
        .filter(|g| {
            matches!(
                cal_oracle::calculator::check(&g.response),
                cal_oracle::Verdict::Segment { .. }
            )
        })
        .count();
    eprintln!(
        "wrong {} of which calculator-located {}",
        wrong.len(),
        located
    );
    Ok(())
}
