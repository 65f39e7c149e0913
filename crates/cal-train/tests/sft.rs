//! `SftRun`, SFT on the training harness: a held-out curve in `metrics.jsonl`, and a
//! run killed after a checkpoint resumes to the uninterrupted run's weights and logs.

mod common;

use cal_train::config::RunConfig;
use cal_train::evaluate::EvalConfig;
use cal_train::rundir::Start;
use cal_train::sft::{SftHarness, SftRun};
use cal_train::trainer::RunEnd;
use common::{examples, policy};
use std::path::Path;

fn config() -> RunConfig {
    let mut c = RunConfig::default();
    c.sft.steps = 6;
    c.sft.batch_size = 3;
    c.sft.learning_rate = 1e-3;
    c.run.seed = 11;
    c
}

fn harness() -> SftHarness {
    SftHarness {
        save_every: 2,
        eval_every: 3,
        skip_start_eval: false,
        eval: EvalConfig {
            max_new_tokens: 8,
            ..EvalConfig::default()
        },
        weight_check_every: 0,
    }
}

fn run_in(dir: &Path, start: Start) -> SftRun {
    let data = examples(10);
    SftRun::new(
        dir,
        &config(),
        policy(2),
        &data,
        data[..4].to_vec(),
        harness(),
        start,
    )
    .unwrap()
}

fn weights(r: &SftRun) -> Vec<(String, Vec<u32>)> {
    r.policy
        .model
        .params
        .iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            // the one value that depends on the clock
            v.as_object_mut().unwrap().remove("perf/step_seconds");
            v
        })
        .collect()
}

#[test]
fn sft_logs_a_held_out_curve_and_resumes_bit_exact() {
    let a = tempfile::tempdir().unwrap();
    let mut r = run_in(a.path(), Start::Fresh);
    let (end, report) = r.run().unwrap();
    assert_eq!((end, report.steps), (RunEnd::Finished, 6));
    let want = weights(&r);
    drop(r);
    // the curve: before the first step, every 3 steps, after the last
    let evals: Vec<u64> = rows(a.path())
        .iter()
        .filter(|v| v.get("eval/accuracy").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 3, 6]);
    let losses = rows(a.path())
        .iter()
        .filter(|v| v.get("sft/loss").is_some())
        .count();
    assert_eq!(losses, 6);

    // killed after step 5 (its last checkpoint is step 4's): the lost step is logged
    // again, once
    let b = tempfile::tempdir().unwrap();
    let mut r = run_in(b.path(), Start::Fresh);
    r.evaluate_held_out().unwrap();
    for _ in 0..5 {
        r.train_step().unwrap();
    }
    drop(r);
    // a fresh start is refused where a run is; --resume continues from step 4
    let data = examples(10);
    let refused = SftRun::new(
        b.path(),
        &config(),
        policy(2),
        &data,
        data[..4].to_vec(),
        harness(),
        Start::Fresh,
    );
    assert!(format!("{:#}", refused.err().unwrap()).contains("--resume"));
    let mut r = run_in(b.path(), Start::Resume);
    assert_eq!(r.lp.step, 4);
    r.run().unwrap();
    let got = weights(&r);
    assert_eq!(want.len(), got.len());
    for ((ka, va), (kb, vb)) in want.iter().zip(&got) {
        assert_eq!(ka, kb);
        assert!(va == vb, "{ka} differs after resume");
    }
    // the resumed run's log is the uninterrupted one's: each step once, same values
    assert_eq!(rows(a.path()), rows(b.path()));
}
