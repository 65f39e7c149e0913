//! `train`, `sft`, `experiment`, `compare` and model-based `eval`: resolving models and
//! data from flags, then handing over to `cal-train`.

use crate::config::{PlacementFlags, TrainArgs};
use anyhow::{bail, Context, Result};
use cal_core::data::{self, Example};
use cal_model::{load, Placement};
use cal_train::config::{LoraSection, RunConfig};
use cal_train::evaluate::{evaluate, EvalConfig, EvalReport};
use cal_train::experiment::{self, ExperimentConfig, PolicySource};
use cal_train::grpo::{RunEnd, Trainer};
use cal_train::policy::Policy;
use cal_train::tiny::{self, TinySpec};
use clap::Args;
use std::path::{Path, PathBuf};

/// The starting policy: the embedded tiny model or a model path, and where it runs.
pub struct Source {
    pub kind: SourceKind,
    pub placement: Placement,
}

pub enum SourceKind {
    Tiny(Box<TinySpec>),
    Path(PathBuf),
    /// `random:CONFIG.json`: a randomly initialised model of a real shape (benchmarks
    /// where the weights are not available), with a small BPE trained on generated
    /// problems as its tokenizer.
    Random(PathBuf),
}

impl PolicySource for Source {
    fn fresh(&self) -> Result<Policy> {
        let (dev, dtype) = self.placement.resolve()?;
        match &self.kind {
            SourceKind::Tiny(spec) => {
                Ok(tiny::tiny_policy(spec, &tiny::cache_root(), &dev, dtype)?.policy)
            }
            SourceKind::Path(p) => {
                let l = load::load(p, dtype, &dev)?;
                Ok(Policy::new(l.model, l.tokenizer))
            }
            SourceKind::Random(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let cfg = cal_model::ModelConfig::from_hf_json(&text, p)?;
                let corpus = data::generate(200, 1, &data::GenConfig::default())
                    .into_iter()
                    .map(|e| format!("Question: {}\nAnswer: {}", e.question, e.answer));
                let tok = cal_model::tokenizer::train_tiny(corpus, 400.min(cfg.vocab_size))?;
                let model = cal_model::Transformer::init_random(cfg, 0, dtype, &dev)?;
                Ok(Policy::new(model, tok))
            }
        }
    }

    fn describe(&self) -> String {
        match &self.kind {
            SourceKind::Tiny(spec) => format!(
                "tiny (SFT-warmed, cached in {})",
                tiny::cache_root()
                    .join(format!("tiny-{}", spec.key()))
                    .display()
            ),
            SourceKind::Path(p) => p.display().to_string(),
            SourceKind::Random(p) => format!("random weights, shape of {}", p.display()),
        }
    }
}

impl Source {
    pub fn new(model: &str, placement: Placement) -> Self {
        Self::with_spec(model, placement, TinySpec::default())
    }

    fn with_spec(model: &str, placement: Placement, spec: TinySpec) -> Self {
        let kind = if model == "tiny" {
            SourceKind::Tiny(Box::new(spec))
        } else if let Some(cfg) = model.strip_prefix("random:") {
            SourceKind::Random(PathBuf::from(cfg))
        } else {
            SourceKind::Path(PathBuf::from(model))
        };
        Self { kind, placement }
    }

    /// The run's model; `tiny` is trained on the run's generated benchmark.
    pub fn of(cfg: &RunConfig) -> Self {
        Self::with_spec(
            &cfg.model.name,
            cfg.model.placement(),
            TinySpec::for_run(&cfg.model.tiny, &cfg.data),
        )
    }

    /// Makes sure the tiny policy exists (trains it on first use) and reports how good
    /// the warm start is.
    pub fn prepare(&self) -> Result<()> {
        if let SourceKind::Tiny(spec) = &self.kind {
            let (dev, dtype) = self.placement.resolve()?;
            let tp = tiny::tiny_policy(spec, &tiny::cache_root(), &dev, dtype)?;
            if let Some(r) = &tp.sft {
                eprintln!(
                    "tiny SFT: {} steps in {:.0}s, loss {:.3} → {:.3}",
                    r.steps, r.seconds, r.first_loss, r.last_loss
                );
            }
        }
        Ok(())
    }
}

