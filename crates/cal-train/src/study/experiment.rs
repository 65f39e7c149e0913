//! Baseline GRPO vs CAL-GRPO at equal compute: same seed, data, steps, generations and
//! test items, then the paired comparison. `seeds > 1` repeats and aggregates. More
//! arms (PPO with outcome rewards, PPO with CAL's span rewards) run beside the two at
//! the same budget and are compared with the baseline ([`OtherArm`]).

use crate::algorithm::AlgorithmKind;
use crate::collective::{Collective, SingleProcess};
use crate::config::{RunConfig, RunKind};
use crate::evaluate::{evaluate, EvalConfig, EvalReport};
use crate::policy::PolicySource;
use crate::prompt::PromptFormat;
use crate::rundir::{RunLock, Start};
use crate::study::compare::{compare, plot_curves, plot_held_out, Comparison};
use crate::study::stats;
use crate::trainer::{RunEnd, Trainer};
use anyhow::{bail, Result};
use cal_core::credit::CreditMode;
use cal_core::data::Example;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct ExperimentConfig {
    pub out_dir: PathBuf,
    pub seeds: Vec<u64>,
    /// Template for both runs; `credit.mode`, `run.seed` and `run.output-dir` are set
    /// per run.
    pub run: RunConfig,
    /// The CAL run's credit mode (span unless asked otherwise).
    pub cal_mode: CreditMode,
    pub eval: EvalConfig,
    /// Arms run beside `baseline` and `cal` (in this order, after them in each seed).
    pub others: Vec<OtherArm>,
    /// The prompt of every arm (`PromptFormat::of(&run.data, train)`), for the
    /// evaluation before RL.
    pub prompt: PromptFormat,
}

/// An arm beside the two: its folder name and what it trains with. The same seed,
/// data, steps and rollouts as the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtherArm {
    pub name: &'static str,
    pub algorithm: AlgorithmKind,
    /// With the CAL run's credit mode (oracle spans), else outcome credit.
    pub cal: bool,
}

impl OtherArm {
    /// `--arms grpo,cal-grpo,ppo,cal-ppo`: the arms past the two that always run
    /// (`grpo` and `cal-grpo`, the `baseline` and `cal` folders). Names and what they
    /// train: [`RunKind::ALL`].
    pub fn parse_list(names: &[String]) -> Result<Vec<OtherArm>> {
        let mut out: Vec<OtherArm> = Vec::new();
        for n in names {
            let Some(k) = RunKind::named(n.trim()) else {
                let known: Vec<&str> = RunKind::ALL.iter().map(|k| k.arm).collect();
                bail!(
                    "--arms: unknown arm {:?} (expected {}; grpo and cal-grpo, the baseline \
                     and cal folders, always run)",
                    n.trim(),
                    known.join(", ")
                );
            };
            if k.algorithm == AlgorithmKind::Grpo {
                continue;
            }
            let arm = OtherArm {
                name: k.name,
                algorithm: k.algorithm,
                cal: k.cal,
            };
            if !out.contains(&arm) {
                out.push(arm);
            }
        }
        Ok(out)
    }
}

/// One arm beside the two in one seed, against that seed's baseline.
#[derive(Debug, Clone, Serialize)]
pub struct OtherResult {
    pub name: String,
    pub accuracy: f64,
    pub vs_baseline: Comparison,
    pub curve: Vec<(f64, f64)>,
    /// Steps for this arm to reach the baseline's final held-out accuracy over the
    /// baseline's steps (as [`SeedResult::efficiency_ratio`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub efficiency_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub before: f64,
    pub baseline: f64,
    pub cal: f64,
    pub comparison: Comparison,
    pub baseline_all_wrong_frac: f64,
    pub cal_all_wrong_frac: f64,
    pub cal_spans_located_frac: f64,
    /// Steps for CAL to reach the baseline's final held-out accuracy over the
    /// baseline's steps (`None` without `eval.every`; infinite: never reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub efficiency_ratio: Option<f64>,
    /// Held-out accuracy (step, accuracy) during training, when `eval.every` is set.
    pub baseline_curve: Vec<(f64, f64)>,
    pub cal_curve: Vec<(f64, f64)>,
    /// The arms beside the two, in the experiment's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<OtherResult>,
}

