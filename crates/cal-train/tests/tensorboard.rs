//! Our event files read back with TensorBoard's own reader (`scripts/check_tensorboard.py`),
//! when `CAL_TB_PYTHON` names a Python with `tensorboard` installed (CI sets it).

use cal_train::log::TensorBoard;
use std::collections::BTreeMap;

#[test]
fn tensorboard_reads_our_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = TensorBoard::create(dir.path()).unwrap();
    for step in 1..=3i64 {
        let mut m = BTreeMap::new();
        m.insert("reward/accuracy".to_string(), 0.25 * step as f64);
        m.insert("loss/kl".to_string(), 0.001 * step as f64);
        m.insert("skipped/nan".to_string(), f64::NAN); // non-finite values are not written
        tb.scalars(step, &m).unwrap();
    }
    drop(tb);
    let bytes = std::fs::read(
        std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(bytes.len() > 100);
    let Ok(python) = std::env::var("CAL_TB_PYTHON") else {
        eprintln!("skipping the TensorBoard reader check: CAL_TB_PYTHON is not set");
        return;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_tensorboard.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir.path())
        .args([
            "reward/accuracy=1:0.25",
            "reward/accuracy=3:0.75",
            "loss/kl=2:0.002",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 scalar tags"), "{stdout}");
}
