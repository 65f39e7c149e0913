//! End-to-end tests of the `cal-grpo` binary.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cal-grpo"))
}

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh"]
fn eval_reference_answers_on_real_gsm8k_is_100_percent() {
    let test = cal_core::assets::asset("gsm8k/test.jsonl");
    let dir = tempfile::tempdir().unwrap();
    // predictions = the reference solutions, keyed by idx for half and by question for the rest
    let mut preds = String::new();
    for (i, line) in std::fs::read_to_string(&test).unwrap().lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = if i % 2 == 0 {
            serde_json::json!({"idx": row["idx"], "response": row["answer"]})
        } else {
            serde_json::json!({"question": row["question"], "response": row["answer"]})
        };
        preds.push_str(&format!("{p}\n"));
    }
    let pred_path = dir.path().join("preds.jsonl");
    std::fs::write(&pred_path, preds).unwrap();
    let out = bin()
        .args(["eval", "--predictions"])
        .arg(&pred_path)
        .arg("--dataset")
        .arg(&test)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("strict-match     100.00%  (1319/1319)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("flexible-extract 100.00%  (1319/1319)"),
        "{stdout}"
    );
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("preds.eval/eval_results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(results["accuracy"]["strict_accuracy"], 1.0);
    let examples =
        std::fs::read_to_string(dir.path().join("preds.eval/eval_examples.jsonl")).unwrap();
    assert_eq!(examples.lines().count(), 1319);
}

#[test]
fn eval_grades_wrong_answers_and_names_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.jsonl");
    std::fs::write(
        &ds,
        "{\"idx\": 0, \"question\": \"2+2?\", \"answer\": \"2+2=<<2+2=4>>4\\n#### 4\"}\n{\"idx\": 1, \"question\": \"3*4?\", \"answer\": \"#### 12\"}\n",
    )
    .unwrap();
    let preds = dir.path().join("p.jsonl");
    // strict-correct, flexible-only-correct, and wrong ("2" is not "12")
    std::fs::write(
        &preds,
        "{\"idx\": 0, \"response\": \"#### 4\"}\n{\"idx\": 1, \"response\": \"It is 12.\"}\n{\"idx\": 1, \"response\": \"It is 2.\"}\n",
    )
    .unwrap();
    let out = bin()
        .args(["eval", "--predictions"])
        .arg(&preds)
        .arg("--dataset")
        .arg(&ds)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("strict-match      33.33%  (1/3)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("flexible-extract  66.67%  (2/3)"),
        "{stdout}"
    );

    std::fs::write(
        &preds,
        "{\"idx\": 0, \"response\": \"#### 4\"}\n{\"idx\": 9, \"response\": \"x\"}\n",
    )
    .unwrap();
    let out = bin()
        .args(["eval", "--predictions"])
        .arg(&preds)
        .arg("--dataset")
        .arg(&ds)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("p.jsonl:2: idx 9 is not in the dataset"),
        "{stderr}"
    );

    std::fs::write(&preds, "{\"idx\": 0}\n").unwrap();
    let out = bin()
        .args(["eval", "--predictions"])
        .arg(&preds)
        .arg("--dataset")
        .arg(&ds)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("p.jsonl:1: field `response` is missing"));
}

