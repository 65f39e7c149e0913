//! `train`, `sft`, `experiment`, `compare` and model-based `eval`: resolving models and
//! data from flags, then handing over to `cal-train`.

use crate::config::{self, Provider, TrainArgs, TrainConfig};
use anyhow::{bail, Context, Result};
use cal_core::data::{self, Example};
use cal_core::locate::LocateConfig;
use cal_model::{load, LoraConfig};
use cal_oracle::OracleSpec;
use cal_train::evaluate::{evaluate, EvalConfig};
use cal_train::experiment::{self, ExperimentConfig, PolicySource};
use cal_train::grpo::{default_optim, GrpoConfig, RunEnd, Trainer};
use cal_train::loss::LossConfig;
use cal_train::policy::Policy;
use cal_train::tiny::{self, TinySpec};
use candle_core::{DType, Device};
use clap::Args;
use std::path::{Path, PathBuf};

/// The starting policy: the embedded tiny model or a model path.
pub enum Source {
    Tiny(TinySpec),
    Path(PathBuf),
}

impl PolicySource for Source {
    fn fresh(&self) -> Result<Policy> {
        match self {
            Source::Tiny(spec) => Ok(tiny::tiny_policy(spec, &tiny::cache_root())?.policy),
            Source::Path(p) => {
                let l = load::load(p, DType::F32, &Device::Cpu)?;
                Ok(Policy::new(l.model, l.tokenizer))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Tiny(spec) => format!(
                "tiny (SFT-warmed, cached in {})",
                tiny::cache_root()
                    .join(format!("tiny-{}", spec.key()))
                    .display()
            ),
            Source::Path(p) => p.display().to_string(),
        }
    }
}

impl Source {
    pub fn from_spec(model: &str) -> Self {
        if model == "tiny" {
            Source::Tiny(TinySpec::default())
        } else {
            Source::Path(PathBuf::from(model))
        }
    }

