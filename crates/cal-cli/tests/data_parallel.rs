//! Data parallel over MPI: `mpirun -np 2 cal-grpo train` against one process with the
//! same global batch (and the per-group sampling seeds a data-parallel run uses), a
//! killed rank, and resuming its run with the same and with another number of ranks.
//!
//! Needs the `mpi` feature and `mpirun` (Debian's openmpi-bin):
//! `cargo test -p cal-cli --features mpi --test data_parallel`.
#![cfg(feature = "mpi")]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `mpirun -np N cal-grpo ARGS…` (N = 1: the binary alone), over loopback.
fn launch(np: usize, cache: &Path) -> Command {
    let mut c = if np == 1 {
        Command::new(env!("CARGO_BIN_EXE_cal-grpo"))
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &np.to_string(), "--oversubscribe"])
            .args(["--mca", "btl", "self,vader,tcp"])
            .arg(env!("CARGO_BIN_EXE_cal-grpo"));
        c
    };
    // OpenMPI refuses root without these (CI runs as root in a container)
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("CAL_GRPO_CACHE", cache);
    c
}

fn ok(o: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "{what}: {err}\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

/// The tiny model's quick warm start, every rank checking its weights against rank 0's
/// after each step.
const COMMON: &[&str] = &[
    "train",
    "--train-problems",
    "64",
    "--num-generations",
    "4",
    "--max-new-tokens",
    "24",
    "--eval-every",
    "0",
    "--eval-samples",
    "4",
    "--weight-check-every",
    "1",
];

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(dir: &Path, step: usize) -> HashMap<String, Tensor> {
    let f = dir.join(format!("checkpoints/step-{step:06}/weights.safetensors"));
    candle_core::safetensors::load(&f, &Device::Cpu).unwrap()
}

/// The largest |a − b| over every trained tensor (the same names on both sides).
fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect::<std::collections::BTreeSet<_>>()
    );
    a.iter()
        .map(|(k, t)| {
            (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-3)
}

/// One process and two ranks on the same global batch: loss and gradient norm at every
/// step, and the weights after the last, to f32 reduction-order tolerance.
fn one_equals_two(name: &str, extra: &[&str]) {
    one_equals_two_from(name, 4, extra)
}

/// [`one_equals_two`] from a warm start of `sft_steps` steps.
fn one_equals_two_from(name: &str, sft_steps: usize, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = |np: usize, seeds: &[&str]| -> PathBuf {
        let out = dir.path().join(format!("np{np}"));
        let o = launch(np, &cache)
            .args(COMMON)
            .args(["--sft-steps", &sft_steps.to_string()])
            .args(["--steps", "3", "--prompts-per-step", "4"])
            .args(extra)
            .args(seeds)
            .arg("--output-dir")
            .arg(&out)
            .output()
            .unwrap();
        let err = ok(o, &format!("{name}, {np} rank(s)"));
        if np > 1 {
            assert!(
                err.contains("data parallel: 2 ranks, 2 prompts each"),
                "{err}"
            );
        }
        out
    };
    // one process first: it makes the warm start both runs start from
    let one = run(1, &["--rollout-seeds", "group"]);
    let two = run(2, &[]);
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 3, "{name}");
    assert_eq!(m2.len(), 3, "{name}: rank 0 alone logs");
    for (a, b) in m1.iter().zip(&m2) {
        // the same samples: the same rewards, exactly
        for k in ["reward/accuracy", "reward/mean", "completion/mean_length"] {
            assert_eq!(a[k], b[k], "{name} step {}: {k}", a["step"]);
        }
        for (k, rel) in [
            ("loss/total", 1e-3),
            ("optim/grad_norm", 1e-5),
            ("reward/std", 1e-9),
            ("policy/entropy", 1e-5),
        ] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                close(x, y, rel),
                "{name} step {}: {k} {x} vs {y}",
                a["step"]
            );
        }
    }
    // online DPO learns from pairs: the steps must have made some, on both sides
    let pairs =
        |m: &[serde_json::Value]| -> f64 { m.iter().filter_map(|r| r["dpo/pairs"].as_f64()).sum() };
    assert_eq!(pairs(&m1), pairs(&m2), "{name}: pairs");
    if name.contains("dpo") {
        assert!(pairs(&m1) > 0.0, "{name}: no pairs in 3 steps");
        eprintln!("{name}: {} pairs in 3 steps", pairs(&m1));
    }
    let d = max_diff(&weights(&one, 3), &weights(&two, 3));
    eprintln!("{name}: largest weight difference after 3 steps {d:.3e}");
    assert!(d <= 1e-5, "{name}: weights differ by {d}");
}