#[test]
fn bad_invocations_fail_with_clear_messages() {
    let out = bin()
        .args(["compare", "/nonexistent/a", "/nonexistent/b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/a"));
    let out = bin()
        .args(["train", "--use-cal", "--credit", "outcome"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("span-using credit mode"));
    let out = bin()
        .args(["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}

#[test]
fn demo_marks_the_first_error() {
    let out = bin().arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("first error \"3 * 6 = 16\""), "{stdout}");
    assert!(stdout.contains("[["), "{stdout}");
}

#[test]
fn oracle_command_reports_char_and_token_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny/tokenizer.json");
    let resp = dir.path().join("r.txt");
    std::fs::write(
        &resp,
        "She sells 3 * 6 = 16 muffins.
#### 8",
    )
    .unwrap();
    let out = bin()
        .args([
            "oracle",
            "--question",
            "q",
            "--reference",
            "3 * 6 = <<3*6=18>>18
#### 6",
            "--json",
            "--tokenizer",
        ])
        .arg(&tokenizer)
        .arg("--response")
        .arg(&resp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"]["outcome"], "located");
    assert_eq!(v["outcome"]["segment"], "3 * 6 = 16");
    let (start, end) = (10, 20);
    assert_eq!(v["outcome"]["located"]["start"], start);
    assert_eq!(v["outcome"]["located"]["end"], end);
    // the token range: every token whose characters overlap the span, worked out here
    // from the tokenizer's own offsets
    let tok = tokenizers::Tokenizer::from_file(&tokenizer).unwrap();
    let text = std::fs::read_to_string(&resp).unwrap();
    let enc = tok.encode(text.as_str(), false).unwrap();
    let hit: Vec<usize> = enc
        .get_offsets()
        .iter()
        .enumerate()
        .filter(|(_, &(a, b))| a < end && b > start)
        .map(|(i, _)| i)
        .collect();
    assert!(hit.len() >= 2, "{hit:?}");
    assert_eq!(v["token_span"]["start"], hit[0]);
    assert_eq!(v["token_span"]["end"], hit[hit.len() - 1] + 1);
}

/// The real-model study's problems (`bench/real_model_study.sh` makes them with these
/// arguments): SFT, RL and held-out share no question, compared as normalised text
/// read back from the files, and the held-out set has at least 500 problems.
#[test]
fn the_real_model_study_splits_share_no_question() {
    let args_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../bench/real_model/gen-data.args"
    );
    let args = std::fs::read_to_string(args_file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("gen-data")
        .args(args.split_whitespace())
        .arg("--output-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |name: &str| -> Vec<String> {
        let text = std::fs::read_to_string(dir.path().join(format!("{name}.jsonl"))).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                cal_core::data::normalize_question(v["question"].as_str().unwrap())
            })
            .collect()
    };
    let (sft, rl, test) = (read("sft"), read("rl"), read("test"));
    assert!(test.len() >= 500, "held-out: {} problems", test.len());
    let set = |v: &[String]| v.iter().cloned().collect::<std::collections::HashSet<_>>();
    let (s, r, t) = (set(&sft), set(&rl), set(&test));
    assert_eq!(
        s.len() + r.len() + t.len(),
        sft.len() + rl.len() + test.len()
    );
    assert_eq!(
        s.intersection(&t).count(),
        0,
        "SFT and held-out share questions"
    );
    assert_eq!(
        r.intersection(&t).count(),
        0,
        "RL and held-out share questions"
    );
    assert_eq!(s.intersection(&r).count(), 0, "SFT and RL share questions");
    // a bad split spec names itself
    let out = bin()
        .args(["gen-data", "--splits", "sft=10,sft=5", "--output-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`sft` is named twice"));
}

#[test]
fn gen_data_roundtrips_through_eval() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("gen.jsonl");
    let out = bin()
        .args(["gen-data", "--n", "50", "--seed", "3", "-o"])
        .arg(&ds)
        .output()
        .unwrap();
    assert!(out.status.success());
    // grading the generated reference solutions against themselves gives 100%
    let preds: String = std::fs::read_to_string(&ds)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}\n",
                serde_json::json!({"idx": v["idx"], "response": v["answer"]})
            )
        })
        .collect();
    let p = dir.path().join("p.jsonl");
    std::fs::write(&p, preds).unwrap();
    let out = bin()
        .args(["eval", "--predictions"])
        .arg(&p)
        .arg("--dataset")
        .arg(&ds)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("strict-match     100.00%  (50/50)"));
    // eval's names match train's (--eval-samples, --num-generations); the old spellings
    // still parse and say they are aliases
    let old = bin()
        .args([
            "eval",
            "--num-samples",
            "5",
            "--samples",
            "1",
            "--predictions",
        ])
        .arg(&p)
        .arg("--dataset")
        .arg(&ds)
        .output()
        .unwrap();
    assert!(
        old.status.success(),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let help = bin().args(["eval", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--eval-samples") && help.contains("[alias: --num-samples]"),
        "{help}"
    );
    assert!(
        help.contains("--num-generations") && help.contains("[alias: --samples]"),
        "{help}"
    );
}

/// Writes predictions for every row of `ds`: the reference solution, or for rows where
/// `wrong(i)` a response ending in a wrong answer; `k` rows per item.
fn predictions(
    ds: &std::path::Path,
    out: &std::path::Path,
    k: usize,
    wrong: impl Fn(usize, usize) -> bool,
) {
    let mut s = String::new();
    for (i, l) in std::fs::read_to_string(ds).unwrap().lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for j in 0..k {
            let response = if wrong(i, j) {
                "I think it is\n#### 123456789".to_string()
            } else {
                v["answer"].as_str().unwrap().to_string()
            };
            s.push_str(&format!(
                "{}\n",
                serde_json::json!({"idx": v["idx"], "response": response})
            ));
        }
    }
    std::fs::write(out, s).unwrap();
}