fn mean_metric(dir: &Path, metric: &str) -> f64 {
    let c = crate::study::compare::read_curve(dir, metric);
    c.iter().map(|p| p.1).sum::<f64>() / c.len().max(1) as f64
}

/// One training run of an experiment: one arm of one seed, everything a separate
/// process needs to train and evaluate it (it is written to disk as JSON for that).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arm {
    /// `baseline` or `cal`.
    pub name: String,
    pub dir: PathBuf,
    pub run: RunConfig,
    pub eval: EvalConfig,
    /// The experiment's "before RL" report: the held-out evaluation of the starting
    /// policy, which is the curve's first point (not decoded again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<PathBuf>,
}

impl Arm {
    /// Where a child process's output goes: beside the arm's folder, which the trainer
    /// may move aside when it starts over.
    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    /// Finished earlier: its report is there and a checkpoint backs it.
    pub fn finished(&self) -> bool {
        self.dir.join(EvalReport::FILE).exists() && crate::checkpoint::latest(&self.dir).is_some()
    }
}

/// Trains and evaluates the arms of an experiment. [`Sequential`] trains them one
/// after another in this process; the CLI can also train several at once, each in a
/// child process with its share of the CPU threads (`experiment --jobs`).
pub trait ArmRunner {
    /// One report per arm, in `arms`' order. A finished arm is reused, never redone;
    /// an interrupted one continues from its checkpoint.
    fn run_arms(&self, arms: &[Arm]) -> Result<Vec<EvalReport>>;

    /// The ranks every arm trains on (one process by default): rank 0 evaluates,
    /// compares and writes the experiment's folder; the others only train.
    fn ranks(&self) -> Arc<dyn Collective> {
        Arc::new(SingleProcess)
    }
}

/// The arms one after another, in this process.
pub struct Sequential<'a> {
    pub source: &'a dyn PolicySource,
    pub train: &'a [Example],
    pub test: &'a [Example],
    /// Each arm on all of these ranks (data parallel under `mpirun`).
    pub ranks: Arc<dyn Collective>,
}

impl ArmRunner for Sequential<'_> {
    fn run_arms(&self, arms: &[Arm]) -> Result<Vec<EvalReport>> {
        let mut reports = Vec::new();
        for arm in arms {
            let r = train_and_eval_on(self.source, arm, self.train, self.test, &self.ranks)?;
            reports.extend(r);
        }
        Ok(reports)
    }

    fn ranks(&self) -> Arc<dyn Collective> {
        self.ranks.clone()
    }
}

/// Runs (or, with a checkpoint in its folder, continues) one arm and evaluates it.
/// A run that finished earlier is reused, never redone.
pub fn train_and_eval(
    source: &dyn PolicySource,
    arm: &Arm,
    train: &[Example],
    test: &[Example],
) -> Result<EvalReport> {
    let one: Arc<dyn Collective> = Arc::new(SingleProcess);
    train_and_eval_on(source, arm, train, test, &one)?
        .ok_or_else(|| anyhow::anyhow!("one process is rank 0"))
}

