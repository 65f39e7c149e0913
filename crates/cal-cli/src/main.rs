//! `cal-grpo`: GRPO and CAL-GRPO post-training with fine-grained credit assignment.

mod arms;
mod bench;
mod compare;
mod config;
mod demo;
mod distill;
mod docs;
mod dpo;
mod eval;
mod experiment;
mod export;
mod gen_data;
mod generate;
mod make_pairs;
mod oracle;
mod oracle_bench;
mod sft;
mod source;
mod summarize;
mod train;

#[global_allocator]
// mimalloc keeps freed pages: candle allocates fresh buffers per op, and glibc's
// mmap/munmap of each one doubled step time in measurements.
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    Compare(compare::CompareArgs),
    /// Baseline + CAL + comparison in one command.
    Experiment(experiment::ExperimentArgs),
    /// One table across finished experiment folders: each one's chain length K and
    /// warm start, both arms' gains and CAL − baseline over seeds.
    Summarize(summarize::SummarizeArgs),
    /// Ask an oracle for the first error of one response.
    Oracle(oracle::OracleArgs),
    /// How well an oracle locates first errors on labeled responses (a table, and JSON
    /// with --output).
    OracleBench(oracle_bench::OracleBenchArgs),
    /// Labeled wrong responses from reference solutions: one step corrupted (result,
    /// operand or operation) and carried forward, the first error known exactly.
    PlantErrors(oracle_bench::PlantArgs),
    /// Benchmark the model stack (generation, training step, reference pass) on a device.
    Bench(bench::BenchArgs),
    /// Train and evaluate one arm of an experiment (what `experiment --jobs` starts
    /// in a child process).
    #[command(hide = true)]
    Arm {
        /// The arm, as JSON (`seed-N/NAME.arm.json` in the experiment's folder).
        file: PathBuf,
    },
    /// Walk one example through oracle → locate → map → token rewards.
    Demo(demo::DemoArgs),
    /// Supervised fine-tuning on reference solutions (warm start).
    Sft(sft::SftArgs),
    /// Preference optimisation (DPO, IPO, ORPO) on a TRL-format pairs file.
    Dpo(dpo::DpoArgs),
    /// Distillation of a teacher into a student (logit, attention or feature strategy) on a dataset's solutions
    Distill(distill::DistillArgs),
    /// Preference pairs (TRL's format) from labeled responses: the reference solution
    /// chosen, the wrong response rejected, with its first error's offset.
    MakePairs(make_pairs::MakePairsArgs),
    /// Write any model we load (GGUF included), optionally with a PEFT adapter merged
    /// in, as a Hugging Face folder.
    Export(export::ExportArgs),
    /// Generate a completion with a model.
    Generate(generate::GenerateArgs),
    /// Write generated GSM8K-format problems as JSONL (the embedded default dataset).
    GenData(gen_data::GenDataArgs),
    /// Print docs/configuration.md: every configuration key and flag with its default.
    #[command(hide = true)]
    ConfigDocs,
}

/// The ranks of a data-parallel run (set on the main thread, for `train`; taken and
/// dropped before exit, which finalises MPI).
static RANKS: std::sync::Mutex<Option<std::sync::Arc<dyn cal_train::collective::Collective>>> =
    std::sync::Mutex::new(None);

fn ranks() -> Option<std::sync::Arc<dyn cal_train::collective::Collective>> {
    RANKS.lock().ok()?.clone()
}