/// Train and held-out problems for a run.
pub fn datasets(cfg: &RunConfig) -> Result<(Vec<Example>, Vec<Example>)> {
    let d = &cfg.data;
    let (train, test) = if d.dataset == "generated" {
        TinySpec::run_splits(&cfg.model.tiny, d)
    } else {
        let p = PathBuf::from(&d.dataset);
        let train = data::load(&p)?;
        let eval_path = match &d.eval_dataset {
            Some(e) => PathBuf::from(e),
            None => {
                let sibling = p.with_file_name("test.jsonl");
                if sibling.exists() && sibling != p {
                    sibling
                } else {
                    bail!(
                        "no held-out data: pass --eval-dataset FILE (no test.jsonl beside {})",
                        d.dataset
                    )
                }
            }
        };
        (train, data::load(&eval_path)?)
    };
    let train = data::select(train, d.num_samples, None);
    let test = data::select(test, d.eval_samples, None);
    Ok((train, test))
}

/// Greedy held-out evaluation after training, at the rollouts' length.
fn eval_config(cfg: &RunConfig) -> EvalConfig {
    EvalConfig {
        max_new_tokens: cfg.rollout.max_new_tokens,
        seed: cfg.run.seed,
        ..EvalConfig::default()
    }
}

/// `--print-config`: the effective configuration as TOML.
fn print_config(cfg: &RunConfig) -> Result<()> {
    print!("{}", cfg.to_toml()?);
    Ok(())
}

pub fn train(args: &TrainArgs) -> Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        return print_config(&cfg);
    }
    let source = Source::of(&cfg);
    source.prepare()?;
    let (train, test) = datasets(&cfg)?;
    let out = cfg.output_dir();
    eprintln!(
        "{} run: {} steps × {} prompts × {} generations on {} problems ({} / {}); output {}",
        cfg.kind(),
        cfg.steps(train.len()),
        cfg.rollout.prompts_per_step,
        cfg.rollout.num_generations,
        train.len(),
        cfg.model.device,
        cfg.model.dtype.name(),
        out.display()
    );
    let name = cfg.kind();
    let config = serde_json::to_value(&cfg)?;
    let eval = eval_config(&cfg);
    let mut trainer = Trainer::new(cfg, source.fresh()?, train, args.start())?
        .with_held_out(test.clone(), eval.clone());
    if trainer.run()? == RunEnd::Interrupted {
        std::process::exit(130);
    }
    let graded = match trainer.held_out_now() {
        Some(g) => g.to_vec(),
        None => evaluate(&trainer.policy, &test, &eval, "eval")?,
    };
    let mut report = EvalReport::new(name, out.display().to_string(), graded, test.len());
    report.config = Some(config);
    report.write(&out)?;
    let model_dir = out.join("model");
    load::export_hf(&trainer.policy.model, &trainer.policy.tok, &model_dir)?;
    println!(
        "held-out accuracy {:.2}% ({}/{}); model exported to {}",
        100.0 * report.accuracy.accuracy,
        report.accuracy.correct,
        report.accuracy.total,
        model_dir.display()
    );
    Ok(())
}

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

pub fn experiment(args: &ExperimentArgs) -> Result<()> {
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
    let cfg = targs.resolve_with(defaults)?;
    if args.train.print_config {
        return print_config(&cfg);
    }
    if !cfg.credit.mode.uses_spans() {
        bail!("experiment compares outcome GRPO with a span-using credit mode; --credit {} is the baseline itself", cfg.credit.mode.name());
    }
    let source = Source::of(&cfg);
    let t0 = std::time::Instant::now();
    source.prepare()?;
    let (train, test) = datasets(&cfg)?;
    let seeds: Vec<u64> = (0..n_seeds.max(1) as u64)
        .map(|i| cfg.run.seed + i)
        .collect();
    eprintln!(
        "experiment: baseline vs CAL ({}), {} steps × {} prompts × {} generations, {} training / {} held-out problems, seeds {seeds:?}",
        cfg.credit.mode.name(),
        cfg.steps(train.len()),
        cfg.rollout.prompts_per_step,
        cfg.rollout.num_generations,
        train.len(),
        test.len()
    );
    let out = cfg.output_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("config.toml"), cfg.to_toml()?)?;
    let threads = crate::arms::process_threads();
    let jobs = args
        .jobs
        .unwrap_or_else(|| crate::arms::default_jobs(&cfg.model.name, cfg.model.device, threads));
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let steps = cfg.steps(train.len());
    let ecfg = ExperimentConfig {
        out_dir: out.clone(),
        seeds,
        cal_mode: cfg.credit.mode,
        eval: eval_config(&cfg),
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
        };
        experiment::run(&source, &ecfg, &test, &runner)?
    };
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

