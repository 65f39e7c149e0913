//! `cal-grpo dpo`'s trainer on a small untrained policy: it learns the training pairs
//! (the margin between chosen and rejected grows), logs TRL's metrics and a held-out
//! pair accuracy, first-error credit sums only the differing step, and a run killed
//! after a checkpoint resumes to the uninterrupted run's weights and logs.

mod common;

use cal_core::data::preference::{PreferencePair, Turns};
use cal_train::config::RunConfig;
use cal_train::dpo::{tokenize_pairs, DpoRun, TokenPair};
use cal_train::preference::{PairCredit, PrefLoss};
use cal_train::rundir::Start;
use common::{examples, policy};
use std::path::Path;

/// Pairs from generated problems: the reference solution chosen; rejected, the same
/// solution with its first step's result off by one and carried forward.
fn pairs(n: usize) -> Vec<PreferencePair> {
    examples(n)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let first = e.answer.lines().next().unwrap().to_string();
            let result = first.rsplit(' ').next().unwrap().to_string();
            let wrong = (result.parse::<i64>().unwrap_or(0) + 1).to_string();
            let rejected = e.answer.replace(&result, &wrong);
            PreferencePair {
                prompt: Turns::Text(format!("Question: {}\nAnswer:", e.question)),
                chosen: Turns::Text(e.answer.clone()),
                rejected: Turns::Text(rejected),
                first_error_start: None,
                line: i + 1,
            }
        })
        .filter(|p| p.chosen != p.rejected)
        .collect()
}

fn config(loss: PrefLoss) -> RunConfig {
    let mut c = RunConfig::default();
    c.dpo.steps = 8;
    c.dpo.batch_size = 3;
    c.dpo.learning_rate = 3e-3;
    c.dpo.loss = loss;
    c.dpo.micro_batch_tokens = 200; // several micro-batches per step
    c.run.seed = 5;
    c
}

fn tokenized(credit: PairCredit) -> (Vec<TokenPair>, Vec<TokenPair>) {
    let p = policy(3);
    let all = pairs(14);
    let (t, _) = tokenize_pairs(&p, &all, credit, 1024, 512).unwrap();
    (t[..10].to_vec(), t[10..].to_vec())
}

fn run_in(dir: &Path, loss: PrefLoss, start: Start) -> DpoRun {
    let (train, held) = tokenized(PairCredit::Full);
    DpoRun::new(dir, &config(loss), policy(3), train, held, 2, 4, start).unwrap()
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("perf/step_seconds");
            v
        })
        .collect()
}

#[test]
fn each_loss_learns_the_training_pairs_and_logs_trls_metrics() {
    for loss in [PrefLoss::Sigmoid, PrefLoss::Ipo, PrefLoss::Orpo] {
        let dir = tempfile::tempdir().unwrap();
        let mut r = run_in(dir.path(), loss, Start::Fresh);
        r.run().unwrap();
        let rows = rows(dir.path());
        let train: Vec<&serde_json::Value> =
            rows.iter().filter(|v| v.get("loss").is_some()).collect();
        assert_eq!(train.len(), 8, "{loss:?}");
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(train[0].get(key).is_some(), "{loss:?}: no {key}");
        }
        let first = train[0]["loss"].as_f64().unwrap();
        let last = train[7]["loss"].as_f64().unwrap();
        assert!(last < first, "{loss:?}: loss {first} → {last}");
        // the held-out pair accuracy at the start, every 4 steps and at the end
        let evals: Vec<u64> = rows
            .iter()
            .filter(|v| v.get("eval/rewards/accuracies").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(evals, vec![0, 4, 8], "{loss:?}");
    }
}

#[test]
fn first_error_credit_sums_only_the_differing_step() {
    let (full, _) = tokenized(PairCredit::Full);
    let (step, _) = tokenized(PairCredit::FirstError);
    for (f, s) in full.iter().zip(&step) {
        assert_eq!(
            (&f.prompt, &f.chosen, &f.rejected),
            (&s.prompt, &s.chosen, &s.rejected)
        );
        assert_eq!(f.rejected_span, 0..f.rejected.len());
        // the first line: shorter than the answer, ends before the carried-forward rest
        assert!(s.rejected_span.len() < f.rejected_span.len(), "{s:?}");
        assert!(s.chosen_span.len() < f.chosen_span.len(), "{s:?}");
        // the answers agree before the span
        assert_eq!(
            s.chosen[..s.chosen_span.start],
            s.rejected[..s.rejected_span.start]
        );
    }
}

#[test]
fn dpo_resumes_bit_exact_after_a_kill() {
    let a = tempfile::tempdir().unwrap();
    let mut r = run_in(a.path(), PrefLoss::Sigmoid, Start::Fresh);
    r.run().unwrap();
    let want: Vec<Vec<u32>> = r
        .policy
        .model
        .params
        .values()
        .map(|t| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    drop(r);
    // killed after step 5 (its last checkpoint is step 4's)
    let b = tempfile::tempdir().unwrap();
    let mut r = run_in(b.path(), PrefLoss::Sigmoid, Start::Fresh);
    r.evaluate_held_out().unwrap();
    for _ in 0..5 {
        r.train_step().unwrap();
    }
    drop(r);
    let mut r = run_in(b.path(), PrefLoss::Sigmoid, Start::Resume);
    assert_eq!(r.lp.step, 4);
    r.run().unwrap();
    let got: Vec<Vec<u32>> = r
        .policy
        .model
        .params
        .values()
        .map(|t| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    assert!(want == got, "weights differ after resume");
    assert_eq!(rows(a.path()), rows(b.path()));
}

#[test]
fn the_pair_loss_gradient_through_the_model_matches_finite_differences() {
    use cal_model::{Forward, Transformer};
    use candle_core::{DType, Device};
    let p = policy(3);
    let (pairs, _) = tokenized(PairCredit::FirstError);
    let pair = &pairs[0];
    for loss in [PrefLoss::Sigmoid, PrefLoss::Ipo, PrefLoss::Orpo] {
        let mut model =
            Transformer::init_random(p.model.cfg.clone(), 9, DType::F64, &Device::Cpu).unwrap();
        let vars = model
            .make_trainable(|n| n.ends_with("mlp.up_proj.weight"))
            .unwrap();
        let cfg = cal_train::dpo::DpoConfig {
            loss,
            ..cal_train::dpo::DpoConfig::of_run(&config(loss))
        };
        let refs = [[-30.0, -28.0]];
        let eval = |m: &Transformer| {
            let (out, _) = cal_train::dpo::pairs_loss(
                m,
                Forward::INFERENCE,
                &[pair],
                &refs,
                &cfg,
                p.tok.pad_id,
                1.0,
                pair.chosen_span.len() as f64,
            )
            .unwrap();
            out.loss
        };
        let loss_t = eval(&model);
        let grads = loss_t.backward().unwrap();
        let (name, var) = &vars[0];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().shape().clone();
        // the three largest-gradient entries
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in &idx[..3] {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&candle_core::Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                eval(&model).to_scalar::<f64>().unwrap()
            };
            let fd = (at(1e-5) - at(-1e-5)) / 2e-5;
            var.set(
                &candle_core::Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu).unwrap(),
            )
            .unwrap();
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + g[i].abs()),
                "{loss:?} {name}[{i}]: fd {fd} vs {}",
                g[i]
            );
        }
        let _ = &mut model;
    }
}