#[test]
fn two_ranks_train_grpo_as_one_process() {
    one_equals_two("grpo", &[]);
}

#[test]
fn two_ranks_train_cal_as_one_process() {
    one_equals_two("cal", &["--use-cal"]);
}

#[test]
fn two_ranks_train_ppo_as_one_process() {
    one_equals_two("ppo", &["--algorithm", "ppo"]);
}

#[test]
fn two_ranks_train_lora_as_one_process() {
    one_equals_two("lora", &["--lora-rank", "4", "--use-cal"]);
}

#[test]
fn two_ranks_train_a_model_of_smollm2_widths_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2_widths(dir.path());
    one_equals_two(
        "smollm2-widths",
        &["--model", &model, "--learning-rate", "1e-4"],
    );
}

/// Online DPO: each rank pairs its own groups' answers; the loss averages over the
/// pairs of all ranks. One-step problems and a longer warm start, so that groups hold
/// right and wrong answers.
#[test]
fn two_ranks_train_online_dpo_as_one_process() {
    one_equals_two_from(
        "online dpo",
        60,
        &[
            "--algorithm",
            "dpo",
            "--learning-rate",
            "1e-3",
            "--chain-steps",
            "1",
        ],
    );
}

/// On-policy distillation: each rank scores its own samples with its copy of the
/// teacher (here a random model of one layer, the student's vocabulary).
#[test]
fn two_ranks_train_on_policy_distillation_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2_widths(dir.path());
    let teacher = dir.path().join("teacher");
    let o = launch(1, &dir.path().join("cache"))
        .args(["export", "--model"])
        .arg(random_model(dir.path(), "teacher.json", 1))
        .arg("--output-dir")
        .arg(&teacher)
        .output()
        .unwrap();
    ok(o, "exporting the teacher");
    let teacher = teacher.display().to_string();
    one_equals_two(
        "on-policy distill",
        &[
            "--model",
            &model,
            "--learning-rate",
            "1e-4",
            "--algorithm",
            "on-policy-distill",
            "--teacher",
            &teacher,
        ],
    );
}

/// `distill` on 2 ranks against one process: each rank takes half of every batch; the
/// loss at every step and the weights after the last (the student's and the attention
/// strategy's projection).
#[test]
fn two_ranks_run_distill_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = smollm2_widths(dir.path());
    let run = |np: usize| -> PathBuf {
        let out = dir.path().join(format!("distill-np{np}"));
        let o = launch(np, &dir.path().join("cache"))
            .args(["distill", "--teacher", &teacher, "--student-layers", "1"])
            .args([
                "--strategy",
                "attention",
                "--steps",
                "3",
                "--batch-size",
                "4",
            ])
            .args(["--num-samples", "32", "--save-every", "1"])
            .args(["--weight-check-every", "1", "--eval-every", "0"])
            .arg("--output-dir")
            .arg(&out)
            .output()
            .unwrap();
        ok(o, &format!("distill, {np} rank(s)"));
        out
    };
    let (one, two) = (run(1), run(2));
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!((m1.len(), m2.len()), (3, 3));
    for (a, b) in m1.iter().zip(&m2) {
        for k in ["distill/loss", "distill/kl"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(close(x, y, 1e-5), "step {}: {k} {x} vs {y}", a["step"]);
        }
    }
    let d = max_diff(&weights(&one, 3), &weights(&two, 3));
    eprintln!("distill: largest weight difference after 3 steps {d:.3e}");
    assert!(d <= 1e-5, "distill: weights differ by {d}");
}

/// A model of SmolLM2-135M's widths and heads with 2 layers, and the small vocabulary
/// of the tokenizer a random model is given.
fn smollm2_widths(dir: &Path) -> String {
    random_model(dir, "config.json", 2)
}

/// A random model of SmolLM2-135M's widths with `layers` layers.
fn random_model(dir: &Path, name: &str, layers: usize) -> String {
    let cfg = dir.join(name);
    std::fs::write(
        &cfg,
        format!(
            r#"{{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": {layers}, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 512}}"#
        ),
    )
    .unwrap();
    format!("random:{}", cfg.display())
}