/// `compare A B`: any two evaluation reports (of `eval`, `train` or an experiment arm).
pub fn compare(runs: &[PathBuf], out: Option<&Path>) -> Result<()> {
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
    let c = cal_train::compare::compare(&na, &ra.examples, &nb, &rb.examples)?;
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
    match cal_train::compare::plot_curves(&runs, "reward/accuracy", &png) {
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
    if cal_train::compare::plot_held_out(&arms, per_step, &held_out).is_ok() {
        println!("held-out accuracy curves: {}", held_out.display());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct SftArgs {
    /// `tiny` (train the embedded default) or a model path.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    #[command(flatten)]
    pub placement: PlacementFlags,
    /// GSM8K-format training file (`generated` for the embedded problems).
    #[arg(long, default_value = "generated")]
    pub dataset: String,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-5)]
    pub learning_rate: f64,
    /// LoRA rank (0 = full fine-tuning; alpha 2 × rank, targets as in `train`).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// Dropout on the LoRA input while training, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub num_samples: i64,
    /// Where the fine-tuned model is exported (Hugging Face folder).
    #[arg(long, default_value = "runs/sft/model")]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Padded tokens per forward/backward; a batch that does not fit is split into
    /// length-sorted micro-batches, gradients accumulated exactly (0 = whole batches).
    /// 2048 keeps SmolLM2-135M on GSM8K near 8 GB.
    #[arg(long, default_value_t = 2048)]
    pub micro_batch_tokens: usize,
}

pub fn sft(args: &SftArgs) -> Result<()> {
    let placement = args.placement.placement();
    // One writer per output folder (the export is written file by file).
    let _lock = cal_train::rundir::RunLock::acquire(&args.output_dir)?;
    if args.model == "tiny" {
        let (dev, dtype) = placement.resolve()?;
        let tp = tiny::tiny_policy(&TinySpec::default(), &tiny::cache_root(), &dev, dtype)?;
        load::export_hf(&tp.policy.model, &tp.policy.tok, &args.output_dir)?;
        println!(
            "tiny policy (cached SFT recipe) exported to {}",
            args.output_dir.display()
        );
        return Ok(());
    }
    let mut policy = Source::new(&args.model, placement).fresh()?;
    let examples = if args.dataset == "generated" {
        TinySpec::default().splits().0
    } else {
        data::load(Path::new(&args.dataset))?
    };
    let examples = data::select(examples, args.num_samples, Some(args.seed));
    let lora = LoraSection {
        rank: args.lora_rank,
        dropout: args.lora_dropout,
        ..LoraSection::default()
    };
    let trainable: Box<dyn Fn(&str) -> bool> = match lora.adapters() {
        Some(l) => {
            policy.model.add_lora(l, args.seed)?;
            Box::new(|k: &str| k.contains(".lora_"))
        }
        None => Box::new(|_: &str| true),
    };
    let cfg = cal_train::sft::SftConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        optim: cal_train::update::OptimConfig {
            lr: args.learning_rate,
            warmup_steps: args.steps / 10,
            ..Default::default()
        },
        seed: args.seed,
        micro_batch_tokens: args.micro_batch_tokens,
    };
    let r = cal_train::sft::sft(&mut policy, &examples, &cfg, trainable)?;
    load::export_hf(&policy.model, &policy.tok, &args.output_dir)
        .with_context(|| format!("exporting to {}", args.output_dir.display()))?;
    println!(
        "SFT {} steps: loss {:.3} → {:.3} in {:.0}s; model exported to {}",
        r.steps,
        r.first_loss,
        r.last_loss,
        r.seconds,
        args.output_dir.display()
    );
    Ok(())
}

/// `eval --model`: generate on the dataset, grade, write the report.
pub fn eval_model(
    model: &str,
    placement: Placement,
    dataset: &Path,
    cfg: &EvalConfig,
    num_samples: i64,
    out: &Path,
) -> Result<EvalReport> {
    let policy = Source::new(model, placement).fresh()?;
    let examples = data::select(data::load(dataset)?, num_samples, None);
    let graded = evaluate(&policy, &examples, cfg, "eval")?;
    let mut report = EvalReport::new(model, model, graded, examples.len());
    report.dataset = Some(dataset.display().to_string());
    report.config = Some(serde_json::to_value(cfg)?);
    report.write(out)?;
    Ok(report)
}

