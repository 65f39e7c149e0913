//! `experiment --jobs N`: the arms of an experiment trained N at a time, each in a
//! child process (`cal-grpo arm FILE`) with its share of the CPU threads.
//!
//! Why processes: the tiny policy's products are too small for two threads to speed
//! one run up much (one thread does 0.81x of two on its SFT), so two runs side by side,
//! one thread each, finish both arms in about 0.6x the time of one after the other.
//! candle's thread pools are process-wide, so a process per arm is what gives each its
//! own. The numbers do not change: every arm is computed as it would be alone.

use anyhow::{bail, Context, Result};
use cal_model::DeviceSpec;
use cal_train::evaluate::EvalReport;
use cal_train::study::experiment::{Arm, ArmRunner};
use cal_train::trainer::INTERRUPTED;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub struct Processes {
    /// Arms trained at once.
    pub jobs: usize,
    /// CPU threads for each child (`RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS`).
    pub threads: usize,
    /// Optimizer steps of each arm (for the progress display).
    pub steps: usize,
}

/// The default `--jobs`: two arms at once for the embedded `tiny` model on a CPU with
/// two threads or more (measured: `bench/experiment_jobs_ab.sh`); one otherwise. A real
/// model's products are large enough to use every thread in one run, its memory would
/// double, and one GPU serves one run best.
pub fn default_jobs(model: &str, device: DeviceSpec, threads: usize) -> usize {
    if model == "tiny" && device == DeviceSpec::Cpu && threads >= 2 {
        2
    } else {
        1
    }
}

/// The threads this process was given (`RAYON_NUM_THREADS`, set at start-up).
pub fn process_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The program to start arms with: this very executable. On Linux `/proc/self/exe`,
/// which stays valid when the file is replaced while the experiment runs (a rebuild, a
/// `cargo install`); `current_exe` then names a deleted path and every later arm would
/// fail to start.
fn this_program() -> Result<std::path::PathBuf> {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe().context("finding this program to start an arm")
}

/// `cal-grpo arm FILE`: train and evaluate the arm described in FILE (written by
/// [`Processes`]).
pub fn run_child(file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let arm: Arm = serde_json::from_str(&text)
        .with_context(|| format!("{}: not an experiment arm", file.display()))?;
    let source = crate::source::Source::of(&arm.run);
    let (train, test) = crate::source::datasets(&arm.run)?;
    let r = cal_train::study::experiment::train_and_eval(&source, &arm, &train, &test)?;
    eprintln!(
        "{}: held-out accuracy {:.1}%",
        arm.dir.display(),
        100.0 * r.accuracy.accuracy
    );
    Ok(())
}

struct Running {
    index: usize,
    child: Child,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

/// The step an arm's trainer last logged (the last row of its `metrics.jsonl`).
fn logged_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str::<serde_json::Value>(last).ok()?["step"].as_u64()
}

fn label(arm: &Arm) -> String {
    let seed = arm.dir.parent().and_then(|p| p.file_name());
    match seed {
        Some(s) => format!("{}/{}", s.to_string_lossy(), arm.name),
        None => arm.name.clone(),
    }
}

impl Processes {
    fn spawn(&self, arm: &Arm) -> Result<Child> {
        let job = arm.dir.with_extension("arm.json");
        if let Some(parent) = job.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&job, serde_json::to_string_pretty(arm)?)
            .with_context(|| format!("writing {}", job.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(arm.log_path())
            .with_context(|| format!("opening {}", arm.log_path().display()))?;
        let mut cmd = Command::new(this_program()?);
        // the name `ps` shows, rather than `/proc/self/exe`
        std::os::unix::process::CommandExt::arg0(
            &mut cmd,
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "cal-grpo".into()),
        );
        cmd.arg("arm")
            .arg(&job)
            .env("RAYON_NUM_THREADS", self.threads.to_string())
            .env("CANDLE_NUM_THREADS", self.threads.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // An arm whose experiment died is told to stop as if by Ctrl-C: it saves a
            // checkpoint after its current step, and the next run continues from it.
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                    // Its own process group: a Ctrl-C at the terminal reaches only the
                    // experiment, which passes it on once (a second one would make
                    // the arm quit without its checkpoint).
                    libc::setpgid(0, 0);
                    Ok(())
                });
            }
        }
        cmd.spawn().context("starting an arm process")
    }
}

impl ArmRunner for Processes {
    fn run_arms(&self, arms: &[Arm]) -> Result<Vec<EvalReport>> {
        let multi = std::io::IsTerminal::is_terminal(&std::io::stderr())
            .then(indicatif::MultiProgress::new);
        eprintln!(
            "training {} arms, {} at a time, {} thread(s) each (logs: {})",
            arms.len(),
            self.jobs,
            self.threads,
            arms.first().map_or(String::new(), |a| a
                .log_path()
                .with_file_name("*.log")
                .display()
                .to_string())
        );
        let mut next = 0;
        let mut running: Vec<Running> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        let mut forwarded = false;
        while next < arms.len() || !running.is_empty() {
            if !forwarded && INTERRUPTED.load(Ordering::SeqCst) {
                forwarded = true;
                next = arms.len();
                for r in &running {
                    // SAFETY: signals a child this process started and has not reaped.
                    unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGINT) };
                }
            }
            while running.len() < self.jobs.max(1) && next < arms.len() {
                let arm = &arms[next];
                if !arm.finished() {
                    let bar = multi.as_ref().map(|m| {
                        let b = m.add(indicatif::ProgressBar::new(self.steps as u64));
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{prefix:>14} [{bar:30}] {pos}/{len} {elapsed}<{eta}",
                            )
                            .unwrap()
                            .progress_chars("=> "),
                        );
                        b.set_prefix(label(arm));
                        b
                    });
                    let child = self.spawn(arm)?;
                    if bar.is_none() {
                        eprintln!("{}: started", label(arm));
                    }
                    running.push(Running {
                        index: next,
                        child,
                        started: Instant::now(),
                        bar,
                    });
                }
                next += 1;
            }
            std::thread::sleep(Duration::from_millis(500));
            let mut i = 0;
            while i < running.len() {
                let r = &mut running[i];
                let arm = &arms[r.index];
                if let Some(b) = &r.bar {
                    if let Some(s) = logged_step(&arm.dir) {
                        b.set_position(s);
                    }
                }
                match r.child.try_wait()? {
                    None => i += 1,
                    Some(status) => {
                        let r = running.swap_remove(i);
                        if let Some(b) = &r.bar {
                            b.finish_and_clear();
                        }
                        let secs = r.started.elapsed().as_secs_f64();
                        if status.success() {
                            let line = format!("{}: finished in {secs:.0}s", label(arm));
                            match &multi {
                                Some(m) => m.println(line)?,
                                None => eprintln!("{line}"),
                            }
                        } else if status.code() == Some(130) {
                            failed.push(format!("{}: interrupted", label(arm)));
                        } else {
                            failed.push(format!(
                                "{} failed ({status}); the end of {}:\n{}",
                                label(arm),
                                arm.log_path().display(),
                                tail(&arm.log_path(), 15)
                            ));
                        }
                    }
                }
            }
            if !failed.is_empty() {
                // Start nothing new; let the running arms reach a checkpoint.
                next = arms.len();
            }
        }
        if forwarded && failed.is_empty() {
            failed.push("interrupted".into());
        }
        if !failed.is_empty() {
            bail!(
                "{}\nrerun the same command to continue (finished arms are reused)",
                failed.join("\n")
            );
        }
        arms.iter().map(|a| EvalReport::read(&a.dir)).collect()
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
