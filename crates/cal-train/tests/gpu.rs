//! Training on the device-generic path: a GRPO step, an SFT step, and a checkpoint
//! that resumes, in bf16 with f32 master weights.
//!
//! The `portable_*` tests run them on the CPU with this build's own kernels switched off
//! (the ops a GPU runs) in every `cargo test`. The `cuda_*` tests are the GPU group:
//! compiled with `--features cuda` (`scripts/build-cuda.sh`), listed as ignored
//! otherwise; a CUDA build without a device fails them unless
//! `CAL_GRPO_SKIP_CUDA=1` skips them.

mod common;

use cal_core::credit::CreditMode;
use cal_core::data::Example;
use cal_core::reward::RewardFns;
use cal_train::config::RunConfig;
use cal_train::policy::Policy;
use cal_train::sft::{sft, SftConfig};
use cal_train::trainer::Trainer;
use candle_core::{DType, Device};
use common::{examples, policy, Digits};
use std::path::Path;

fn config(dir: &Path, lora: bool) -> RunConfig {
    let mut c = RunConfig::default();
    if lora {
        c.model.lora.rank = 2;
        c.model.lora.alpha = Some(4.0);
        c.model.lora.dropout = 0.1;
        c.model.lora.targets = vec!["q_proj".into(), "v_proj".into()];
    }
    c.run.steps = Some(4);
    c.run.seed = 5;
    c.run.micro_batch = 2;
    c.run.output_dir = Some(dir.to_path_buf());
    c.rollout.prompts_per_step = 2;
    c.rollout.num_generations = 2;
    c.rollout.max_new_tokens = 12;
    c.rollout.generation_batch = 16;
    c.credit.mode = CreditMode::Span;
    c.loss.beta = 0.04;
    c.optim.lr = 1e-3;
    c.checkpoint.save_every = 2;
    c.oracle.cache = None;
    c
}

fn trainer(dir: &Path, lora: bool, p: Policy, data: &[Example], resume: bool) -> Trainer {
    let rewards = RewardFns {
        fns: vec![(Box::new(Digits), 1.0)],
    };
    Trainer::new(config(dir, lora), p, data.to_vec(), resume)
        .unwrap()
        .with_rewards(rewards)
}

/// The common test policy on `dev`, computing in `dtype`.
fn policy_on(dev: &Device, dtype: DType) -> Policy {
    let p = policy(3);
    let model = p.model.to_device(dev).unwrap().with_compute_dtype(dtype);
    Policy { model, ..p }
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.trainable()
        .into_iter()
        .map(|(k, v)| {
            let v = v.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (k, v.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// GRPO steps in `dtype` on `dev` (full or LoRA): f32 master weights that move, finite losses, and a
/// checkpoint that resumes on `dev` and on the CPU. `exact`: the resumed run must match
/// the uninterrupted one bit for bit (the CPU), else to `1e-4` (CUDA's atomics reorder
/// sums).
fn check_grpo(dev: &Device, dtype: DType, exact: bool, lora: bool) {
    let data: Vec<Example> = examples(16);
    let a = tempfile::tempdir().unwrap();
    let mut t = trainer(a.path(), lora, policy_on(dev, dtype), &data, false);
    let before = weights(&t);
    assert!(t
        .trainable()
        .iter()
        .all(|(_, v)| v.dtype() == DType::F32 && v.device().same_device(dev)));
    t.run().unwrap();
    let after = weights(&t);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|((_, x), (_, y))| x != y)
        .count();
    assert!(
        moved > before.len() / 2,
        "only {moved} of {} tensors moved",
        before.len()
    );
    let log = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(l) = v.get("loss/total").and_then(|x| x.as_f64()) {
            assert!(l.is_finite(), "loss {l} at step {}", v["step"]);
        }
    }
    // Killed after the step-2 checkpoint, resumed on the same device.
    let b = tempfile::tempdir().unwrap();
    let mut t = trainer(b.path(), lora, policy_on(dev, dtype), &data, false);
    t.train_step().unwrap();
    t.train_step().unwrap();
    t.save().unwrap();
    drop(t);
    let mut t = trainer(b.path(), lora, policy_on(dev, dtype), &data, true);
    assert_eq!(t.step, 2);
    t.run().unwrap();
    for ((k, x), (_, y)) in after.iter().zip(&weights(&t)) {
        let d = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        if exact {
            assert_eq!(d, 0.0, "{k} differs after resume");
        } else {
            assert!(d < 1e-4, "{k} differs by {d} after resume");
        }
    }
    // The same checkpoint resumes on the CPU (f32) too.
    let c = tempfile::tempdir().unwrap();
    copy_dir(b.path(), c.path());
    assert!(
        !c.path().join(cal_train::rundir::LOCK_FILE).exists(),
        "a copied run folder must not carry the other run's lock"
    );
    std::fs::remove_file(c.path().join("metrics.jsonl")).ok();
    let mut cpu_cfg = config(c.path(), lora);
    cpu_cfg.run.steps = Some(3);
    let t = Trainer::new(cpu_cfg, policy_on(&Device::Cpu, DType::F32), data, true);
    let t = t.unwrap();
    assert!(t.step >= 2);
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_dir(&e.path(), &dst);
        } else if e.file_name() != cal_train::rundir::LOCK_FILE {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// SFT in `dtype` on `dev`: the loss falls on a handful of examples.
fn check_sft(dev: &Device, dtype: DType) {
    let mut p = policy_on(dev, dtype);
    let cfg = SftConfig {
        steps: 30,
        batch_size: 4,
        optim: cal_train::adamw::OptimConfig {
            lr: 3e-3,
            ..Default::default()
        },
        seed: 1,
        micro_batch_tokens: 0,
    };
    let r = sft(&mut p, &examples(4), &cfg, |_| true).unwrap();
    assert!(
        r.last_loss < 0.8 * r.first_loss,
        "SFT loss {} -> {}",
        r.first_loss,
        r.last_loss
    );
}

#[test]
fn portable_bf16_grpo_trains_and_resumes() {
    cal_model::device::portable(|| check_grpo(&Device::Cpu, DType::BF16, true, false));
}

#[test]
fn portable_bf16_lora_trains_and_resumes() {
    cal_model::device::portable(|| check_grpo(&Device::Cpu, DType::BF16, true, true));
}

#[test]
fn portable_bf16_sft_lowers_the_loss() {
    cal_model::device::portable(|| check_sft(&Device::Cpu, DType::BF16));
}

fn cuda() -> Option<Device> {
    cal_model::device::cuda_for_tests()
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_bf16_grpo_trains_and_resumes() {
    if let Some(d) = cuda() {
        check_grpo(&d, DType::BF16, false, false);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_f32_grpo_trains_and_resumes() {
    if let Some(d) = cuda() {
        check_grpo(&d, DType::F32, false, false);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_bf16_lora_trains_and_resumes() {
    if let Some(d) = cuda() {
        check_grpo(&d, DType::BF16, false, true);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_bf16_sft_lowers_the_loss() {
    if let Some(d) = cuda() {
        check_sft(&d, DType::BF16);
    }
}