/// [`train_and_eval`] on every rank of `ranks`: rank 0 evaluates and writes the
/// report (`Some`), the others train and return `None`.
pub fn train_and_eval_on(
    source: &dyn PolicySource,
    arm: &Arm,
    train: &[Example],
    test: &[Example],
    ranks: &Arc<dyn Collective>,
) -> Result<Option<EvalReport>> {
    let dir = &arm.dir;
    if arm.finished() {
        return ranks.is_main().then(|| EvalReport::read(dir)).transpose();
    }
    let resume = crate::checkpoint::latest(dir).is_some();
    let mut cfg = arm.run.clone();
    cfg.run.output_dir = Some(dir.to_path_buf());
    let config = serde_json::to_value(&cfg)?;
    // An arm killed before its first checkpoint starts over; its partial logs are
    // moved aside rather than mixed into the new ones.
    let start = if resume {
        Start::Resume
    } else {
        Start::Overwrite
    };
    let mut trainer = Trainer::new_on(cfg, source.fresh()?, train.to_vec(), start, ranks.clone())?
        .with_held_out(test.to_vec(), arm.eval.clone());
    if let Some(before) = &arm.before {
        let r = EvalReport::read(before)?;
        let same = r.config == Some(serde_json::to_value(&arm.eval)?)
            && r.prompt.as_ref() == Some(&trainer.policy.prompt);
        if same && r.examples.len() == test.len() {
            trainer = trainer.with_start_eval(r.examples);
        }
    }
    if trainer.run()? == RunEnd::Interrupted {
        bail!("interrupted; rerun the same command to continue");
    }
    if !ranks.is_main() {
        return Ok(None);
    }
    let graded = match trainer.held_out_now() {
        Some(g) => g.to_vec(),
        None => evaluate(
            &trainer.policy,
            test,
            &arm.eval,
            &format!("eval {}", arm.name),
        )?,
    };
    // A LoRA arm leaves its adapter in PEFT's format (a few MB): `export --adapter`
    // merges it into the starting model to evaluate the arm on other sets.
    if trainer.policy.model.lora.is_some() {
        cal_model::peft::export_adapter(&trainer.policy.model, &dir.join("adapter"))?;
    }
    let mut report = EvalReport::new(&arm.name, dir.display().to_string(), graded, test.len());
    report.config = Some(config);
    report.prompt = Some(trainer.policy.prompt.clone());
    report.write(dir)?;
    Ok(Some(report))
}

/// The arms of each seed, in order: baseline, CAL, then the others, for every seed.
pub fn arms(cfg: &ExperimentConfig) -> Vec<Arm> {
    let before = cfg.out_dir.join("before");
    let mut arms = Vec::new();
    let two = [
        ("baseline", cfg.run.run.algorithm, CreditMode::Outcome),
        ("cal", cfg.run.run.algorithm, cfg.cal_mode),
    ];
    let others = cfg.others.iter().map(|o| {
        let mode = if o.cal {
            cfg.cal_mode
        } else {
            CreditMode::Outcome
        };
        (o.name, o.algorithm, mode)
    });
    let all: Vec<_> = two.into_iter().chain(others).collect();
    for &seed in &cfg.seeds {
        let sdir = cfg.out_dir.join(format!("seed-{seed}"));
        for &(name, algorithm, mode) in &all {
            let mut run = cfg.run.clone();
            run.run.seed = seed;
            run.run.algorithm = algorithm;
            run.credit.mode = mode;
            arms.push(Arm {
                name: name.into(),
                dir: sdir.join(name),
                run,
                eval: cfg.eval.clone(),
                before: Some(before.clone()),
            });
        }
    }
    arms
}

