//! `cal-grpo`: GRPO and CAL-GRPO post-training with fine-grained credit assignment.

mod arms;
mod config;
mod eval;
mod generate;
mod oracle;
mod run;

#[global_allocator]
// mimalloc keeps freed pages: candle allocates fresh buffers per op, and glibc's
// mmap/munmap of each one doubled step time in measurements.
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use cal_core::data::{self, GenConfig};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cal-grpo",
    version,
    about = "GRPO and CAL-GRPO: RL post-training with first-error credit assignment"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a policy with GRPO (baseline) or CAL-GRPO (--use-cal).
    Train(config::TrainArgs),
    /// Grade responses on a GSM8K-format dataset (strict and flexible accuracy).
    Eval(eval::EvalArgs),
    /// Compare a baseline and a CAL run (accuracy, paired bootstrap CI, McNemar).
    Compare {
        /// Two results files or run folders, baseline first
        /// [default: runs/baseline-seed42 runs/cal-seed42].
        runs: Vec<PathBuf>,
        /// Where to draw the training curves (PNG).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Baseline + CAL + comparison in one command (the original's run_experiments.sh).
    Experiment(run::ExperimentArgs),
    /// One table across finished experiment folders: each one's chain length K and
    /// warm start, both arms' gains and CAL − baseline over seeds (the README's K map).
    Summarize {
        /// Experiment folders (`--output-dir` of `experiment`), one row each.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Ask an oracle for the first error of one response.
    Oracle(oracle::OracleArgs),
    /// Benchmark the model stack (generation, training step, reference pass) on a device.
    Bench {
        /// What to benchmark: `model` (the whole table), `generate` (generation only),
        /// `kernels` (decoding-step matmuls: gemm vs the small-batch kernel) or `gemm`
        /// (training-shape products: candle vs OpenBLAS, alternately) or `step` (the
        /// training step of the first `--model`, candle vs OpenBLAS, alternately); the
        /// last two need the `openblas` feature.
        #[arg(default_value = "model")]
        what: String,
        /// Models to measure: `tiny` and/or paths (default: tiny and the SmolLM2 asset).
        #[arg(long)]
        model: Vec<String>,
        /// Measured repetitions per model (after one warm-up).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Tokens per sequence of the training step.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// New tokens per row of the generation measurement.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Rows per batch (`model`: the first; `generate`: each, e.g. `--batch 8,64,256`).
        #[arg(long, value_delimiter = ',', default_value = "8")]
        batch: Vec<usize>,
        #[command(flatten)]
        placement: config::PlacementFlags,
    },
    /// Train and evaluate one arm of an experiment (what `experiment --jobs` starts
    /// in a child process).
    #[command(hide = true)]
    Arm {
        /// The arm, as JSON (`seed-N/NAME.arm.json` in the experiment's folder).
        file: PathBuf,
    },
    /// Walk one example through oracle → locate → map → token rewards.
    Demo(oracle::DemoArgs),
    /// Supervised fine-tuning on reference solutions (warm start).
    Sft(run::SftArgs),
    /// Generate a completion with a model.
    Generate(generate::GenerateArgs),
    /// Write generated GSM8K-format problems as JSONL (the embedded default dataset).
    GenData {
        /// How many problems.
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fewest arithmetic steps per problem.
        #[arg(long, default_value_t = GenConfig::default().min_steps)]
        min_steps: usize,
        /// Most arithmetic steps per problem.
        #[arg(long, default_value_t = GenConfig::default().max_steps)]
        max_steps: usize,
        /// Largest starting quantity / addend.
        #[arg(long, default_value_t = GenConfig::default().max_operand)]
        max_operand: u64,
        /// Largest multiplier / divisor.
        #[arg(long, default_value_t = GenConfig::default().max_factor)]
        max_factor: u64,
        /// Largest intermediate value [default: bounded by --max-operand and --max-factor].
        #[arg(long)]
        max_value: Option<u64>,
        /// Wording: `story` (GSM8K-like word problems) or `chain` (bare steps).
        #[arg(long, value_enum, default_value = "story")]
        style: data::Style,
        /// Output file (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train(args) => run::train(&args).map(|_| ExitCode::SUCCESS),
        Command::Eval(args) => eval::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Compare { runs, plot } => {
            run::compare(&runs, plot.as_deref()).map(|_| ExitCode::SUCCESS)
        }
        Command::Experiment(args) => run::experiment(&args).map(|_| ExitCode::SUCCESS),
        Command::Summarize { dirs } => {
            let rows = dirs
                .iter()
                .map(|d| cal_train::summarize::read_experiment(d))
                .collect::<Result<Vec<_>>>()?;
            print!("{}", cal_train::summarize::table(&rows));
            Ok(ExitCode::SUCCESS)
        }
        Command::Oracle(args) => oracle::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Bench {
            what,
            model,
            repeats,
            seq,
            new_tokens,
            batch,
            placement,
        } => {
            let placement = placement.placement();
            anyhow::ensure!(
                batch.iter().all(|&b| b > 0),
                "--batch: every size must be at least 1"
            );
            match what.as_str() {
                "model" => run::bench(&model, placement, repeats, seq, new_tokens, batch[0])?,
                "generate" => {
                    anyhow::ensure!(!model.is_empty(), "bench generate needs --model");
                    run::bench_generate(&model, placement, repeats, new_tokens, &batch)?
                }
                "kernels" => run::bench_kernels(repeats)?,
                "gemm" => run::bench_gemm(repeats)?,
                "step" => {
                    let m = model.first().map_or("tiny", String::as_str);
                    run::bench_step(m, placement, repeats, seq)?
                }
                _ => anyhow::bail!(
                    "unknown benchmark {what:?} (model, generate, kernels, gemm, step)"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Arm { file } => match arms::run_child(&file) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            // The parent tells an interrupted arm from a failed one by this code.
            Err(e) if cal_train::grpo::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => {
                eprintln!("{e:#}");
                Ok(ExitCode::from(130))
            }
            Err(e) => Err(e),
        },
        Command::Demo(args) => oracle::demo(&args).map(|_| ExitCode::SUCCESS),
        Command::Sft(args) => run::sft(&args).map(|_| ExitCode::SUCCESS),
        Command::Generate(args) => generate::run(&args).map(|_| ExitCode::SUCCESS),
        Command::GenData {
            n,
            seed,
            min_steps,
            max_steps,
            max_operand,
            max_factor,
            max_value,
            style,
            output,
        } => {
            anyhow::ensure!(
                min_steps >= 1 && min_steps <= max_steps,
                "need 1 <= --min-steps <= --max-steps"
            );
            let cfg = GenConfig {
                min_steps,
                max_steps,
                max_operand,
                max_factor,
                mul_div: true,
                style,
                max_value,
            };
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            for ex in data::generate(n, seed, &cfg) {
                let row = serde_json::json!({"idx": ex.idx, "question": ex.question, "answer": ex.answer});
                writeln!(out, "{row}")?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Process-wide settings measured to matter on CPU (`cal-grpo bench model`):
/// - mimalloc never returns freed pages to the OS. candle allocates a fresh buffer per
///   op, many of them hundreds of MB (logits, activations); returning and re-faulting
///   them cost more system time than the matmuls (a SmolLM2 training step went from
///   36.9 s to 17.4 s with this and the next setting, sys time 85 s → 54 s).
/// - candle asks `num_cpus` for the thread count on every matmul, which reads
///   `/proc/cpuinfo` each time (6% of generation time in `perf`); an explicit
///   `RAYON_NUM_THREADS` short-circuits that. A value the user set is kept.
fn tune_runtime() {
    // mi_option_purge_delay is entry 15 of mimalloc v3's `mi_option_e`; -1 = never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        use libmimalloc_sys::{mi_option_get, mi_option_set};
        // SAFETY: called once, before any other thread exists. The default (1000 ms)
        // confirms the index still names this option in the linked mimalloc.
        unsafe {
            if mi_option_get(MI_OPTION_PURGE_DELAY) == 1000 {
                mi_option_set(MI_OPTION_PURGE_DELAY, -1);
            }
        }
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() -> ExitCode {
    tune_runtime();
    // First Ctrl-C: finish the current step, save a checkpoint, exit. Second: exit now.
    let _ = ctrlc::set_handler(|| {
        use std::sync::atomic::Ordering;
        if cal_train::grpo::INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    });
    // `train` and `experiment` show each flag's default and configuration key, taken
    // from the run configuration itself.
    let cmd = Cli::command()
        .mut_subcommand("train", |c| {
            config::annotate_defaults(c, &serde_json::json!({}))
        })
        .mut_subcommand("experiment", |c| {
            config::annotate_defaults(c, &config::experiment_defaults())
        });
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let full = std::env::var("CAL_GRPO_BACKTRACE").is_ok_and(|v| v != "0");
            eprintln!("error: {}", user_message(&format!("{e:#}"), full));
            ExitCode::FAILURE
        }
    }
}

/// The error as a user should read it. candle appends a backtrace to its errors
/// whenever `RUST_BACKTRACE` is set, which many environments export globally; those
/// frames say nothing to a user whose file is bad, so they are cut unless
/// `CAL_GRPO_BACKTRACE=1` asks for them.
fn user_message(text: &str, full: bool) -> String {
    if full {
        return text.to_string();
    }
    let is_frame = |l: &str| {
        let t = l.trim_start();
        let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
        (digits > 0 && t[digits..].starts_with(": ")) || t.starts_with("at ")
    };
    let kept: Vec<&str> = text.lines().filter(|l| !is_frame(l)).collect();
    kept.join("\n").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn backtrace_frames_are_cut_from_user_errors() {
        let text = "m.gguf: not a GGUF file: unknown magic 0x64ce0daa\n   0: candle_core::error::Error::bt\n   1: cal_model::load::load_gguf\n             at ./csu/libc-start.c:360:3\n  12: _start\n";
        assert_eq!(
            super::user_message(text, false),
            "m.gguf: not a GGUF file: unknown magic 0x64ce0daa"
        );
        assert_eq!(super::user_message(text, true), text);
        // a message that merely contains digits and colons is kept
        let plain = "data.jsonl: line 12: missing field `question`";
        assert_eq!(super::user_message(plain, false), plain);
    }
}
