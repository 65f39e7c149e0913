//! `cal-grpo experiment`: baseline and CAL arms on the same seeds, data and compute,
//! then the comparison (arms in child processes with `--jobs`, see [`crate::arms`]).

use crate::config::TrainArgs;
use crate::source::{datasets, Source};
use crate::train::print_config;
use anyhow::{bail, Result};
use cal_train::collective::Collective;
use cal_train::engine::server;
use cal_train::evaluate::EvalConfig;
use cal_train::policy::PolicySource;
use cal_train::study::experiment::{self, ExperimentConfig, OtherArm};
use clap::Args;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// Training problems per run (the original's NUM_SAMPLES; -1 = all) [default: 960].
    #[arg(allow_negative_numbers = true)]
    pub num_samples_pos: Option<i64>,
    /// Completions per prompt (the original's NUM_GENERATIONS).
    pub num_generations_pos: Option<usize>,
    /// Number of seeds (42, 43, ...); each runs baseline and CAL [default: 1; study: 5].
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Arms trained at once, each in its own process with its share of the CPU
    /// threads; the results are the same as one after another [default: 2 for the
    /// tiny model on a CPU with at least 2 threads, else 1].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// The arms of each seed, comma-separated: `grpo` and `cal-grpo` (the `baseline`
    /// and `cal` folders) always run; `ppo` (PPO, outcome rewards) and `cal-ppo` (PPO
    /// with CAL's span rewards into GAE) are added at the same budget.
    #[arg(long, value_delimiter = ',', default_value = "grpo,cal-grpo")]
    pub arms: Vec<String>,
    /// `quick` (one seed, runs/experiment) or `study` (five seeds in runs/study, with
    /// means, 95% intervals and the sample-efficiency ratio over seeds).
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: Preset,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    Quick,
    Study,
}

/// `ranks`: under `mpirun`, every arm trains on all ranks, one arm after another;
/// rank 0 evaluates, compares and writes.
pub fn run(args: &ExperimentArgs, ranks: Arc<dyn Collective>) -> Result<()> {
    let others = OtherArm::parse_list(&args.arms)?;
    let mut targs = args.train.clone();
    targs.num_samples = args.num_samples_pos.or(targs.num_samples);
    targs.num_generations = args.num_generations_pos.or(targs.num_generations);
    // experiment's own defaults, below a --config file
    let mut defaults = crate::config::experiment_defaults();
    let n_seeds = match args.preset {
        Preset::Quick => args.seeds.unwrap_or(1),
        Preset::Study => {
            defaults["run"]["output-dir"] = "runs/study".into();
            args.seeds.unwrap_or(5)
        }
    };
    let mut cfg = targs.resolve_with(defaults)?;
    if args.train.print_config {
        return print_config(&cfg);
    }
    if !cfg.credit.mode.uses_spans() {
        bail!("experiment compares outcome GRPO with a span-using credit mode; --credit {} is the baseline itself", cfg.credit.mode.name());
    }
    let source = Source::of(&cfg);
    let t0 = std::time::Instant::now();
    let main = ranks.is_main();
    // rank 0 fetches the data and makes the tiny warm start; the others then read them
    if main {
        source.prepare()?;
        if ranks.world() > 1 {
            source.fresh()?;
        }
    }
    ranks.barrier()?;
    if !main {
        source.prepare()?;
    }
    let (train, test) = datasets(&cfg)?;
    let seeds: Vec<u64> = (0..n_seeds.max(1) as u64)
        .map(|i| cfg.run.seed + i)
        .collect();
    eprintln!(
        "experiment: baseline vs CAL ({}){}, {} steps × {} prompts × {} generations, {} training / {} held-out problems, seeds {seeds:?}",
        cfg.credit.mode.name(),
        others.iter().map(|o| format!(", {}", o.name)).collect::<String>(),
        cfg.steps(train.len()),
        cfg.rollout.prompts_per_step,
        cfg.rollout.num_generations,
        train.len(),
        test.len()
    );
    let out = cfg.output_dir();
    if main {
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("config.toml"), cfg.to_toml()?)?;
    }
    let threads = crate::arms::process_threads();
    let mut jobs = args
        .jobs
        .unwrap_or_else(|| crate::arms::default_jobs(&cfg.model.name, cfg.model.device, threads));
    if ranks.world() > 1 {
        if jobs > 1 && main {
            eprintln!(
                "experiment on {} ranks: the arms one after another, each on all ranks",
                ranks.world()
            );
        }
        jobs = 1;
    }
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    // rollouts on vLLM without a URL: one server of our own for every arm (each arm's
    // adapters have names of their own), stopped when the experiment ends
    server::refuse_own_server_on_ranks(&cfg, ranks.world())?;
    let server = match server::wanted(&cfg) {
        true => server::serve_if_needed(&mut cfg, &source.fresh()?, &out.join("vllm"))?,
        false => None,
    };
    if server.is_some() && cfg.model.lora.rank == 0 && jobs > 1 {
        eprintln!("experiment: full fine-tuning on one vLLM server trains the arms one after another (the server holds one set of weights)");
        jobs = 1;
    }
    let steps = cfg.steps(train.len());
    let ecfg = ExperimentConfig {
        others,
        out_dir: out.clone(),
        seeds,
        cal_mode: cfg.credit.mode,
        eval: EvalConfig::of_run(&cfg),
        prompt: cal_train::prompt::PromptFormat::of(&cfg.data, &train)?,
        run: cfg,
    };
    let results = if jobs > 1 {
        let runner = crate::arms::Processes {
            jobs,
            threads: (threads / jobs).max(1),
            steps,
        };
        experiment::run(&source, &ecfg, &test, &runner)?
    } else {
        let runner = experiment::Sequential {
            source: &source,
            train: &train,
            test: &test,
            ranks: ranks.clone(),
        };
        experiment::run(&source, &ecfg, &test, &runner)?
    };
    drop(server);
    if !main {
        return Ok(());
    }
    let table = experiment::summary_table(&results);
    std::fs::write(out.join("summary.md"), &table)?;
    println!("{table}");
    println!(
        "results in {} ({:.0}s wall)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