/// `sft` on 2 ranks against one process: each rank takes half of every batch; the
/// loss at every step and the weights after the last, to f32 tolerance (full
/// fine-tuning and LoRA, the second with token-budget micro-batches).
#[test]
fn two_ranks_run_sft_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2_widths(dir.path());
    for (name, extra) in [
        ("full", vec![]),
        (
            "lora",
            vec!["--lora-rank", "4", "--micro-batch-tokens", "200"],
        ),
    ] {
        let run = |np: usize| -> PathBuf {
            let out = dir.path().join(format!("sft-{name}-np{np}"));
            let o = launch(np, &dir.path().join("cache"))
                .args([
                    "sft",
                    "--model",
                    &model,
                    "--steps",
                    "3",
                    "--batch-size",
                    "4",
                ])
                .args([
                    "--num-samples",
                    "32",
                    "--save-every",
                    "1",
                    "--weight-check-every",
                    "1",
                ])
                .args(&extra)
                .arg("--output-dir")
                .arg(&out)
                .output()
                .unwrap();
            ok(o, &format!("sft {name}, {np} rank(s)"));
            out
        };
        let (one, two) = (run(1), run(2));
        let (m1, m2) = (metrics(&one), metrics(&two));
        assert_eq!((m1.len(), m2.len()), (3, 3), "{name}");
        for (a, b) in m1.iter().zip(&m2) {
            let (x, y) = (
                a["sft/loss"].as_f64().unwrap(),
                b["sft/loss"].as_f64().unwrap(),
            );
            assert!(
                close(x, y, 1e-5),
                "{name} step {}: loss {x} vs {y}",
                a["step"]
            );
        }
        let d = max_diff(&weights(&one, 3), &weights(&two, 3));
        eprintln!("sft {name}: largest weight difference after 3 steps {d:.3e}");
        assert!(d <= 1e-5, "sft {name}: weights differ by {d}");
    }
}

/// `dpo` on 2 ranks against one process, on TRL-format pairs: each rank takes half of
/// every batch of pairs; the loss and reward metrics at every step and the weights after
/// the last (DPO with a frozen reference, and IPO with LoRA).
#[test]
fn two_ranks_run_dpo_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2_widths(dir.path());
    let pairs = dir.path().join("pairs.jsonl");
    let rows: String = (0..24)
        .map(|i| {
            let (a, b) = (i % 7 + 2, i % 5 + 3);
            serde_json::json!({
                "prompt": format!("Question: what is {a} + {b}?\nAnswer:"),
                "chosen": format!(" {a} + {b} = {}. The answer is {}.", a + b, a + b),
                "rejected": format!(" {a} + {b} = {}. The answer is {}.", a + b + 1, a + b + 1),
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&pairs, rows).unwrap();
    for (name, extra) in [
        ("dpo", vec![]),
        ("ipo-lora", vec!["--loss", "ipo", "--lora-rank", "4"]),
    ] {
        let run = |np: usize| -> PathBuf {
            let out = dir.path().join(format!("{name}-np{np}"));
            let o = launch(np, &dir.path().join("cache"))
                .args(["dpo", "--model", &model, "--dataset"])
                .arg(&pairs)
                .args(["--steps", "3", "--batch-size", "4", "--save-every", "1"])
                .args(["--weight-check-every", "1", "--learning-rate", "1e-4"])
                .args(&extra)
                .arg("--output-dir")
                .arg(&out)
                .output()
                .unwrap();
            ok(o, &format!("{name}, {np} rank(s)"));
            out
        };
        let (one, two) = (run(1), run(2));
        let rows = |m: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
            m.into_iter().filter(|r| r.get("loss").is_some()).collect()
        };
        let (m1, m2) = (rows(metrics(&one)), rows(metrics(&two)));
        assert_eq!((m1.len(), m2.len()), (3, 3), "{name}");
        for (a, b) in m1.iter().zip(&m2) {
            for k in [
                "loss",
                "logps/chosen",
                "rewards/margins",
                "rewards/accuracies",
            ] {
                let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
                assert!(
                    close(x, y, 1e-4),
                    "{name} step {}: {k} {x} vs {y}",
                    a["step"]
                );
            }
        }
        let d = max_diff(&weights(&one, 3), &weights(&two, 3));
        eprintln!("{name}: largest weight difference after 3 steps {d:.3e}");
        assert!(d <= 1e-5, "{name}: weights differ by {d}");
    }
}

/// `experiment` under `mpirun`: each arm on both ranks, one after another; rank 0
/// evaluates and compares. Its arms answer the held-out problems as those of one process
/// with the same sampling seeds.
#[test]
fn an_experiment_on_two_ranks_is_the_experiment_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let run = |np: usize| -> PathBuf {
        let out = dir.path().join(format!("exp-np{np}"));
        let o = launch(np, &dir.path().join("cache"))
            .args(["experiment", "--sft-steps", "4", "--train-problems", "64"])
            .args(["--steps", "2", "--num-samples", "8", "--eval-samples", "6"])
            .args(["--prompts-per-step", "2", "--num-generations", "2"])
            .args(["--max-new-tokens", "24", "--eval-every", "1", "--jobs", "1"])
            .args(["--rollout-seeds", "group", "--output-dir"])
            .arg(&out)
            .output()
            .unwrap();
        ok(o, &format!("experiment, {np} rank(s)"));
        out
    };
    let (one, two) = (run(1), run(2));
    for arm in ["baseline", "cal"] {
        let read = |d: &Path| {
            std::fs::read_to_string(d.join("seed-42").join(arm).join("eval_examples.jsonl"))
                .unwrap()
        };
        assert_eq!(read(&one), read(&two), "{arm}: held-out responses differ");
    }
    assert!(two.join("summary.md").exists());
}

