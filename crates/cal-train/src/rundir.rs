//! The run folder's guard: one writer at a time, no silent overwrite of another run,
//! and logs cut back to the checkpoint on resume, so that a folder always holds one
//! run's story, told once.
//!
//! The lock is the OS's advisory file lock (`flock` on Linux, via `std::fs::File::lock`)
//! on `OUTPUT/.lock`, held for as long as the writer lives. The kernel drops it when the
//! holder dies however it dies (SIGKILL included), so a lock can never outlive its
//! process; the PID and start time written inside only serve the messages.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How a writer starts on its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// A new run; refused if the folder holds another run's results.
    #[default]
    Fresh,
    /// Continue from the folder's latest checkpoint.
    Resume,
    /// A new run; another run found in the folder is first moved aside (never deleted).
    Overwrite,
}

impl Start {
    /// From the `--resume` and `--overwrite` flags (clap makes them exclusive).
    pub fn from_flags(resume: bool, overwrite: bool) -> Self {
        match (resume, overwrite) {
            (true, _) => Start::Resume,
            (false, true) => Start::Overwrite,
            (false, false) => Start::Fresh,
        }
    }
}

impl From<bool> for Start {
    /// `resume` as a boolean (`--resume`).
    fn from(resume: bool) -> Self {
        if resume {
            Start::Resume
        } else {
            Start::Fresh
        }
    }
}

/// The exclusive right to write into a run folder; released on drop (or death).
#[derive(Debug)]
pub struct RunLock {
    /// Holds the OS lock; emptied on drop to mark a clean exit.
    file: File,
    pub path: PathBuf,
    /// The PID of an earlier holder that died without removing its lock file.
    pub took_over_from: Option<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The lock file a run holds in its output folder.
pub const LOCK_FILE: &str = ".lock";

impl RunLock {
    /// Takes `dir/.lock` (creating `dir`), or fails at once naming the live holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut previous = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut previous);
                bail!(
                    "{} is in use by another cal-grpo run ({}); wait for it to finish, stop \
                     it, or choose another --output-dir",
                    dir.display(),
                    describe_holder(&previous)
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        let _ = file.read_to_string(&mut previous);
        let took_over_from = holder_pid(&previous);
        if let Some(pid) = &took_over_from {
            eprintln!(
                "warning: {} was left by run PID {pid}, which is no longer running; taking it over",
                path.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "pid {}\nstarted {}", std::process::id(), unix_now())?;
        file.flush()?;
        Ok(Self {
            file,
            path,
            took_over_from,
        })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // An empty lock file marks a clean exit; a killed holder leaves its PID behind.
        let _ = self.file.set_len(0);
    }
}

fn holder_pid(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("pid "))
        .map(|p| p.trim().to_string())
}

fn describe_holder(text: &str) -> String {
    let pid = holder_pid(text).unwrap_or_else(|| "unknown".into());
    let started = text
        .lines()
        .find_map(|l| l.strip_prefix("started "))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|t| format!(", started {} s ago", unix_now().saturating_sub(t)))
        .unwrap_or_default();
    format!("PID {pid}{started}")
}

/// What in `dir` shows that a run already wrote there (`None`: nothing to lose).
pub fn existing_run(dir: &Path) -> Option<String> {
    let nonempty = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
    if crate::checkpoint::latest(dir).is_some() {
        return Some("checkpoints".into());
    }
    // an SFT run exports its model into the run folder itself
    [
        "eval_results.json",
        "metrics.jsonl",
        "model/config.json",
        "model.safetensors",
    ]
    .into_iter()
    .find(|f| nonempty(&dir.join(f)))
    .map(String::from)
}

/// Refuses a fresh run into a folder that holds another run, or (with `Overwrite`)
/// moves that run into a sibling folder first. Returns where it went.
pub fn prepare(dir: &Path, start: Start) -> Result<Option<PathBuf>> {
    let Some(what) = existing_run(dir) else {
        return Ok(None);
    };
    match start {
        Start::Resume => Ok(None),
        Start::Fresh => bail!(
            "{} already holds a run ({what}); continue it with --resume, or start over \
             with --overwrite (the old run is moved aside, not deleted)",
            dir.display()
        ),
        Start::Overwrite => move_aside(dir).map(Some),
    }
}

/// Moves everything in `dir` but the lock into `<dir>.replaced-<unix time>[-n]`.
fn move_aside(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    let parent = dir.parent().unwrap_or(Path::new("."));
    let stamp = unix_now();
    let mut dest = parent.join(format!("{name}.replaced-{stamp}"));
    let mut n = 1;
    while dest.exists() {
        dest = parent.join(format!("{name}.replaced-{stamp}-{n}"));
        n += 1;
    }
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        let to = dest.join(entry.file_name());
        std::fs::rename(entry.path(), &to)
            .with_context(|| format!("moving {} to {}", entry.path().display(), to.display()))?;
    }
    eprintln!(
        "--overwrite: the previous run in {} is now in {}",
        dir.display(),
        dest.display()
    );
    Ok(dest)
}

/// Drops the rows of a JSONL log whose `"step"` is past `step` (what a killed run
/// logged after its last checkpoint, which the resumed run logs again), atomically:
/// the kept rows go to a temporary file that then replaces the log. Rows that do not
/// parse are kept. Returns how many rows were dropped.
pub fn truncate_jsonl_after(path: &Path, step: usize) -> Result<usize> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(0);
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines() {
        let row_step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if row_step.is_some_and(|s| s > step as u64) {
            dropped += 1;
        } else if !line.trim().is_empty() {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if dropped > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert!(lock.took_over_from.is_none());
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())) && err.contains("in use"),
            "{err}"
        );
        drop(lock);
        RunLock::acquire(dir.path()).expect("free again after the holder ends");
    }

    #[test]
    fn a_dead_holders_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // what a SIGKILLed holder leaves: its PID in the file, no lock held
        std::fs::write(dir.path().join(".lock"), "pid 4194999\nstarted 1\n").unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.took_over_from.as_deref(), Some("4194999"));
    }

    #[test]
    fn fresh_refuses_overwrite_moves_aside() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        assert_eq!(prepare(&dir, Start::Fresh).unwrap(), None, "no folder yet");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
        let err = prepare(&dir, Start::Fresh).unwrap_err().to_string();
        assert!(
            err.contains("--resume") && err.contains("--overwrite"),
            "{err}"
        );
        assert_eq!(prepare(&dir, Start::Resume).unwrap(), None);
        let aside = prepare(&dir, Start::Overwrite).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(aside.join("metrics.jsonl")).unwrap(),
            "{\"step\":1}\n"
        );
        assert!(existing_run(&dir).is_none());
    }

    #[test]
    fn rows_past_the_checkpoint_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"step\":0,\"eval/accuracy\":0.1}\n{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n",
        )
        .unwrap();
        assert_eq!(truncate_jsonl_after(&p, 2).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":0,\"eval/accuracy\":0.1}\n{\"step\":1}\n{\"step\":2}\n"
        );
        assert_eq!(truncate_jsonl_after(&p, 2).unwrap(), 0);
        assert_eq!(
            truncate_jsonl_after(&dir.path().join("none"), 2).unwrap(),
            0
        );
    }
}
