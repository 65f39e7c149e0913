//! Our TensorBoard event files, read back two ways: by an independent Rust reader of
//! the TFRecord framing and `Event` protobuf (CRC-32C computed bit by bit here, not
//! with the crate the writer uses), always; and by TensorBoard's own reader
//! (`scripts/check_tensorboard.py`) when `CAL_TB_PYTHON` names a Python with
//! `tensorboard` (ignored otherwise; CI sets it and includes ignored tests).

use cal_train::log::TensorBoard;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn write_three_steps(dir: &Path) -> PathBuf {
    let mut tb = TensorBoard::create(dir).unwrap();
    for step in 1..=3i64 {
        let mut m = BTreeMap::new();
        m.insert("reward/accuracy".to_string(), 0.25 * step as f64);
        m.insert("loss/kl".to_string(), 0.001 * step as f64);
        m.insert("skipped/nan".to_string(), f64::NAN); // non-finite values are not written
        tb.scalars(step, &m).unwrap();
    }
    tb.path.clone()
}

/// A run killed after logging step 4 (and an evaluation at step 4) whose last
/// checkpoint was step 2, then resumed: the new writer marks a restart at step 3 and
/// logs steps 3 to 5 with other values (evaluation at 5 only).
fn write_killed_and_resumed(dir: &Path) -> (PathBuf, PathBuf) {
    let one = |tag: &str, v: f64| BTreeMap::from([(tag.to_string(), v)]);
    let mut killed = TensorBoard::create(dir).unwrap();
    for step in 1..=4i64 {
        killed
            .scalars(step, &one("reward/accuracy", 0.25 * step as f64))
            .unwrap();
    }
    killed.scalars(2, &one("eval/accuracy", 0.5)).unwrap();
    killed.scalars(4, &one("eval/accuracy", 0.75)).unwrap();
    let first = killed.path.clone();
    drop(killed);
    let mut resumed = TensorBoard::create(dir).unwrap();
    resumed.session_start(3).unwrap();
    for step in 3..=5i64 {
        resumed
            .scalars(step, &one("reward/accuracy", 10.0 + step as f64))
            .unwrap();
    }
    resumed.scalars(5, &one("eval/accuracy", 0.9)).unwrap();
    (first, resumed.path.clone())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    crc32c_bitwise(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// TFRecord payloads, every length and payload CRC checked.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let (mut out, mut at) = (Vec::new(), 0);
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked(len_bytes), "length CRC of the record at {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked(data), "payload CRC of the record at {at}");
        out.push(data);
        at += 16 + len;
    }
    out
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*at];
        *at += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Protobuf fields of a message: (field number, wire type, bytes or integer).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
    let (mut out, mut at) = (Vec::new(), 0);
    while at < b.len() {
        let key = varint(b, &mut at);
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((field, wire, vec![], varint(b, &mut at))),
            1 => {
                out.push((field, wire, b[at..at + 8].to_vec(), 0));
                at += 8;
            }
            2 => {
                let n = varint(b, &mut at) as usize;
                out.push((field, wire, b[at..at + n].to_vec(), 0));
                at += n;
            }
            5 => {
                out.push((field, wire, b[at..at + 4].to_vec(), 0));
                at += 4;
            }
            w => panic!("unexpected wire type {w}"),
        }
    }
    out
}

#[test]
fn event_records_read_back_with_crcs_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(write_three_steps(dir.path())).unwrap();
    let recs = records(&bytes);
    assert_eq!(recs.len(), 4, "file version header + one event per step");
    let header = fields(recs[0]);
    assert!(header.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2"));
    let mut seen = BTreeMap::new();
    for rec in &recs[1..] {
        let ev = fields(rec);
        let step = ev.iter().find(|f| f.0 == 2 && f.1 == 0).unwrap().3;
        let summary = &ev.iter().find(|f| f.0 == 5).unwrap().2;
        for value in fields(summary).iter().filter(|f| f.0 == 1) {
            let v = fields(&value.2);
            let tag = String::from_utf8(v.iter().find(|f| f.0 == 1).unwrap().2.clone()).unwrap();
            let x = f32::from_le_bytes(
                v.iter().find(|f| f.0 == 2 && f.1 == 5).unwrap().2[..4]
                    .try_into()
                    .unwrap(),
            );
            seen.insert((tag, step), x);
        }
    }
    assert_eq!(seen.len(), 6, "two finite tags × three steps: {seen:?}");
    assert_eq!(seen[&("reward/accuracy".to_string(), 3)], 0.75);
    assert_eq!(seen[&("loss/kl".to_string(), 2)], 0.002f32);
    assert!(!seen.keys().any(|(t, _)| t == "skipped/nan"));
    // a flipped byte is caught
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 6] ^= 1;
    assert!(std::panic::catch_unwind(|| records(&bad)).is_err());
}

/// Runs TensorBoard's own reader (`scripts/check_tensorboard.py`) on `dir` with the
/// given expectations; returns its output, panicking with it when a check fails.
fn check_with_tensorboard(dir: &Path, expectations: &[&str]) -> String {
    let python = std::env::var("CAL_TB_PYTHON")
        .expect("set CAL_TB_PYTHON to a Python with `tensorboard` installed (see .ci/run)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_tensorboard.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir)
        .args(expectations)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
#[ignore = "needs CAL_TB_PYTHON: a Python with the tensorboard package"]
fn tensorboard_reads_our_scalars() {
    let dir = tempfile::tempdir().unwrap();
    write_three_steps(dir.path());
    let stdout = check_with_tensorboard(
        dir.path(),
        &[
            "reward/accuracy=1:0.25",
            "reward/accuracy=3:0.75",
            "loss/kl=2:0.002",
        ],
    );
    assert!(stdout.contains("2 scalar tags"), "{stdout}");
}

#[test]
fn a_resumed_writer_marks_the_restart_step() {
    let dir = tempfile::tempdir().unwrap();
    let (_, resumed) = write_killed_and_resumed(dir.path());
    let bytes = std::fs::read(resumed).unwrap();
    let recs = records(&bytes);
    // Skip a possible header of the killed run (same second, same file).
    let start = recs
        .iter()
        .map(|r| fields(r))
        .find(|ev| ev.iter().any(|f| f.0 == 7))
        .expect("a session_log event");
    assert_eq!(start.iter().find(|f| f.0 == 2).unwrap().3, 3, "at step 3");
    let log = fields(&start.iter().find(|f| f.0 == 7).unwrap().2);
    assert_eq!((log[0].0, log[0].3), (1, 1), "SessionLog.status = START");
}

#[test]
#[ignore = "needs CAL_TB_PYTHON: a Python with the tensorboard package"]
fn tensorboard_drops_what_a_killed_run_logged_after_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_killed_and_resumed(dir.path());
    check_with_tensorboard(
        dir.path(),
        &[
            "reward/accuracy=2:0.5",
            "reward/accuracy=3:13",
            "reward/accuracy=4:14",
            "reward/accuracy=5:15",
            "eval/accuracy=2:0.5",
            "eval/accuracy=4:none",
            "eval/accuracy=5:0.9",
        ],
    );
}