/// The experiment: "before RL", then every arm through `runner`, then the comparison
/// of each seed and the summary over seeds.
pub fn run(
    source: &dyn PolicySource,
    cfg: &ExperimentConfig,
    test: &[Example],
    runner: &dyn ArmRunner,
) -> Result<Vec<SeedResult>> {
    // One experiment per folder at a time; each arm's trainer also locks its own.
    // Under several ranks rank 0 evaluates and writes; the others wait, then read.
    let ranks = runner.ranks();
    let main = ranks.is_main();
    let _lock = main.then(|| RunLock::acquire(&cfg.out_dir)).transpose()?;
    let before_dir = cfg.out_dir.join("before");
    if !main {
        ranks.barrier()?;
        runner.run_arms(&arms(cfg))?;
        return Ok(Vec::new());
    }
    eprintln!("policy: {}", source.describe());
    let before = if before_dir.join(EvalReport::FILE).exists() {
        EvalReport::read(&before_dir)?
    } else {
        let policy = source.fresh()?.with_prompt(cfg.prompt.clone());
        let graded = evaluate(&policy, test, &cfg.eval, "eval before RL")?;
        let mut r = EvalReport::new("before RL", source.describe(), graded, test.len());
        r.prompt = Some(cfg.prompt.clone());
        // what the arms check before taking it as their step-0 evaluation
        r.config = Some(serde_json::to_value(&cfg.eval)?);
        r.write(&before_dir)?;
        r
    };
    eprintln!(
        "held-out accuracy before RL: {:.1}% ({} items){}",
        100.0 * before.accuracy.accuracy,
        test.len(),
        before.step_accuracy.map_or(String::new(), |s| format!(
            "; {:.1}% of the arithmetic steps right",
            100.0 * s
        ))
    );
    let before = before.accuracy.accuracy;
    ranks.barrier()?; // the others start the arms with "before RL" written
    let reports = runner.run_arms(&arms(cfg))?;
    let mut results = Vec::new();
    let per_seed = 2 + cfg.others.len();
    for (&seed, pair) in cfg.seeds.iter().zip(reports.chunks(per_seed)) {
        let sdir = cfg.out_dir.join(format!("seed-{seed}"));
        let (rb, rc) = (&pair[0], &pair[1]);
        let mut others = Vec::new();
        let base_curve = crate::study::compare::read_curve(&sdir.join("baseline"), "eval/accuracy");
        for (o, r) in cfg.others.iter().zip(&pair[2..]) {
            let curve = crate::study::compare::read_curve(&sdir.join(o.name), "eval/accuracy");
            others.push(OtherResult {
                name: o.name.into(),
                accuracy: r.accuracy.accuracy,
                vs_baseline: compare("baseline", &rb.examples, o.name, &r.examples)?,
                efficiency_ratio: stats::efficiency_ratio(&base_curve, &curve),
                curve,
            });
        }
        let comparison = compare("baseline", &rb.examples, "cal", &rc.examples)?;
        let names = ["baseline", "cal"]
            .into_iter()
            .chain(cfg.others.iter().map(|o| o.name));
        let _ = plot_curves(
            &names
                .map(|n| (n.to_string(), sdir.join(n)))
                .collect::<Vec<_>>(),
            "reward/accuracy",
            &sdir.join("training_curves.png"),
        )
        .map_err(|e| eprintln!("plot skipped: {e:#}"));
        std::fs::write(sdir.join("comparison.md"), comparison.table())?;
        let baseline_curve =
            crate::study::compare::read_curve(&sdir.join("baseline"), "eval/accuracy");
        let cal_curve = crate::study::compare::read_curve(&sdir.join("cal"), "eval/accuracy");
        let calls = mean_metric(&sdir.join("cal"), "oracle/calls");
        let located = mean_metric(&sdir.join("cal"), "spans/located");
        results.push(SeedResult {
            seed,
            before,
            baseline: rb.accuracy.accuracy,
            cal: rc.accuracy.accuracy,
            baseline_all_wrong_frac: mean_metric(&sdir.join("baseline"), "groups/all_wrong_frac"),
            cal_all_wrong_frac: mean_metric(&sdir.join("cal"), "groups/all_wrong_frac"),
            cal_spans_located_frac: if calls > 0.0 { located / calls } else { 0.0 },
            efficiency_ratio: stats::efficiency_ratio(&baseline_curve, &cal_curve),
            baseline_curve,
            cal_curve,
            comparison,
            others,
        });
    }
    std::fs::write(
        cfg.out_dir.join("summary.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    if cfg.run.eval.every > 0 {
        let arm = |name: &str| {
            let dirs = cfg
                .seeds
                .iter()
                .map(|s| cfg.out_dir.join(format!("seed-{s}/{name}")));
            (name.to_string(), dirs.collect::<Vec<_>>())
        };
        let png = cfg.out_dir.join("eval_curves.png");
        let per_step = cfg.run.rollout.prompts_per_step * cfg.run.rollout.num_generations;
        let names = ["baseline", "cal"]
            .into_iter()
            .chain(cfg.others.iter().map(|o| o.name));
        let arms: Vec<_> = names.map(arm).collect();
        match plot_held_out(&arms, per_step, &png) {
            Ok(_) => eprintln!("held-out accuracy curves: {}", png.display()),
            Err(e) => eprintln!("plot skipped: {e:#}"),
        }
    }
    Ok(results)
}

/// The summary table across seeds, as Markdown.
pub fn summary_table(results: &[SeedResult]) -> String {
    let mut s = String::from(
        "| seed | before RL | baseline GRPO | CAL-GRPO | CAL − baseline (95% CI) | McNemar p | all-wrong groups (base / CAL) | CAL spans located |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let c = &r.comparison;
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1}% | {:.1}% | {:+.1} [{:+.1}, {:+.1}] | {:.3} | {:.2} / {:.2} | {:.0}% |\n",
            r.seed,
            100.0 * r.before,
            100.0 * r.baseline,
            100.0 * r.cal,
            c.diff_points,
            c.ci95_points.0,
            c.ci95_points.1,
            c.mcnemar_p,
            r.baseline_all_wrong_frac,
            r.cal_all_wrong_frac,
            100.0 * r.cal_spans_located_frac,
        ));
    }
    if results.len() > 1 {
        s.push_str(&across_seeds(results));
    }
    s.push_str(&others_table(results));
    for r in results {
        s.push_str(&format!("\nseed {}: {}", r.seed, r.comparison.verdict));
    }
    s.push('\n');
    s
}

