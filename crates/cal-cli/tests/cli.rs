//! End-to-end tests of the `cal-grpo` binary.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cal-grpo"))
}

fn asset(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets")
        .join(rel);
    if p.exists() {
        Some(p)
    } else if std::env::var("CAL_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("{} is missing; run scripts/fetch-assets.sh", p.display());
    } else {
        eprintln!("skipping: {} not fetched", p.display());
        None
    }
}

#[test]
fn eval_reference_answers_on_real_gsm8k_is_100_percent() {
    let Some(test) = asset("gsm8k/test.jsonl") else {
        return;
    };
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
            "--response",
        ])
        .arg(&resp)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"]["outcome"], "located");
    assert_eq!(v["outcome"]["segment"], "3 * 6 = 16");
    assert_eq!(v["outcome"]["located"]["start"], 10);
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
}