#[test]
fn prompts_that_do_not_divide_over_the_ranks_are_an_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let o = launch(2, &dir.path().join("cache"))
        .args(COMMON)
        .args(["--sft-steps", "4"])
        .args(["--steps", "1", "--prompts-per-step", "3", "--output-dir"])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--prompts-per-step 3 does not divide over the 2 ranks"),
        "{err}"
    );
}

/// The pid of rank `rank` of the run writing to `out` (its launcher's environment).
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(&*out.to_string_lossy()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Rank 1 killed mid-run: the launcher stops the run within seconds, naming the rank;
/// the last checkpoint is whole, and resuming from it with 2 ranks gives the weights of
/// the run that was never killed, to the bit (with 1 process, to f32 tolerance).
#[test]
fn a_killed_rank_stops_the_run_and_its_checkpoint_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let steps = "30";
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = COMMON.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "--sft-steps",
                "4",
                "--steps",
                steps,
                "--prompts-per-step",
                "4",
                "--save-every",
                "2",
                "--output-dir",
            ]
            .map(String::from),
        );
        a.push(out.display().to_string());
        a
    };
    let whole = dir.path().join("whole");
    ok(
        launch(2, &cache).args(args(&whole)).output().unwrap(),
        "uninterrupted",
    );
    let killed = dir.path().join("killed");
    let child = launch(2, &cache)
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !killed.join("checkpoints/step-000004").exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rank_pid(&killed, 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed_at = Instant::now();
    let o = child.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    assert!(!o.status.success());
    assert!(
        took < Duration::from_secs(20),
        "the others took {took:?} to stop"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rank 1"),
        "the launcher names the killed rank: {err}"
    );
    let last = std::fs::read_to_string(killed.join("checkpoints/latest")).unwrap();
    assert!(killed
        .join("checkpoints")
        .join(last.trim())
        .join("weights.safetensors")
        .exists());
    assert!(last.trim() != "step-000030", "killed after the end: {last}");
    // resume the same folder twice: with 2 ranks, and (a copy) with 1 process
    let copy = dir.path().join("killed-1");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&killed)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    ok(
        launch(2, &cache)
            .args(args(&killed))
            .arg("--resume")
            .output()
            .unwrap(),
        "resume on 2 ranks",
    );
    assert_eq!(
        max_diff(&weights(&whole, 30), &weights(&killed, 30)),
        0.0,
        "resumed on 2 ranks"
    );
    ok(
        launch(1, &cache)
            .args(args(&copy))
            .arg("--resume")
            .output()
            .unwrap(),
        "resume in 1 process",
    );
    let d = max_diff(&weights(&whole, 30), &weights(&copy, 30));
    assert!(d <= 1e-4, "resumed in 1 process: weights differ by {d}");
}