    /// Makes sure the tiny policy exists (trains it on first use) and reports how good
    /// the warm start is.
    pub fn prepare(&self) -> Result<()> {
        if let Source::Tiny(spec) = self {
            let tp = tiny::tiny_policy(spec, &tiny::cache_root())?;
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
pub fn datasets(cfg: &TrainConfig, source: &Source) -> Result<(Vec<Example>, Vec<Example>)> {
    let (train, test) = match (cfg.dataset.as_str(), source) {
        ("generated", Source::Tiny(spec)) => spec.splits(),
        ("generated", Source::Path(_)) => TinySpec::default().splits(),
        (path, _) => {
            let p = PathBuf::from(path);
            let train = data::load(&p)?;
            let eval_path = match &cfg.eval_dataset {
                Some(e) => PathBuf::from(e),
                None => {
                    let sibling = p.with_file_name("test.jsonl");
                    if sibling.exists() && sibling != p {
                        sibling
                    } else {
                        bail!("no held-out data: pass --eval-dataset FILE (no test.jsonl beside {path})")
                    }
                }
            };
            (train, data::load(&eval_path)?)
        }
    };
    let train = data::select(train, cfg.num_samples, None);
    let test = data::select(test, cfg.eval_samples, None);
    Ok((train, test))
}

pub fn grpo_config(cfg: &TrainConfig, n_train: usize) -> Result<GrpoConfig> {
    let steps = cfg
        .steps
        .unwrap_or_else(|| n_train.div_ceil(cfg.prompts_per_step).max(1));
    let oracle = OracleSpec {
        provider: match cfg.api_provider {
            Provider::Openai => "openai",
            Provider::Gemini => "gemini",
            Provider::Calculator => "calculator",
            Provider::Reference => "reference",
        }
        .into(),
        model: cfg.cal_model.clone(),
        base_url: cfg.oracle_base_url.clone(),
        max_cost: cfg.oracle_max_cost,
        concurrency: cfg.oracle_concurrency,
        timeout_secs: cfg.oracle_timeout,
        cache: Some(tiny::cache_root().join("oracle-cache.sqlite")),
    };
    Ok(GrpoConfig {
        steps,
        prompts_per_step: cfg.prompts_per_step,
        num_generations: cfg.num_generations,
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: 1.0,
        credit: cfg.credit,
        max_error_span: cfg.max_error_span,
        loss: LossConfig {
            beta: cfg.beta,
            epsilon: cfg.epsilon,
            epsilon_high: cfg.epsilon_high,
            aggregation: cfg.loss_aggregation.parse().map_err(anyhow::Error::msg)?,
            importance: cfg.importance.parse().map_err(anyhow::Error::msg)?,
            max_completion_len: cfg.max_new_tokens,
        },
        optim: default_optim(cfg.learning_rate),
        num_iterations: cfg.num_iterations,
        seed: cfg.seed,
        save_every: cfg.save_every,
        lora: (cfg.lora_rank > 0).then(|| LoraConfig {
            rank: cfg.lora_rank,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            targets: cfg.lora_targets.clone(),
        }),
        oracle,
        locate: LocateConfig::default(),
        generation_batch: 64,
        micro_batch: cfg.micro_batch,
    })
}

fn eval_config(cfg: &TrainConfig) -> EvalConfig {
    EvalConfig {
        max_new_tokens: cfg.max_new_tokens,
        seed: cfg.seed,
        ..EvalConfig::default()
    }
}

pub fn train(args: &TrainArgs) -> Result<()> {
    let cfg = config::resolve(args)?;
    let source = Source::from_spec(&cfg.model);
    source.prepare()?;
    let (train, test) = datasets(&cfg, &source)?;
    let grpo = grpo_config(&cfg, train.len())?;
    eprintln!(
        "{} run: {} steps × {} prompts × {} generations on {} problems; output {}",
        if cfg.use_cal { "CAL" } else { "baseline" },
        grpo.steps,
        grpo.prompts_per_step,
        grpo.num_generations,
        train.len(),
        cfg.output_dir.display()
    );
    let mut trainer = Trainer::new(
        grpo,
        source.fresh()?,
        train,
        cfg.output_dir.clone(),
        cfg.resume,
    )?;
    if trainer.run()? == RunEnd::Interrupted {
        std::process::exit(130);
    }
    let r = evaluate(&trainer.policy, &test, &eval_config(&cfg), "eval")?;
    let name = if cfg.use_cal { "cal" } else { "baseline" };
    let v = serde_json::json!({"name": name, "config": cfg, "accuracy": r.accuracy, "examples": r.examples});
    std::fs::write(
        cfg.output_dir.join("eval_results.json"),
        serde_json::to_string_pretty(&v)?,
    )?;
    let model_dir = cfg.output_dir.join("model");
    load::export_hf(&trainer.policy.model, &trainer.policy.tok, &model_dir)?;
    println!(
        "held-out accuracy {:.2}% ({}/{}); model exported to {}",
        100.0 * r.accuracy.accuracy,
        r.accuracy.correct,
        r.accuracy.total,
        model_dir.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// Training problems per run (the original's NUM_SAMPLES; -1 = all).
    #[arg(allow_negative_numbers = true)]
    pub num_samples_pos: Option<i64>,
    /// Completions per prompt (the original's NUM_GENERATIONS).
    pub num_generations_pos: Option<usize>,
    /// Number of seeds (42, 43, ...); each runs baseline and CAL.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    #[command(flatten)]
    pub train: TrainArgs,
}

pub fn experiment(args: &ExperimentArgs) -> Result<()> {
    let mut targs = args.train.clone();
    targs.num_samples = args.num_samples_pos.or(targs.num_samples).or(Some(192));
    targs.num_generations = args.num_generations_pos.or(targs.num_generations);
    targs.use_cal = Some(true);
    let mut cfg = config::resolve(&targs)?;
    if args.train.output_dir.is_none() {
        cfg.output_dir = PathBuf::from("runs/experiment");
    }
    let source = Source::from_spec(&cfg.model);
    let t0 = std::time::Instant::now();
    source.prepare()?;
    let (train, test) = datasets(&cfg, &source)?;
    let grpo = grpo_config(&cfg, train.len())?;
    let seeds: Vec<u64> = (0..args.seeds.max(1) as u64)
        .map(|i| cfg.seed + i)
        .collect();
    eprintln!(
        "experiment: baseline vs CAL ({}), {} steps × {} prompts × {} generations, {} training / {} held-out problems, seeds {seeds:?}",
        cfg.credit.mode.name(),
        grpo.steps,
        grpo.prompts_per_step,
        grpo.num_generations,
        train.len(),
        test.len()
    );
    let ecfg = ExperimentConfig {
        out_dir: cfg.output_dir.clone(),
        seeds,
        cal_mode: cfg.credit.mode,
        grpo,
        eval: eval_config(&cfg),
    };
    let results = experiment::run(&source, &ecfg, &train, &test)?;
    let table = experiment::summary_table(&results);
    std::fs::write(cfg.output_dir.join("summary.md"), &table)?;
    println!("{table}");
    println!(
        "results in {} ({:.0}s wall)",
        cfg.output_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn compare(runs: &[PathBuf], out: Option<&Path>) -> Result<()> {
    let (a, b) = match runs {
        [a, b] => (a.clone(), b.clone()),
        [] => (
            PathBuf::from("runs/baseline-seed42"),
            PathBuf::from("runs/cal-seed42"),
        ),
        _ => bail!("compare takes two results files or run folders (baseline first)"),
    };
    let (na, ea) = cal_train::compare::read_eval(&a)?;
    let (nb, eb) = cal_train::compare::read_eval(&b)?;
    let c = cal_train::compare::compare(&na, &ea, &nb, &eb)?;
    println!("{}", c.table());
    let dir_of = |p: &Path| {
        if p.is_dir() {
            p.to_path_buf()
        } else {
            p.parent().unwrap_or(Path::new(".")).to_path_buf()
        }
    };
    let png = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir_of(&b).join("comparison_curves.png"));
    match cal_train::compare::plot_curves(
        &[(na, dir_of(&a)), (nb, dir_of(&b))],
        "reward/accuracy",
        &png,
    ) {
        Ok(()) => println!("training curves: {}", png.display()),
        Err(e) => eprintln!("plot skipped: {e:#}"),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct SftArgs {
    /// `tiny` (train the embedded default) or a model path.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// GSM8K-format training file (`generated` for the embedded problems).
    #[arg(long, default_value = "generated")]
    pub dataset: String,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-5)]
    pub learning_rate: f64,
    /// LoRA rank (0 = full fine-tuning).
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
}

pub fn sft(args: &SftArgs) -> Result<()> {
    if args.model == "tiny" {
        let spec = TinySpec::default();
        let tp = tiny::tiny_policy(&spec, &tiny::cache_root())?;
        load::export_hf(&tp.policy.model, &tp.policy.tok, &args.output_dir)?;
        println!(
            "tiny policy (cached SFT recipe) exported to {}",
            args.output_dir.display()
        );
        return Ok(());
    }
    let l = load::load(Path::new(&args.model), DType::F32, &Device::Cpu)?;
    let mut policy = Policy::new(l.model, l.tokenizer);
    let examples = if args.dataset == "generated" {
        TinySpec::default().splits().0
    } else {
        data::load(Path::new(&args.dataset))?
    };
    let examples = data::select(examples, args.num_samples, Some(args.seed));
    let trainable: Box<dyn Fn(&str) -> bool> = if args.lora_rank > 0 {
        policy.model.add_lora(
            LoraConfig {
                rank: args.lora_rank,
                alpha: 2.0 * args.lora_rank as f64,
                dropout: args.lora_dropout,
                targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                    .map(String::from)
                    .to_vec(),
            },
            args.seed,
        )?;
        Box::new(|k: &str| k.contains(".lora_"))
    } else {
        Box::new(|_: &str| true)
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

/// `eval --model`: generate on the dataset and grade.
pub fn eval_model(
    model: &str,
    dataset: &Path,
    samples: usize,
    num_samples: i64,
    max_new_tokens: usize,
    out: &Path,
) -> Result<()> {
    let source = Source::from_spec(model);
    let policy = source.fresh()?;
    let examples = data::select(data::load(dataset)?, num_samples, None);
    let cfg = EvalConfig {
        max_new_tokens,
        samples,
        greedy: samples <= 1,
        ..EvalConfig::default()
    };
    let r = evaluate(&policy, &examples, &cfg, "eval")?;
    std::fs::create_dir_all(out)?;
    let v = serde_json::json!({"name": model, "model": model, "dataset": dataset, "config": cfg, "accuracy": r.accuracy, "pass_at_k": r.pass_at_k, "examples": r.examples});
    std::fs::write(
        out.join("eval_results.json"),
        serde_json::to_string_pretty(&v)?,
    )?;
    let mut w = String::new();
    for e in &r.examples {
        w.push_str(&serde_json::to_string(e)?);
        w.push('\n');
    }
    std::fs::write(out.join("eval_examples.jsonl"), w)?;
    println!(
        "strict-match     {:6.2}%  ({}/{})\nflexible-extract {:6.2}%  ({}/{})\naccuracy         {:6.2}%  pass@{} {:.2}%\nresults: {}",
        100.0 * r.accuracy.strict_accuracy,
        r.accuracy.strict_correct,
        r.accuracy.total,
        100.0 * r.accuracy.flexible_accuracy,
        r.accuracy.flexible_correct,
        r.accuracy.total,
        100.0 * r.accuracy.accuracy,
        samples,
        100.0 * r.pass_at_k,
        out.join("eval_results.json").display()
    );
    Ok(())
}

/// `cal-grpo bench generate`: generation throughput alone, one line per model, for
/// `bench/hf_generate.py` to interleave with `transformers`' `generate`.
pub fn bench_generate(models: &[String], repeats: usize, new_tokens: usize) -> Result<()> {
    for m in models {
        let p = Source::from_spec(m).fresh()?;
        let (med, all) = cal_train::bench::bench_generation(&p, 8, new_tokens, repeats)?;
        let all: Vec<String> = all.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "{m}: generation batch 8 x {new_tokens} new tokens: {med:.1} tok/s (median of {}: {})",
            all.len(),
            all.join(", ")
        );
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

pub fn bench(models: &[String], repeats: usize, seq: usize, new_tokens: usize) -> Result<()> {
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
        let mut p = Source::from_spec(m).fresh()?;
        eprintln!("benchmarking {m} ...");
        let name = Path::new(m)
            .file_name()
            .map_or(m.clone(), |n| n.to_string_lossy().into_owned());
        rows.push(cal_train::bench::bench_policy(
            &name, &mut p, 8, new_tokens, seq, repeats,
        )?);
    }
    println!("{}", cal_train::bench::table(&rows));
    println!(
        "batch 8; generation {new_tokens} new tokens per row; training step = forward + backward + AdamW on 8 × {seq} tokens; \
         medians of {repeats} runs, each interleaved with the matmul reference; {} CPU threads; load average before: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