fn run(cli: Cli) -> Result<ExitCode> {
    let ranks = cal_train::collective::launched_ranks();
    let parallel = matches!(
        cli.command,
        Command::Train(_)
            | Command::Sft(_)
            | Command::Dpo(_)
            | Command::Distill(_)
            | Command::Experiment(_)
    );
    if ranks > 1 && !parallel {
        anyhow::bail!(
            "started as one of {ranks} MPI ranks: of the commands, `train`, `sft`, `dpo`, \
             `distill` and `experiment` run data parallel; run this one without mpirun"
        );
    }
    // the ranks of a data-parallel run, initialised on this (the main) thread
    let launch = || -> Result<std::sync::Arc<dyn cal_train::collective::Collective>> {
        let c = cal_train::collective::from_launch()?;
        if let Ok(mut r) = RANKS.lock() {
            *r = Some(c.clone());
        }
        Ok(c)
    };
    match cli.command {
        Command::Train(args) => train::run(&args, launch()?)?,
        Command::Eval(args) => eval::run(&args)?,
        Command::Compare(args) => compare::run(&args)?,
        Command::Experiment(args) => experiment::run(&args, launch()?)?,
        Command::Summarize(args) => summarize::run(&args)?,
        Command::Oracle(args) => oracle::run(&args)?,
        Command::Bench(args) => bench::run(&args)?,
        Command::OracleBench(args) => oracle_bench::run(&args)?,
        Command::PlantErrors(args) => oracle_bench::plant(&args)?,
        Command::Arm { file } => match arms::run_child(&file) {
            Ok(()) => {}
            // The parent tells an interrupted arm from a failed one by this code.
            Err(e) if cal_train::trainer::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => {
                eprintln!("{e:#}");
                return Ok(ExitCode::from(130));
            }
            Err(e) => return Err(e),
        },
        Command::Demo(args) => demo::run(&args)?,
        Command::Sft(args) => sft::run(&args, launch()?)?,
        Command::Dpo(args) => dpo::run(&args, launch()?)?,
        Command::Distill(args) => distill::run(&args, launch()?)?,
        Command::MakePairs(args) => make_pairs::run(&args)?,
        Command::Export(args) => export::run(&args)?,
        Command::Generate(args) => generate::run(&args)?,
        Command::GenData(args) => gen_data::run(&args)?,
        Command::ConfigDocs => print!("{}", docs::configuration_markdown(&Cli::command())?),
    }
    Ok(ExitCode::SUCCESS)
}

/// The parser, with `train`, `experiment` and `sft` showing each flag's default and
/// configuration key, taken from the run configuration itself.
fn cli_command() -> clap::Command {
    config::name_keyed_values(Cli::command())
        .mut_subcommand("train", |c| {
            config::annotate_defaults(c, &serde_json::json!({}))
        })
        .mut_subcommand("experiment", |c| {
            config::annotate_defaults(c, &config::experiment_defaults())
        })
        .mut_subcommand("sft", |c| config::annotate_defaults(c, &sft::defaults()))
        .mut_subcommand("dpo", |c| config::annotate_defaults(c, &dpo::defaults()))
        .mut_subcommand("distill", |c| {
            config::annotate_defaults(c, &distill::defaults())
        })
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
        // the ranks of a data-parallel run on this machine share its cores
        let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
            .iter()
            .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
            .unwrap_or_else(cal_train::collective::launched_ranks);
        let n = (n / local.max(1)).max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        if local > 1 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        }
    }
}

fn main() -> ExitCode {
    tune_runtime();
    // First Ctrl-C: finish the current step, save a checkpoint, exit. Second: exit now.
    let _ = ctrlc::set_handler(|| {
        use std::sync::atomic::Ordering;
        if cal_train::trainer::INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    });
    let cmd = cli_command();
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => {
            // the last reference: MPI finalises here, on every rank
            RANKS.lock().map(|mut r| r.take()).ok();
            code
        }
        Err(e) => {
            let full = std::env::var("CAL_GRPO_BACKTRACE").is_ok_and(|v| v != "0");
            match ranks().filter(|c| c.world() > 1) {
                Some(c) => {
                    // the others wait for this rank in a collective: end them all
                    eprintln!(
                        "error (rank {}): {}",
                        c.rank(),
                        user_message(&format!("{e:#}"), full)
                    );
                    c.abort(1)
                }
                None => {
                    eprintln!("error: {}", user_message(&format!("{e:#}"), full));
                    ExitCode::FAILURE
                }
            }
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
