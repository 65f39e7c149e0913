//! The log stage: scalar metrics to TensorBoard event files and to JSONL, and a
//! progress display (a bar with ETA on a terminal, plain lines otherwise).
//!
//! TensorBoard's format is TFRecord framing (`u64 len`, masked CRC-32C of len, payload,
//! masked CRC-32C of payload) around `Event` protobufs; the few fields we need are
//! encoded by hand rather than pulling in a protobuf toolchain.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_delimited(field: u32, payload: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64: wall_time
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint: step
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes scalars to `events.out.tfevents.*` in a log directory.
pub struct TensorBoard {
    out: BufWriter<File>,
    pub path: PathBuf,
}

impl TensorBoard {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.cal-grpo",
            now() as u64
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut tb = Self {
            out: BufWriter::new(file),
            path,
        };
        let header = event(now(), 0, |e| len_delimited(3, b"brain.Event:2", e));
        tb.record(&header)?;
        tb.out.flush()?;
        Ok(tb)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())?;
        Ok(())
    }

    /// Marks a restart at `step` (an `Event.session_log` with status START): TensorBoard
    /// then purges the events of earlier files at `step` and later, which a killed run
    /// wrote after its last checkpoint and the resumed run writes again.
    pub fn session_start(&mut self, step: i64) -> Result<()> {
        let ev = event(now(), step, |e| {
            let start = [0x08, 0x01]; // SessionLog field 1 (status), varint START = 1
            len_delimited(7, &start, e);
        });
        self.record(&ev)?;
        self.out.flush()?;
        Ok(())
    }

    /// Writes every scalar of `metrics` at `step` as one event.
    pub fn scalars(&mut self, step: i64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        let ev = event(now(), step, |e| {
            let mut summary = Vec::new();
            for (tag, v) in metrics.iter().filter(|(_, v)| v.is_finite()) {
                let mut val = Vec::new();
                len_delimited(1, tag.as_bytes(), &mut val);
                val.push(0x15); // field 2, fixed32: simple_value
                val.extend_from_slice(&(*v as f32).to_le_bytes());
                len_delimited(1, &val, &mut summary);
            }
            len_delimited(5, &summary, e);
        });
        self.record(&ev)?;
        self.out.flush()?;
        Ok(())
    }
}

/// Appends one JSON object per line.
pub struct JsonlLog {
    out: BufWriter<File>,
}

impl JsonlLog {
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        writeln!(self.out, "{value}")?;
        self.out.flush()?;
        Ok(())
    }
}

/// A progress bar with ETA on a terminal, one plain line per update otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: u64,
    /// Shows nothing (a data-parallel run's other ranks: rank 0 speaks for the run).
    silent: bool,
}

impl Progress {
    pub fn new(label: &str, total: u64, position: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b.set_position(position);
            b
        });
        Self {
            bar,
            label: label.to_string(),
            total,
            silent: false,
        }
    }

    /// One that shows nothing.
    pub fn silent() -> Self {
        Self {
            bar: None,
            label: String::new(),
            total: 0,
            silent: true,
        }
    }

    pub fn update(&self, position: u64, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(position);
                b.set_message(msg.to_string());
            }
            None if self.silent => {}
            None => eprintln!("{} {position}/{} {msg}", self.label, self.total),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A run folder's two logs, TensorBoard (`tb/`) and `metrics.jsonl`, written together:
/// one row of scalars per call, tagged with its step.
pub struct RunLogs {
    tb: TensorBoard,
    jsonl: JsonlLog,
}

impl RunLogs {
    /// Opens the logs of `out_dir`. Resuming from the checkpoint of step `resumed`, what
    /// the killed run logged after it is dropped (it is logged again) and TensorBoard
    /// starts a new session there.
    pub fn open(out_dir: &Path, resumed: Option<usize>) -> Result<Self> {
        let mut tb = TensorBoard::create(&out_dir.join("tb"))?;
        let metrics = out_dir.join("metrics.jsonl");
        if let Some(step) = resumed {
            let dropped = crate::rundir::truncate_jsonl_after(&metrics, step)?;
            if dropped > 0 {
                eprintln!("dropped {dropped} metrics rows past step {step} (logged again)");
            }
            tb.session_start(step as i64 + 1)?;
        }
        Ok(Self {
            tb,
            jsonl: JsonlLog::append(&metrics)?,
        })
    }

    /// Writes `m` at `step` to both logs.
    pub fn write(&mut self, step: usize, m: &BTreeMap<String, f64>) -> Result<()> {
        self.tb.scalars(step as i64, m)?;
        let mut row = serde_json::to_value(m)?;
        row["step"] = serde_json::json!(step);
        self.jsonl.write(&row)
    }
}