/// The arms beside the two: each seed's accuracy and its paired difference with the
/// baseline, then (over several seeds) the mean gains with 95% t intervals.
pub fn others_table(results: &[SeedResult]) -> String {
    let Some(first) = results.first().filter(|r| !r.others.is_empty()) else {
        return String::new();
    };
    let mut s = String::from(
        "\nThe other arms against the baseline (same seed, same held-out items):\n\n| seed | arm | held-out | arm − baseline (95% CI) | McNemar p |\n|---|---|---|---|---|\n",
    );
    for r in results {
        for o in &r.others {
            let c = &o.vs_baseline;
            s += &format!(
                "| {} | {} | {:.1}% | {:+.1} [{:+.1}, {:+.1}] | {:.3} |\n",
                r.seed,
                o.name,
                100.0 * o.accuracy,
                c.diff_points,
                c.ci95_points.0,
                c.ci95_points.1,
                c.mcnemar_p
            );
        }
    }
    if results.len() > 1 {
        s += "\nOver seeds (mean, 95% t interval, in points; sample efficiency: steps to the baseline's final held-out accuracy / the baseline's steps, median with a 95% bootstrap interval, < 1: fewer rollouts than GRPO):\n\n| arm | held-out | arm − before RL | arm − baseline | arm − CAL-GRPO | sample efficiency vs GRPO |\n|---|---|---|---|---|---|\n";
        let ci = |xs: Vec<f64>| {
            stats::mean_ci95(&xs).map_or("–".into(), |(m, lo, hi)| {
                format!("{m:+.1} [{lo:+.1}, {hi:+.1}]")
            })
        };
        for (k, o) in first.others.iter().enumerate() {
            let acc = |r: &SeedResult| r.others.get(k).map_or(f64::NAN, |x| x.accuracy);
            let mean_acc = results.iter().map(acc).sum::<f64>() / results.len() as f64;
            let ratios: Vec<f64> = results
                .iter()
                .filter_map(|r| r.others.get(k)?.efficiency_ratio)
                .collect();
            let eff = stats::median_ci95(&ratios, 10_000, 0).map_or("–".into(), |(m, lo, hi)| {
                format!(
                    "{} [{}, {}]",
                    stats::show_ratio(m),
                    stats::show_ratio(lo),
                    stats::show_ratio(hi)
                )
            });
            s += &format!(
                "| {} | {:.1}% | {} | {} | {} | {eff} |\n",
                o.name,
                100.0 * mean_acc,
                ci(results
                    .iter()
                    .map(|r| 100.0 * (acc(r) - r.before))
                    .collect()),
                ci(results
                    .iter()
                    .map(|r| r
                        .others
                        .get(k)
                        .map_or(f64::NAN, |x| x.vs_baseline.diff_points))
                    .collect()),
                ci(results.iter().map(|r| 100.0 * (acc(r) - r.cal)).collect()),
            );
        }
    }
    s + &all_curves(results)
}