/// `cal-grpo bench generate`: generation throughput alone, one line per model, for
/// `bench/hf_generate.py` to interleave with `transformers`' `generate`.
pub fn bench_generate(
    models: &[String],
    placement: Placement,
    repeats: usize,
    new_tokens: usize,
    batches: &[usize],
) -> Result<()> {
    for m in models {
        let p = Source::new(m, placement).fresh()?;
        for &b in batches {
            let (med, all) = cal_train::bench::bench_generation(&p, b, new_tokens, repeats)?;
            let all: Vec<String> = all.iter().map(|x| format!("{x:.1}")).collect();
            println!(
                "{m}: generation batch {b} x {new_tokens} new tokens on {}: {med:.1} tok/s (median of {}: {})",
                placement.device,
                all.len(),
                all.join(", ")
            );
        }
    }
    Ok(())
}

pub fn bench_kernels(rounds: usize) -> Result<()> {
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (stream, rows) = cal_train::bench::bench_kernels(rounds)?;
    print!("{}", cal_train::bench::kernel_table(stream, &rows));
    println!(
        "medians of {rounds} alternating rounds (9 calls each); {} threads; load average before: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

pub fn bench_gemm(rounds: usize) -> Result<()> {
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rows = cal_train::bench::bench_gemm(rounds)?;
    print!("{}", cal_train::bench::gemm_table(&rows));
    let after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "medians of {rounds} alternating rounds (candle, OpenBLAS, candle, …; 3 calls each); {} threads; load average before: {}, after: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        three(&load_avg),
        three(&after)
    );
    Ok(())
}

pub fn bench_step(model: &str, placement: Placement, repeats: usize, seq: usize) -> Result<()> {
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut p = Source::new(model, placement).fresh()?;
    let (rows, best) = cal_train::bench::bench_train_step(&mut p, 8, seq, repeats)?;
    println!("| training step, 8 x {seq} tokens ({model}) | median s | tokens/s | GFLOP/s (6·N·tokens) | share of best GEMM | steps (s) |\n|---|---|---|---|---|---|");
    for r in &rows {
        let steps: Vec<String> = r.steps.iter().map(|s| format!("{s:.2}")).collect();
        println!(
            "| {} | {:.2} | {:.0} | {:.1} | {:.0}% | {} |",
            r.product,
            r.step_s,
            r.tokens_per_s,
            r.gflops,
            100.0 * r.gflops / best,
            steps.join(", ")
        );
    }
    let after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "\ncandle / OpenBLAS step time: {:.2}x; best GEMM (2048³, either library, measured between rounds): {best:.0} GFLOP/s; \
         {repeats} alternating rounds after a warm-up; {} threads; load average before: {}, after: {}",
        rows[0].step_s / rows[1].step_s,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        three(&load_avg),
        three(&after)
    );
    Ok(())
}

pub fn bench(
    models: &[String],
    placement: Placement,
    repeats: usize,
    seq: usize,
    new_tokens: usize,
    batch: usize,
) -> Result<()> {
    let models: Vec<String> = if models.is_empty() {
        let smol = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
        let mut m = vec!["tiny".to_string()];
        if Path::new(smol).exists() {
            m.push(smol.to_string());
        }
        m
    } else {
        models.to_vec()
    };
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load_avg.trim());
    let mut rows = Vec::new();
    for m in &models {
        let mut p = Source::new(m, placement).fresh()?;
        eprintln!("benchmarking {m} ...");
        let name = Path::new(m)
            .file_name()
            .map_or(m.clone(), |n| n.to_string_lossy().into_owned());
        rows.push(cal_train::bench::bench_policy(
            &name, &mut p, batch, new_tokens, seq, repeats,
        )?);
    }
    println!("{}", cal_train::bench::table(&rows));
    println!(
        "batch {batch}; generation {new_tokens} new tokens per row; training step = forward + backward + AdamW on {batch} × {seq} tokens; \
         medians of {repeats} runs, each interleaved with the matmul reference ({}, {}); {} CPU threads; load average before: {}",
        placement.device,
        placement.dtype.name(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