#[test]
fn compare_takes_two_predictions_reports_and_keeps_pass_at_k() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("gen.jsonl");
    assert!(bin()
        .args(["gen-data", "--n", "40", "--seed", "5", "-o"])
        .arg(&ds)
        .status()
        .unwrap()
        .success());
    let (pa, pb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    predictions(&ds, &pa, 1, |i, _| i % 2 == 0); // 50%
    predictions(&ds, &pb, 2, |i, j| i % 4 == 0 || j == 0); // first sample always wrong
    for (p, o) in [(&pa, "ra"), (&pb, "rb")] {
        let out = bin()
            .args(["eval", "--predictions"])
            .arg(p)
            .arg("--dataset")
            .arg(&ds)
            .arg("--output-dir")
            .arg(dir.path().join(o))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = bin()
        .arg("compare")
        .arg(dir.path().join("ra"))
        .arg(dir.path().join("rb/eval_results.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // per item, the comparison reads each report's first sample: a 50%, b 0%
    assert!(stdout.contains("| a | 50.00% | 20 / 40 |"), "{stdout}");
    assert!(stdout.contains("| b | 0.00% | 0 / 40 |"), "{stdout}");
    // b has two samples per item, right on the second for 3 items in 4: pass@2 = 75%
    assert!(stdout.contains("b: pass@2 75.00%"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("rb/eval_results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (report["samples"].as_u64(), report["pass_at_k"].as_f64()),
        (Some(2), Some(0.75))
    );
}

#[test]
fn random_model_of_a_config_generates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 256}"#,
    )
    .unwrap();
    let model = format!("random:{}", cfg.display());
    let out = bin()
        .args([
            "generate",
            "--model",
            &model,
            "--prompt",
            "Question: 2 + 3",
            "--greedy",
        ])
        .args(["--max-new-tokens", "4", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 4, "{text}");
    // a missing config is named
    let out = bin()
        .args([
            "generate",
            "--model",
            "random:/nonexistent/config.json",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/config.json"),
        "{err}"
    );
}

#[test]
fn print_config_round_trips_through_config() {
    let dir = tempfile::tempdir().unwrap();
    let printed = bin()
        .args([
            "train",
            "--print-config",
            "--use-cal",
            "--num-generations",
            "6",
            "--top-p",
            "0.9",
            "--loss-aggregation",
            "seq-mean-token-sum-norm",
            "--lora-rank",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let text = String::from_utf8_lossy(&printed.stdout).to_string();
    for want in [
        "[rollout]",
        "num-generations = 6",
        "top-p = 0.9",
        "mode = \"span\"",
        "[model.lora]",
        "alpha = 8.0",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let file = dir.path().join("run.toml");
    std::fs::write(&file, &text).unwrap();
    let again = bin()
        .args(["train", "--print-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);
    // an unknown key names the file and the key
    std::fs::write(&file, "[rollout]\nnum-generationz = 8\n").unwrap();
    let bad = bin()
        .args(["train", "--print-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("run.toml") && err.contains("num-generationz"),
        "{err}"
    );
}

#[test]
fn devices_and_dtypes_are_flags_with_clear_errors() {
    for cmd in [
        "train",
        "sft",
        "eval",
        "generate",
        "experiment",
        "bench",
        "oracle",
    ] {
        let help = bin().args([cmd, "--help"]).output().unwrap();
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            text.contains("--device") && text.contains("--dtype"),
            "{cmd}: {text}"
        );
    }
    let out = bin()
        .args([
            "generate", "--model", "tiny", "--prompt", "hi", "--device", "cuda:1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cuda:1") && err.contains("--features cuda") && !err.contains("panicked"),
        "{err}"
    );
    let out = bin()
        .args(["train", "--dtype", "bf16", "--steps", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bf16") && err.contains("cpu"),
        "{err}"
    );
    // defaults and configuration keys are in --help, taken from the configuration
    let help = bin().args(["train", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("[default: 64] [config: credit.max-error-span]"),
        "{text}"
    );
    assert!(
        text.contains("[default: 1e-4 for tiny, 1e-6 otherwise] [config: optim.learning-rate]"),
        "{text}"
    );
    // experiment's own defaults show in its help
    let help = bin().args(["experiment", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("[default: 960] [config: data.num-samples]"),
        "{text}"
    );
}

/// `experiment --jobs 2` trains the two arms in child processes, one thread each; the
/// numbers must be those of the arms one after another in one process. Also: a rerun
/// reuses the finished arms, and the first curve point is "before RL" itself.
#[test]
fn experiment_arms_in_parallel_processes_give_the_sequential_results() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = |jobs: &str, out: &str| {
        let o = bin()
            .env("CAL_GRPO_CACHE", &cache)
            .args([
                "experiment",
                "--sft-steps",
                "4",
                "--train-problems",
                "64",
                "--steps",
                "2",
                "--num-samples",
                "8",
                "--eval-samples",
                "6",
                "--prompts-per-step",
                "2",
                "--num-generations",
                "2",
                "--max-new-tokens",
                "24",
                "--eval-every",
                "1",
                "--jobs",
                jobs,
                "--output-dir",
            ])
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "--jobs {jobs}: {err}");
        err
    };
    run("1", "seq");
    let err = run("2", "par");
    assert!(err.contains("2 at a time, 1 thread(s) each"), "{err}");
    let read = |out: &str, arm: &str, file: &str| {
        std::fs::read_to_string(dir.path().join(out).join("seed-42").join(arm).join(file)).unwrap()
    };
    for arm in ["baseline", "cal"] {
        assert_eq!(
            read("seq", arm, "eval_examples.jsonl"),
            read("par", arm, "eval_examples.jsonl"),
            "{arm}: held-out responses differ"
        );
        // every logged number but the timings (step times, oracle latency)
        let numbers = |out: &str| -> Vec<Vec<(String, String)>> {
            read(out, arm, "metrics.jsonl")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object()
                        .unwrap()
                        .iter()
                        .filter(|(k, _)| {
                            !k.starts_with("perf/") && k.as_str() != "oracle/latency_ms"
                        })
                        .map(|(k, v)| (k.clone(), v.to_string()))
                        .collect()
                })
                .collect()
        };
        assert_eq!(numbers("seq"), numbers("par"), "{arm}: metrics differ");
        assert!(dir
            .path()
            .join("par/seed-42")
            .join(format!("{arm}.log"))
            .exists());
    }
    // step 0 of each curve is the "before RL" evaluation, taken from its report
    let before: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("par/before/eval_results.json")).unwrap(),
    )
    .unwrap();
    let first: serde_json::Value =
        serde_json::from_str(read("par", "cal", "metrics.jsonl").lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 0);
    assert_eq!(first["eval/accuracy"], before["accuracy"]["accuracy"]);
    // a rerun reuses both finished arms
    let err = run("2", "par");
    assert!(!err.contains("started"), "{err}");
    // the table across experiments reads both folders back: one row each, same numbers;
    // the curves of the two (identical) baselines are drawn once
    let curves = dir.path().join("curves.png");
    let out = bin()
        .arg("summarize")
        .arg(dir.path().join("seq"))
        .arg(dir.path().join("par"))
        .arg("--curves")
        .arg(&curves)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("/seq |") || l.contains("/par |"))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].contains("| 3 | 4 | 1 |"),
        "K 3, 4 SFT steps, 1 seed: {text}"
    );
    assert_eq!(
        rows[0].split_once(" | ").unwrap().1,
        rows[1].split_once(" | ").unwrap().1
    );
    assert!(text.contains("held-out curves written to"), "{text}");
    assert!(std::fs::read(&curves).unwrap().starts_with(b"\x89PNG"));
    // the noise map: each folder's own oracle over planted K = 3 chains, and the plot
    let labels = dir.path().join("planted.jsonl");
    let o = bin()
        .args([
            "plant-errors",
            "--dataset",
            "generated",
            "--chain-steps",
            "3",
        ])
        .args(["--n", "30", "--output"])
        .arg(&labels)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = dir.path().join("map.png");
    let out = bin()
        .arg("summarize")
        .arg(dir.path().join("seq"))
        .arg(dir.path().join("par"))
        .arg("--bench-labels")
        .arg(&labels)
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| calculator |"))
        .collect();
    assert_eq!(map.len(), 2, "{text}");
    // the calculator sees result slips only: a third of the planted errors at most
    let em: f64 = map[0]
        .split(" | ")
        .nth(1)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(em > 0.0 && em < 50.0, "{text}");
    assert_eq!(map[0].split(" | ").nth(1), map[1].split(" | ").nth(1));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // a folder that is not an experiment is named
    let out = bin().arg("summarize").arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("config.toml"),
        "{err}"
    );
}

#[test]
fn arms_still_start_when_the_program_file_is_replaced_during_the_experiment() {
    // a rebuild or `cargo install` while an experiment runs: the arms are started from
    // the running program itself, not from the path it was started by
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("cal-grpo");
    std::fs::copy(env!("CARGO_BIN_EXE_cal-grpo"), &exe).unwrap();
    let child = Command::new(&exe)
        .env("CAL_GRPO_CACHE", dir.path().join("cache"))
        .args(["experiment", "--sft-steps", "2", "--train-problems", "16"])
        .args(["--steps", "1", "--num-samples", "4", "--eval-samples", "2"])
        .args(["--prompts-per-step", "2", "--num-generations", "2"])
        .args(["--max-new-tokens", "8", "--jobs", "2", "--output-dir"])
        .arg(dir.path().join("out"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // spawn returns once the program runs; its file can go at once
    std::fs::remove_file(&exe).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("seed-42/cal: finished"), "{err}");
}

/// `generated`, `train`'s default dataset, is a dataset for `eval` too: its held-out
/// problems, named as such.
#[test]
fn eval_accepts_the_generated_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let o = bin()
        .args(["eval", "--dataset", "generated", "--eval-samples", "3"])
        .args(["--max-new-tokens", "4", "--model"])
        .arg(&model)
        .arg("--output-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("the embedded chain problems, held-out: 3 problems graded"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("eval_results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r["accuracy"]["total"], 3);
}

#[test]
fn sft_reads_the_run_configuration_and_exports_a_loadable_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let cfg = dir.path().join("sft.toml");
    // the file sets the recipe, a flag overrides one key of it
    std::fs::write(
        &cfg,
        "[sft]\nsteps = 3\nbatch-size = 2\nmicro-batch-tokens = 0\n",
    )
    .unwrap();
    let out = dir.path().join("model");
    let printed = bin()
        .args(["sft", "--print-config", "--config"])
        .arg(&cfg)
        .args(["--steps", "2", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    assert!(
        text.contains("[sft]\nsteps = 2\nbatch-size = 2\n"),
        "{text}"
    );
    let run = bin()
        .args(["sft", "--config"])
        .arg(&cfg)
        .args([
            "--steps",
            "2",
            "--num-samples",
            "4",
            "--lora-rank",
            "2",
            "--model",
        ])
        .arg(&model)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.starts_with("SFT 2 steps: loss "), "{stdout}");
    // the export loads back and answers
    let gen = bin()
        .args(["generate", "--greedy", "--prompt", "1 + 1 =", "--model"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
}

#[test]
fn lora_run_writes_a_peft_adapter_that_export_merges_into_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let run = dir.path().join("run");
    let out = bin()
        .env("CAL_GRPO_CACHE", dir.path().join("cache"))
        .arg("train")
        .arg("--model")
        .arg(&base)
        .args([
            "--lora-rank",
            "2",
            "--lora-targets",
            "q_proj,v_proj",
            "--learning-rate",
            "1e-2",
            "--steps",
            "1",
            "--num-samples",
            "2",
            "--eval-samples",
            "2",
            "--prompts-per-step",
            "1",
            "--num-generations",
            "2",
            "--max-new-tokens",
            "8",
            "--output-dir",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(2), Some(4.0))
    );
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // base + adapter, merged by `export`, is the run's own merged model to the bit
    let merged = dir.path().join("merged");
    let out = bin()
        .arg("export")
        .arg("--model")
        .arg(&base)
        .arg("--adapter")
        .arg(run.join("adapter"))
        .arg("--output-dir")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    assert!(
        bytes(merged.join("model.safetensors")) == bytes(run.join("model/model.safetensors")),
        "export --adapter differs from the run's merged model"
    );
    // a folder that holds a model is not overwritten
    let again = bin()
        .args(["export", "--model"])
        .arg(&base)
        .arg("--output-dir")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a model"));
}

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh --with-model"]
fn export_turns_the_smollm2_gguf_into_a_folder_that_answers_the_same() {
    let gguf = cal_core::assets::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let run = bin()
        .args(["export", "--model"])
        .arg(&gguf)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(mode(f), mode("config.json"), "{f}");
    }
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(
        tc["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("im_start")),
        "{tc}"
    );
    // the folder and the GGUF give the same greedy chat answer, token for token
    let answer = |model: &std::path::Path| {
        let o = bin()
            .args([
                "generate",
                "--chat",
                "--greedy",
                "--json",
                "--max-new-tokens",
                "12",
            ])
            .args(["--prompt", "What is 12 + 7?", "--model"])
            .arg(model)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v["prompt_ids"].clone(), v["ids"].clone())
    };
    assert_eq!(answer(&out), answer(&gguf));
}

/// The sets as they ship: each graded against answers read from its raw rows here (not
/// by the loader), so a row the loader drops or misreads shows.
#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh"]
fn every_word_problem_set_loads_as_it_ships_and_grades_its_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    // (spec name, file, usable rows as counted from the raw files)
    for (name, file, rows) in [
        ("asdiv", "asdiv/test.jsonl", 2084),
        ("svamp", "svamp/test.jsonl", 1000),
        ("mawps", "mawps/test.jsonl", 2065),
        ("gsm-hard", "gsm_hard/test.jsonl", 1319),
    ] {
        let path = cal_core::assets::asset(file);
        let mut preds = String::new();
        for (i, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let answer = match name {
                "asdiv" => {
                    let a = row["answer"].as_str().unwrap();
                    let head = a.split(" (").next().unwrap().trim().to_string();
                    if head.parse::<f64>().is_err() {
                        continue;
                    }
                    head
                }
                "svamp" => row["Answer"].as_f64().unwrap().to_string(),
                _ => row["target"].as_f64().unwrap().to_string(),
            };
            let idx = row["idx"].as_u64().unwrap_or(i as u64);
            preds.push_str(&format!(
                "{}\n",
                serde_json::json!({"idx": idx, "response": format!("So it is {answer}.")})
            ));
        }
        let p = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&p, preds).unwrap();
        let out = bin()
            .args(["eval", "--predictions"])
            .arg(&p)
            .arg("--dataset")
            .arg(format!("{name}:{}", path.display()))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = format!("flexible-extract 100.00%  ({rows}/{rows})");
        assert!(stdout.contains(&want), "{name}: {stdout}");
        // recognised by its fields without the name, too
        let plain = bin()
            .args(["eval", "--predictions"])
            .arg(&p)
            .arg("--dataset")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&plain.stdout).contains(&want),
            "{name} unnamed"
        );
    }
}