/// Held-out accuracy at each evaluated step, mean over seeds, for every arm.
fn all_curves(results: &[SeedResult]) -> String {
    let Some(first) = results.first() else {
        return String::new();
    };
    let at = |c: &[(f64, f64)], step: f64| c.iter().find(|p| p.0 == step).map(|p| p.1);
    let mean = |xs: Vec<Option<f64>>| -> String {
        let v: Option<Vec<f64>> = xs.into_iter().collect();
        v.map_or("–".into(), |v| {
            format!(
                "{:.1}%",
                100.0 * v.iter().sum::<f64>() / v.len().max(1) as f64
            )
        })
    };
    let names: Vec<&str> = first.others.iter().map(|o| o.name.as_str()).collect();
    let mut s = format!(
        "\nHeld-out accuracy during training, every arm (mean over seeds):\n\n| step | baseline | cal | {} |\n|---|---|---|{}\n",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for &(step, _) in &first.baseline_curve {
        let mut cells = vec![
            mean(
                results
                    .iter()
                    .map(|r| at(&r.baseline_curve, step))
                    .collect(),
            ),
            mean(results.iter().map(|r| at(&r.cal_curve, step)).collect()),
        ];
        for k in 0..names.len() {
            cells.push(mean(
                results
                    .iter()
                    .map(|r| r.others.get(k).and_then(|o| at(&o.curve, step)))
                    .collect(),
            ));
        }
        s += &format!("| {step} | {} |\n", cells.join(" | "));
    }
    s
}

/// Means over seeds with 95% t intervals (gains over the SFT start, CAL − baseline) and
/// the median sample-efficiency ratio with a bootstrap interval.
pub fn across_seeds(results: &[SeedResult]) -> String {
    let pts = |f: &dyn Fn(&SeedResult) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
    let line = |name: &str, xs: Vec<f64>| match stats::mean_ci95(&xs) {
        Some((m, lo, hi)) => format!("| {name} | {m:+.1} | [{lo:+.1}, {hi:+.1}] |\n"),
        None => String::new(),
    };
    let mut s = format!(
        "\nOver {} seeds (mean, 95% t interval, in points):\n\n| | mean | 95% CI |\n|---|---|---|\n",
        results.len()
    );
    s += &line(
        "baseline − before RL",
        pts(&|r| 100.0 * (r.baseline - r.before)),
    );
    s += &line("CAL − before RL", pts(&|r| 100.0 * (r.cal - r.before)));
    s += &line("CAL − baseline", pts(&|r| r.comparison.diff_points));
    s += &curves_over_seeds(results);
    let ratios: Vec<f64> = results.iter().filter_map(|r| r.efficiency_ratio).collect();
    if let Some((m, lo, hi)) = stats::median_ci95(&ratios, 10_000, 0) {
        let each: Vec<String> = ratios.iter().map(|&x| stats::show_ratio(x)).collect();
        s += &format!(
            "\nSample efficiency (steps for CAL to reach the baseline's final held-out accuracy / the baseline's steps; < 1: CAL needs fewer rollouts): median {} [95% bootstrap CI {}, {}]; per seed {}.\n",
            stats::show_ratio(m),
            stats::show_ratio(lo),
            stats::show_ratio(hi),
            each.join(", ")
        );
    }
    let left = results.len() - ratios.len();
    if left > 0 {
        s += &format!(
            "\nSample efficiency: no ratio for {left} of {} seeds (no curve, or a baseline that ended at or below its start, which leaves nothing to reach).\n",
            results.len()
        );
    }
    s
}

/// Held-out accuracy at each evaluated step, mean over seeds for both arms, and the
/// paired CAL − baseline difference with a 95% t interval. One interval per step:
/// read them as a curve, not as independent tests.
pub fn curves_over_seeds(results: &[SeedResult]) -> String {
    let at = |c: &[(f64, f64)], step: f64| c.iter().find(|p| p.0 == step).map(|p| p.1);
    let Some(first) = results.first() else {
        return String::new();
    };
    let mut rows = String::new();
    for &(step, _) in &first.baseline_curve {
        let pairs: Option<Vec<(f64, f64)>> = results
            .iter()
            .map(|r| Some((at(&r.baseline_curve, step)?, at(&r.cal_curve, step)?)))
            .collect();
        let Some(pairs) = pairs else { continue };
        let n = pairs.len() as f64;
        let mb = 100.0 * pairs.iter().map(|p| p.0).sum::<f64>() / n;
        let mc = 100.0 * pairs.iter().map(|p| p.1).sum::<f64>() / n;
        let d: Vec<f64> = pairs.iter().map(|p| 100.0 * (p.1 - p.0)).collect();
        let ci = stats::mean_ci95(&d).map_or(String::new(), |(m, lo, hi)| {
            format!("{m:+.1} [{lo:+.1}, {hi:+.1}]")
        });
        rows += &format!("| {step} | {mb:.1}% | {mc:.1}% | {ci} |\n");
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "\nHeld-out accuracy during training (mean over seeds; one interval per evaluated step, not corrected for looking at several):\n\n| step | baseline | CAL | CAL − baseline (95% t CI) |\n|---|---|---|---|\n{rows}"
    )
}

#[cfg(test)]
mod tests {
    use super::OtherArm;

    #[test]
    fn arms_lists_name_the_arms_beside_the_two() {
        let list = |s: &str| s.split(',').map(String::from).collect::<Vec<_>>();
        let names = |s: &str| -> Vec<&str> {
            OtherArm::parse_list(&list(s))
                .unwrap()
                .iter()
                .map(|a| a.name)
                .collect()
        };
        assert!(names("grpo,cal-grpo").is_empty());
        assert_eq!(names("grpo,cal-grpo,ppo,cal-ppo"), ["ppo", "cal-ppo"]);
        assert_eq!(names("cal-ppo,ppo,ppo"), ["cal-ppo", "ppo"]);
        assert_eq!(names("grpo,cal-grpo,dpo,cal-dpo"), ["dpo", "cal-dpo"]);
        let e = OtherArm::parse_list(&list("grpo,kto"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"kto\"") && e.contains("cal-dpo"), "{e}");
    }

    #[test]
    fn one_table_names_every_kind_of_run() {
        use crate::algorithm::AlgorithmKind;
        use crate::config::{RunConfig, RunKind};
        use cal_core::credit::CreditMode;
        for k in RunKind::ALL {
            assert_eq!(RunKind::of(k.algorithm, k.cal), k);
            assert_eq!(RunKind::named(k.arm), Some(k));
            assert_eq!(RunKind::named(k.name), Some(k));
            // a run configured so is named so: its folder and its progress bar
            let mut cfg = RunConfig::default();
            cfg.run.algorithm = k.algorithm;
            cfg.credit.mode = if k.cal {
                CreditMode::Span
            } else {
                CreditMode::Outcome
            };
            assert_eq!(cfg.kind(), k.name);
        }
        for a in [
            AlgorithmKind::Grpo,
            AlgorithmKind::Ppo,
            AlgorithmKind::Dpo,
            AlgorithmKind::OnPolicyDistill,
        ] {
            assert_ne!(RunKind::of(a, false).name, RunKind::of(a, true).name);
        }
        // the arms beside the two carry their kind's folder name
        let all: Vec<String> = RunKind::ALL.iter().map(|k| k.arm.to_string()).collect();
        let others = OtherArm::parse_list(&all).unwrap();
        assert_eq!(
            others.iter().map(|a| a.name).collect::<Vec<_>>(),
            ["ppo", "cal-ppo", "dpo", "cal-dpo", "distill", "cal-distill"]
        );
    }
}