/// `eval --model GGUF --dataset asdiv:PATH` with the prompt from a `--config` file: the
/// configuration prints it, the report records it, and `compare` warns against a report
/// made with another prompt.
#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh --with-model"]
fn eval_grades_asdiv_with_the_prompt_of_the_configuration() {
    let gguf = cal_core::assets::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let asdiv = format!(
        "asdiv:{}",
        cal_core::assets::asset("asdiv/test.jsonl").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prompt.toml");
    std::fs::write(
        &cfg,
        "[data]\nsystem-prompt = \"You check every sum.\"\nfew-shot = 2\nprompt-template = \"Problem: {{ question }}\\n{{ instruction }}\"\n",
    )
    .unwrap();
    let eval = |extra: &[&str], out: &str| {
        let o = bin()
            .args(["eval", "--model"])
            .arg(&gguf)
            .args([
                "--dataset",
                &asdiv,
                "--eval-samples",
                "2",
                "--max-new-tokens",
                "8",
            ])
            .arg("--output-dir")
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let printed = eval(
        &["--config", cfg.to_str().unwrap(), "--print-config"],
        "unused",
    );
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(
        text.contains("system-prompt = \"You check every sum.\"") && text.contains("few-shot = 2"),
        "{text}"
    );
    let o = eval(&["--config", cfg.to_str().unwrap()], "a");
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("asdiv, held-out 30% (seed 0): 2 problems graded"));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("a/eval_results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["prompt"]["system"], "You check every sum.");
    assert_eq!(report["prompt"]["shots"].as_array().unwrap().len(), 2);
    assert!(report["dataset"].as_str().unwrap().contains("held-out 30%"));
    let first = report["examples"][0]["question"]
        .as_str()
        .unwrap()
        .to_string();
    // the shots come from the train part, never the graded problems
    for s in report["prompt"]["shots"].as_array().unwrap() {
        assert_ne!(s["question"].as_str().unwrap(), first);
    }
    eval(&[], "b");
    let c = bin()
        .arg("compare")
        .arg(dir.path().join("a"))
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(
        err.contains("different prompts (template, system prompt, few-shot examples)"),
        "{err}"
    );
}

#[test]
fn generate_shows_the_prompt_the_run_would_use() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("mini.jsonl");
    std::fs::write(
        &set,
        (0..10)
            .map(|i| format!("{{\"body\":\"Ann has {i} pens and gets 2 more.\",\"question\":\"How many pens?\",\"answer\":\"{} (pens)\",\"formula\":\"{i}+2={}\"}}\n", i + 2, i + 2))
            .collect::<String>(),
    )
    .unwrap();
    let o = bin()
        .args([
            "generate",
            "--model",
            "random:../../bench/configs/smollm2-135m.json",
        ])
        .args(["--question", "Bo has 4 cups. How many?", "--show-prompt"])
        .args(["--few-shot", "2", "--system-prompt", "Be exact."])
        .arg("--dataset")
        .arg(format!("asdiv:{}", set.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("Be exact.\n\nQuestion: Ann has "),
        "{text}"
    );
    assert_eq!(text.matches("Question: ").count(), 3, "{text}");
    assert!(
        text.contains("pens and gets 2 more. How many pens?\nAnswer: "),
        "{text}"
    );
    assert!(
        text.trim_end()
            .ends_with("Question: Bo has 4 cups. How many?\nAnswer:"),
        "{text}"
    );
    // few-shot without a set to draw from is a clear error
    let o = bin()
        .args([
            "generate",
            "--model",
            "random:../../bench/configs/smollm2-135m.json",
        ])
        .args(["--question", "q", "--show-prompt", "--few-shot", "1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--few-shot needs --dataset"));
}

/// The default prompt is token for token the one runs used before prompts could be set:
/// for a chat model, the question and the instruction as one user turn of its template.
#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh --with-model"]
fn the_default_chat_prompt_is_one_user_turn_of_question_and_instruction() {
    let gguf = cal_core::assets::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let q = "Ann has 3 pens and buys 4 more. How many pens does she have?";
    let ids = |args: &[&str]| {
        let o = bin()
            .args([
                "generate",
                "--greedy",
                "--json",
                "--max-new-tokens",
                "1",
                "--model",
            ])
            .arg(&gguf)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["prompt_ids"].clone()
    };
    let by_hand = format!("{q}\n{}", cal_train::prompt::DEFAULT_INSTRUCTION);
    assert_eq!(
        ids(&["--question", q]),
        ids(&["--chat", "--prompt", &by_hand])
    );
}

/// `plant-errors` on the embedded chains, then `oracle-bench` with both offline oracles:
/// the calculator finds every result slip and none of the true-arithmetic errors (a
/// misread operand, a wrong operation), the reference oracle finds those too; the JSON
/// carries the documented fields as fractions.
#[test]
fn oracle_bench_measures_the_offline_oracles_on_planted_errors() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.jsonl");
    let o = bin()
        .args([
            "plant-errors",
            "--dataset",
            "generated",
            "--n",
            "60",
            "--output",
        ])
        .arg(&labels)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .starts_with("60 responses with a planted error and 15 correct ones"));
    let bench = |provider: &str| {
        let out = dir.path().join(format!("{provider}.json"));
        let o = bin()
            .args(["oracle-bench", "--api-provider", provider, "--labels"])
            .arg(&labels)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("exact match of the first error"));
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let calc = bench("calculator");
    for f in [
        "n",
        "located",
        "exact_match",
        "overlap_precision",
        "overlap_recall",
        "false_alarm",
    ] {
        assert!(calc.get(f).is_some(), "{f} missing: {calc}");
    }
    assert_eq!(calc["n"], 75);
    assert_eq!(calc["by_kind"]["result"]["exact_match"], 1.0);
    assert_eq!(calc["by_kind"]["operand"]["located"], 0.0);
    assert_eq!(calc["false_alarm"], 0.0);
    let reference = bench("reference");
    let (r, c) = (
        reference["exact_match"].as_f64().unwrap(),
        calc["exact_match"].as_f64().unwrap(),
    );
    assert!(r > 0.8 && c < 0.5, "reference {r}, calculator {c}");
    // a degraded judge: every span dropped; the flag is a configuration key too
    let o = bin()
        .args([
            "oracle-bench",
            "--api-provider",
            "reference",
            "--oracle-noise",
            "miss=1",
            "--labels",
        ])
        .arg(&labels)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("noise(miss=1")
            && table.contains("located                                0.0%"),
        "{table}"
    );
    let cfg = bin()
        .args([
            "train",
            "--oracle-noise",
            "shift=0.25,seed=3",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&cfg.stdout).contains("noise = \"shift=0.25,seed=3\""));
    let bad = bin()
        .args([
            "oracle-bench",
            "--api-provider",
            "reference",
            "--oracle-noise",
            "miss=0.7,shift=0.7",
            "--labels",
        ])
        .arg(&labels)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at most 1"));
    // a label that is not in its response names its line
    std::fs::write(
        &labels,
        "{\"question\":\"q\",\"reference\":\"r\",\"response\":\"1 + 1 = 3\",\"first_error\":null}\n{\"question\":\"q\",\"reference\":\"r\",\"response\":\"1 + 1 = 3\",\"first_error\":\"2 + 2\"}\n",
    )
    .unwrap();
    let o = bin()
        .args(["oracle-bench", "--api-provider", "calculator", "--labels"])
        .arg(&labels)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("labels.jsonl:2: `first_error` is not a substring"));
}

/// `plant-errors` → `make-pairs` → `dpo` on a small Qwen2 folder: the pairs differ only
/// from the planted error on, the run writes TRL's metric names, a checkpoint, the
/// export and the adapter, resumes, and a bad row is named by file, line and field.
#[test]
fn dpo_trains_on_pairs_that_make_pairs_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    ok(bin()
        .args(["plant-errors", "--dataset", "generated", "--n", "24"])
        .args(["--correct-share", "0.2", "-o"])
        .arg(d.join("labels.jsonl"))
        .output()
        .unwrap());
    ok(bin()
        .args(["make-pairs", "--labels"])
        .arg(d.join("labels.jsonl"))
        .arg("-o")
        .arg(d.join("pairs.jsonl"))
        .output()
        .unwrap());
    let text = std::fs::read_to_string(d.join("pairs.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 24, "one pair per wrong response");
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let (c, r) = (
            row["chosen"].as_str().unwrap(),
            row["rejected"].as_str().unwrap(),
        );
        let at = row["first_error_start"].as_u64().unwrap() as usize;
        assert!(!c.contains("<<"), "notes left in the chosen answer: {c}");
        let prefix = |s: &str| s.chars().take(at).collect::<String>();
        assert_eq!(
            prefix(c),
            prefix(r),
            "answers part before the error: {line}"
        );
        assert_ne!(c, r);
    }
    let run = |extra: &[&str]| {
        bin()
            .args(["dpo", "--model"])
            .arg(&model)
            .arg("--dataset")
            .arg(d.join("pairs.jsonl"))
            .args(["--steps", "4", "--batch-size", "4", "--eval-pairs", "8"])
            .args(["--lora-rank", "2", "--pair-credit", "first-error"])
            .args([
                "--learning-rate",
                "1e-3",
                "--save-every",
                "2",
                "--output-dir",
            ])
            .arg(d.join("run"))
            .args(extra)
            .output()
            .unwrap()
    };
    let stdout = ok(run(&[]));
    assert!(stdout.contains("held-out pair accuracy"), "{stdout}");
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    for name in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "eval/rewards/accuracies",
    ] {
        assert!(
            metrics.contains(&format!("\"{name}\"")),
            "{name}: {metrics}"
        );
    }
    assert!(d.join("run/adapter/adapter_config.json").exists());
    assert!(d.join("run/model.safetensors").exists());
    // a finished run resumed is a no-op that still exports
    ok(run(&["--resume"]));
    // a row without `rejected` is named by file, line and field
    let bad = d.join("bad.jsonl");
    let first = text.lines().next().unwrap();
    std::fs::write(
        &bad,
        format!("{first}\n{{\"prompt\": \"q\", \"chosen\": \"a\"}}\n"),
    )
    .unwrap();
    let out = bin()
        .args(["dpo", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.jsonl:2") && err.contains("rejected"),
        "{err}"
    );
    // without a model it says what it needs
    let out = bin().args(["dpo"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--model"), "{err}");
}

/// `distill` end to end on a small Qwen2 folder: a student of the teacher's layers (the
/// attention strategy) and a random-weight student (logit) train, log the KL to the
/// teacher and export a loadable folder; bad students and teachers are named.
#[test]
fn distill_trains_students_and_names_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let teacher = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let distill = |extra: &[&str]| {
        bin()
            .args(["distill", "--teacher"])
            .arg(&teacher)
            .args([
                "--dataset",
                "generated",
                "--num-samples",
                "32",
                "--steps",
                "3",
            ])
            .args([
                "--batch-size",
                "4",
                "--eval-every",
                "3",
                "--eval-samples",
                "4",
            ])
            .args(["--max-new-tokens", "4"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let run = d.join("layers");
    let stdout = ok(distill(&[
        "--student-layers",
        "1",
        "--strategy",
        "attention",
        "--output-dir",
        run.to_str().unwrap(),
    ]));
    assert!(stdout.contains("student exported to"), "{stdout}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for key in ["\"distill/kl\"", "\"distill/loss\"", "\"eval/distill/kl\""] {
        assert!(metrics.contains(key), "{key}: {metrics}");
    }
    let gen = bin()
        .args([
            "generate", "--greedy", "--json", "--prompt", "1 + 1 =", "--model",
        ])
        .arg(&run)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(ok(gen).trim()).unwrap();
    assert_eq!(
        v["ids"].as_array().unwrap().len(),
        v["logprobs"].as_array().unwrap().len()
    );
    // a random-weight student of the teacher's vocabulary
    let cfg = d.join("student.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(teacher.join("config.json")).unwrap())
            .unwrap();
    c["num_hidden_layers"] = 1.into();
    c["hidden_size"] = 32.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let random = format!("random:{}", cfg.display());
    ok(distill(&[
        "--student",
        &random,
        "--output-dir",
        d.join("random").to_str().unwrap(),
    ]));
    // the wrong vocabulary size, a layer out of range, a teacher that does not load
    c["vocab_size"] = 77.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let bad = [
        (vec!["--student", random.as_str()], "logits per token"),
        (vec!["--student-layers", "0,2"], "--student-layers"),
        (
            vec![
                "--student-layers",
                "0",
                "--strategy",
                "feature",
                "--layer-map",
                "0:9",
            ],
            "--layer-map",
        ),
    ];
    for (args, want) in bad {
        let out = distill(
            &[
                args.as_slice(),
                &["--output-dir", d.join("bad").to_str().unwrap()],
            ]
            .concat(),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    let out = bin()
        .args([
            "distill",
            "--teacher",
            "/nonexistent/model",
            "--student-layers",
            "0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--teacher /nonexistent/model"),
        "{err}"
    );
}

/// QLoRA from the command line: an SFT run and an evaluation with the base quantized,
/// and a quantized base without adapters refused with the flag it needs.
#[test]
fn sft_and_eval_run_with_a_quantized_base() {
    let dir = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let sft = |extra: &[&str]| {
        bin()
            .args([
                "sft",
                "--dataset",
                "generated",
                "--num-samples",
                "8",
                "--steps",
                "2",
            ])
            .args(["--batch-size", "2", "--quantize-base", "q4_0", "--model"])
            .arg(&model)
            .arg("--output-dir")
            .arg(dir.path().join("sft"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = sft(&["--lora-rank", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("sft/model.safetensors").exists());
    let out = bin()
        .args([
            "eval",
            "--dataset",
            "generated",
            "--eval-samples",
            "2",
            "--max-new-tokens",
            "4",
        ])
        .args(["--quantize-base", "q8_0", "--model"])
        .arg(dir.path().join("sft"))
        .arg("--output-dir")
        .arg(dir.path().join("eval"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sft(&["--overwrite"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--lora-rank"),
        "{err}"
    );
}

/// `export --quantize-base`: the base a QLoRA adapter was trained over, its layers'
/// weights quantized and written back dequantized (within the format's rounding of the
/// original), the embedding at 8 bits, the norms as they were.
#[test]
fn export_writes_the_quantized_base_dequantized() {
    let dir = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cal-model/tests/fixtures/qwen2-tiny");
    let export = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let o = bin()
            .args(["export", "--model"])
            .arg(&model)
            .args(extra)
            .arg("--output-dir")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (f32w, q4) = (
        export("f32", &[]),
        export("q4", &["--quantize-base", "q4_0"]),
    );
    let diff = |k: &str| {
        (&f32w[k] - &q4[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let proj = "model.layers.0.self_attn.q_proj.weight";
    let scale = f32w[proj]
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let (d, s) = (diff(proj), scale.to_scalar::<f32>().unwrap());
    assert!(
        d > 0.0 && d <= s / 7.0,
        "q4_0 rounding of {proj}: {d} (largest weight {s})"
    );
    let embed = "model.embed_tokens.weight";
    let scale = f32w[embed].abs().unwrap().max_all().unwrap();
    let (d, s) = (diff(embed), scale.to_scalar::<f32>().unwrap());
    assert!(
        d > 0.0 && d <= s / 100.0,
        "Q8_0 rounding of {embed}: {d} (largest weight {s})"
    );
    assert_eq!(diff("model.norm.weight"), 0.0);
}
