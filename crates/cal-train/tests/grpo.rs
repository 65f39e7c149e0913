//! The training loop on a small untrained `tiny`-style policy: where gradients land in
//! each credit mode, all-wrong groups, and bit-exact kill-and-resume.

mod common;

use cal_core::credit::CreditMode;
use cal_core::data::Example;
use cal_core::reward::RewardFns;
use cal_model::generate::{
    build_batch, completion_logprobs, decode_with_offsets, FinishReason, Generation,
};
use cal_model::Forward;
use cal_train::algorithm::ppo::{CriticKind, KlPlacement};
use cal_train::algorithm::AlgorithmKind;
use cal_train::config::{RunConfig, Switch};
use cal_train::loss::{policy_loss, Aggregation, Importance, LossConfig};
use cal_train::policy::Policy;
use cal_train::rollout::Rollouts;
use cal_train::trainer::Trainer;
use candle_core::{Device, Tensor, Var};
use common::{examples, policy};
use std::path::{Path, PathBuf};

fn config(mode: CreditMode, beta: f64) -> RunConfig {
    let mut c = RunConfig::default();
    c.run.steps = Some(4);
    c.run.seed = 5;
    c.run.micro_batch = 0;
    c.rollout.prompts_per_step = 2;
    c.rollout.num_generations = 2;
    c.rollout.max_new_tokens = 12;
    c.rollout.generation_batch = 16;
    c.credit.mode = mode;
    c.loss.beta = beta;
    c.optim.lr = 1e-3;
    c.checkpoint.save_every = 2;
    c.oracle.concurrency = 2;
    c.oracle.timeout = 5.0;
    c.oracle.cache = None;
    c
}

/// A trainer writing into `dir`.
fn trainer(
    mut cfg: RunConfig,
    p: Policy,
    data: Vec<Example>,
    dir: PathBuf,
    resume: bool,
) -> anyhow::Result<Trainer> {
    cfg.run.output_dir = Some(dir);
    Trainer::new(cfg, p, data, resume)
}

/// A hand-written completion, tokenised with offsets like the generator's output.
fn completion(p: &Policy, text: &str) -> Generation {
    let mut ids = p.tok.encode(text).unwrap();
    ids.push(p.tok.eos_ids[0]);
    let (text, offsets) = decode_with_offsets(&p.tok, &ids).unwrap();
    Generation {
        ids,
        text,
        offsets,
        finish: FinishReason::Stop,
    }
}

#[test]
fn loss_gradient_follows_the_advantages() {
    // d loss / d logp = -A * mask / N at ratio 1 with β = 0: zero exactly where A is.
    let dev = Device::Cpu;
    let adv = Tensor::new(&[[0.0f64, -1.0, -1.0, 0.0], [0.5, 0.5, 0.5, 0.0]], &dev).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]], &dev).unwrap();
    for agg in [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm,
    ] {
        let logp = Var::new(
            &[[-1.0f64, -2.0, -0.5, -0.1], [-0.3, -0.7, -1.1, -2.0]],
            &dev,
        )
        .unwrap();
        let cfg = LossConfig {
            beta: 0.0,
            aggregation: agg,
            importance: Importance::Token,
            ..LossConfig::default()
        };
        let out = policy_loss(
            logp.as_tensor(),
            &logp.as_tensor().detach(),
            None,
            &adv,
            &mask,
            &cfg,
            4,
        )
        .unwrap();
        let g = out
            .loss
            .backward()
            .unwrap()
            .get(logp.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let a = adv.to_vec2::<f64>().unwrap();
        let m = mask.to_vec2::<f64>().unwrap();
        for b in 0..2 {
            for t in 0..4 {
                assert_eq!(
                    g[b][t] != 0.0,
                    a[b][t] != 0.0 && m[b][t] != 0.0,
                    "{agg:?} [{b},{t}] = {}",
                    g[b][t]
                );
                // sign: positive advantage → the loss falls as logp rises
                if a[b][t] != 0.0 && m[b][t] != 0.0 {
                    assert_eq!(g[b][t] < 0.0, a[b][t] > 0.0);
                }
            }
        }
        // finite-difference check of one entry
        let h = 1e-6;
        let eval = |delta: f64| {
            let mut v = logp.as_tensor().to_vec2::<f64>().unwrap();
            v[0][1] += delta;
            let lp = Tensor::new(v, &dev).unwrap();
            policy_loss(&lp, &logp.as_tensor().detach(), None, &adv, &mask, &cfg, 4)
                .unwrap()
                .loss
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (fd - g[0][1]).abs() < 1e-6,
            "{agg:?}: fd {fd} vs {}",
            g[0][1]
        );
    }
}

fn params_snapshot(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.trainable()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// One problem (3 + 4 apples) and a group of two hand-written answers that compute
/// `3 + 4 = <answer>`.
fn mia(p: &Policy, answers: [&str; 2]) -> (Vec<Example>, Rollouts) {
    let ex = vec![Example::new(
        0,
        "Mia has 3 apples. She buys 4 more apples. How many apples does Mia have now?".into(),
        "Mia has 3 + 4 = <<3+4=7>>7 apples.\n#### 7".into(),
    )
    .unwrap()];
    let prompts = vec![p.prompt_ids(&ex[0].question).unwrap(); 2];
    let gens = answers
        .iter()
        .map(|a| completion(p, &format!(" Mia has 3 + 4 = {a} apples.\n#### {a}")))
        .collect();
    let r = Rollouts::new(ex.clone(), prompts, gens, 2).unwrap();
    (ex, r)
}

/// Feeds an all-wrong group whose answers contain arithmetic slips, plus a mixed
/// group, and reports whether the policy's parameters moved.
fn all_wrong_group_moves_params(mode: CreditMode) -> (bool, f64) {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(1);
    let (ex, rollouts) = mia(&p, ["8", "9"]);
    let mut cfg = config(mode, 0.0);
    cfg.rollout.prompts_per_step = 1;
    let mut t = trainer(cfg, p, ex.clone(), dir.path().to_path_buf(), false).unwrap();
    let before = params_snapshot(&t);
    let m = t.learn(&rollouts).unwrap();
    let after = params_snapshot(&t);
    (before != after, m["spans/located"])
}

#[test]
fn all_wrong_groups_learn_only_with_spans() {
    let (moved, located) = all_wrong_group_moves_params(CreditMode::Outcome);
    assert!(!moved, "outcome GRPO has no gradient on an all-wrong group");
    assert_eq!(located, 0.0, "outcome mode does not call the oracle");
    for mode in [CreditMode::Span, CreditMode::SpanScaled, CreditMode::Prefix] {
        let (moved, located) = all_wrong_group_moves_params(mode);
        assert!(moved, "{mode:?}: the located slips must move the policy");
        assert_eq!(located, 2.0, "{mode:?}");
    }
}

#[test]
fn every_credit_mode_trains_end_to_end() {
    for mode in CreditMode::ALL {
        let dir = tempfile::tempdir().unwrap();
        let mut t = trainer(
            config(mode, 0.04),
            policy(2),
            examples(8),
            dir.path().to_path_buf(),
            false,
        )
        .unwrap();
        for _ in 0..2 {
            let m = t.train_step().unwrap();
            for (k, v) in &m {
                assert!(v.is_finite(), "{mode:?}: {k} = {v}");
            }
            assert_eq!(m["optim/skipped_now"], 0.0);
        }
        // TensorBoard and JSONL logs exist and hold both steps
        let jsonl = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(jsonl.lines().count(), 2);
        let tb = std::fs::read_dir(dir.path().join("tb")).unwrap().count();
        assert_eq!(tb, 1);
        // A group with one right and one wrong answer has a signal in every mode: the
        // update must move the weights and make the right answer more likely than the
        // wrong one (an update that does nothing, or the wrong way, fails here).
        let (_, rollouts) = mia(&t.policy, ["7", "8"]);
        let gap = |t: &Trainer| {
            let lp = sequence_logprobs(&t.policy, &rollouts);
            lp[0] - lp[1]
        };
        let (before, gap0) = (params_snapshot(&t), gap(&t));
        let m = t.learn(&rollouts).unwrap();
        assert!(m["optim/grad_norm"] > 0.0, "{mode:?}: no gradient");
        assert_ne!(
            before,
            params_snapshot(&t),
            "{mode:?}: the weights did not move"
        );
        assert!(
            gap(&t) > gap0,
            "{mode:?}: log p(right) − log p(wrong) went from {gap0} to {}",
            gap(&t)
        );
    }
}

/// Summed completion log-probabilities of each rollout under the current policy.
fn sequence_logprobs(p: &Policy, r: &Rollouts) -> Vec<f64> {
    let completions: Vec<Vec<u32>> = r.gens.iter().map(|g| g.ids.clone()).collect();
    let batch = build_batch(&r.prompts, &completions, p.tok.pad_id, &p.model.device).unwrap();
    let (logp, _) = completion_logprobs(&p.model, &batch, Forward::INFERENCE).unwrap();
    let logp = logp
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    logp.iter()
        .zip(&batch.completion_mask)
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .filter(|(_, &k)| k == 1)
                .map(|(x, _)| x)
                .sum()
        })
        .collect()
}

#[test]
fn kill_and_resume_is_bit_exact() {
    assert_resume_is_bit_exact(|| config(CreditMode::Span, 0.04));
}

#[test]
fn kill_and_resume_is_bit_exact_with_the_prompt_shared_and_unshared() {
    // the default is `on`; both settings resume to the uninterrupted run's weights
    for switch in [Switch::On, Switch::Off] {
        assert_resume_is_bit_exact(|| {
            let mut c = config(CreditMode::Span, 0.04);
            c.run.shared_prefix = switch;
            c
        });
    }
}

#[test]
fn kill_and_resume_is_bit_exact_with_lora_dropout() {
    assert_resume_is_bit_exact(|| lora_config(0.2));
}

#[test]
fn kill_and_resume_is_bit_exact_for_ppo() {
    // the value head travels in the checkpoint with the policy, and so do its moments
    assert_resume_is_bit_exact(|| {
        let mut c = config(CreditMode::Span, 0.04);
        c.run.algorithm = AlgorithmKind::Ppo;
        c.ppo.kl = KlPlacement::Reward;
        c
    });
}

#[test]
fn kill_and_resume_is_bit_exact_for_ppo_with_a_separate_critic_and_lora() {
    assert_resume_is_bit_exact(|| {
        let mut c = lora_config(0.2);
        c.run.algorithm = AlgorithmKind::Ppo;
        c.ppo.critic = CriticKind::Separate;
        c
    });
}

#[test]
fn ppo_logs_its_critic_and_trains_the_value_head() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(CreditMode::Span, 0.04);
    cfg.run.algorithm = AlgorithmKind::Ppo;
    // a dense reward, so that the returns are not all 0
    let digits = RewardFns {
        fns: vec![(Box::new(common::Digits), 1.0)],
    };
    let mut t = trainer(
        cfg,
        policy(3),
        examples(16),
        dir.path().to_path_buf(),
        false,
    )
    .unwrap()
    .with_rewards(digits);
    let head = |t: &Trainer| -> Vec<f32> {
        let p = t.trainable();
        let (_, w) = p.iter().find(|(k, _)| k == "value_head.weight").unwrap();
        w.to_vec1().unwrap()
    };
    assert!(head(&t).iter().all(|v| *v == 0.0));
    let m = t.train_step().unwrap();
    for k in ["loss/value", "value/explained_variance", "value/mean"] {
        assert!(
            m.get(k).is_some_and(|v| v.is_finite()),
            "{k} missing: {m:?}"
        );
    }
    assert!(m["loss/value"] > 0.0);
    t.train_step().unwrap();
    assert!(
        head(&t).iter().any(|v| *v != 0.0),
        "the value head did not move"
    );
    // a critic-free run has neither the head nor its metrics
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(
        config(CreditMode::Span, 0.04),
        policy(3),
        examples(16),
        dir.path().to_path_buf(),
        false,
    )
    .unwrap();
    assert!(t
        .trainable()
        .iter()
        .all(|(k, _)| !k.starts_with("value_head")));
    assert!(!t.train_step().unwrap().contains_key("loss/value"));
}

/// Span credit with rank-2 LoRA on q/v and the given adapter dropout.
fn lora_config(dropout: f64) -> RunConfig {
    let mut cfg = config(CreditMode::Span, 0.04);
    cfg.model.lora.rank = 2;
    cfg.model.lora.alpha = Some(4.0);
    cfg.model.lora.dropout = dropout;
    cfg.model.lora.targets = vec!["q_proj".into(), "v_proj".into()];
    cfg
}

/// Runs `cfg` uninterrupted, then again "killed" after the step-2 checkpoint and
/// resumed, and requires bit-identical final weights.
fn assert_resume_is_bit_exact(cfg: impl Fn() -> RunConfig) {
    let data = examples(16);
    // uninterrupted
    let a = tempfile::tempdir().unwrap();
    let mut t = trainer(
        cfg(),
        policy(3),
        data.clone(),
        a.path().to_path_buf(),
        false,
    )
    .unwrap();
    t.run().unwrap();
    let want = params_snapshot(&t);
    // "killed" after step 2's checkpoint: the process state is dropped without a save
    let b = tempfile::tempdir().unwrap();
    let mut t = trainer(
        cfg(),
        policy(3),
        data.clone(),
        b.path().to_path_buf(),
        false,
    )
    .unwrap();
    t.train_step().unwrap();
    t.train_step().unwrap();
    t.save().unwrap();
    t.train_step().unwrap(); // lost work: happened after the last checkpoint
    drop(t);
    // a second writer is refused while one holds the folder, and a fresh run is
    // refused where a run already is
    let holder = trainer(cfg(), policy(3), data.clone(), b.path().to_path_buf(), true).unwrap();
    let busy = trainer(cfg(), policy(3), data.clone(), b.path().to_path_buf(), true)
        .err()
        .unwrap();
    assert!(format!("{busy:#}").contains("in use"), "{busy:#}");
    drop(holder);
    let taken = trainer(
        cfg(),
        policy(3),
        data.clone(),
        b.path().to_path_buf(),
        false,
    )
    .err()
    .unwrap();
    assert!(format!("{taken:#}").contains("--resume"), "{taken:#}");
    let mut t = trainer(cfg(), policy(3), data, b.path().to_path_buf(), true).unwrap();
    assert_eq!(t.step, 2);
    t.run().unwrap();
    // the resumed run's log is the uninterrupted one's: each step once, same values
    let rows = |d: &Path| -> Vec<(u64, Option<f64>)> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss/total"].as_f64())
            })
            .collect()
    };
    assert_eq!(rows(a.path()), rows(b.path()));
    let got = params_snapshot(&t);
    assert_eq!(want.len(), got.len());
    for ((ka, va), (kb, vb)) in want.iter().zip(&got) {
        assert_eq!(ka, kb);
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{ka} differs after resume"
        );
    }
}

#[test]
fn resume_without_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = trainer(
        config(CreditMode::Outcome, 0.0),
        policy(4),
        examples(4),
        dir.path().to_path_buf(),
        true,
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("no checkpoint"), "{err:#}");
}

#[test]
fn lora_trains_only_adapters_against_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = lora_config(0.0);
    let mut t = trainer(cfg, policy(6), examples(8), dir.path().to_path_buf(), false).unwrap();
    let names: Vec<String> = t.trainable().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
    assert!(names.iter().all(|k| k.contains(".lora_")));
    let m = t.train_step().unwrap();
    assert!(m["loss/kl"].is_finite());
    t.save().unwrap();
}

#[test]
fn micro_batches_accumulate_to_the_full_batch_gradient() {
    for agg in [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm,
    ] {
        let run = |micro: usize, tokens: usize| {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(CreditMode::Span, 0.04);
            cfg.run.micro_batch = micro;
            cfg.run.micro_batch_tokens = tokens;
            cfg.loss.aggregation = agg;
            let mut t =
                trainer(cfg, policy(7), examples(8), dir.path().to_path_buf(), false).unwrap();
            let m = t.train_step().unwrap();
            (params_snapshot(&t), m["optim/grad_norm"], m["loss/total"])
        };
        let (full, gn_full, loss_full) = run(0, 0);
        // one row at a time, and rows sorted by length packed into a budget of two of
        // the longest possible rows (so micro-batches of two, in length order)
        let p = policy(7);
        let longest = examples(8)
            .iter()
            .map(|e| p.prompt_ids(&e.question).unwrap().len())
            .max()
            .unwrap()
            + config(CreditMode::Span, 0.0).rollout.max_new_tokens;
        for (rows, tokens) in [(1, 0), (0, 2 * longest)] {
            let (micro, gn_micro, loss_micro) = run(rows, tokens);
            assert!(
                (gn_full - gn_micro).abs() < 1e-4 * gn_full.max(1e-3),
                "{agg:?} {rows}/{tokens}: grad norm {gn_full} vs {gn_micro}"
            );
            assert!(
                (loss_full - loss_micro).abs() < 1e-5,
                "{agg:?} {rows}/{tokens}: loss {loss_full} vs {loss_micro}"
            );
            for ((k, a), (_, b)) in full.iter().zip(&micro) {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "{agg:?} {rows}/{tokens}: {k} differs by {d}");
            }
        }
    }
}

/// SFT split into length-sorted micro-batches (a budget of about two rows) takes the
/// same step as SFT on whole batches.
#[test]
fn sft_micro_batches_accumulate_to_the_whole_batch() {
    use cal_train::sft::{sft, SftConfig};
    let run = |tokens: usize| {
        let mut p = policy(9);
        let cfg = SftConfig {
            steps: 2,
            batch_size: 6,
            optim: cal_train::adamw::OptimConfig {
                lr: 1e-3,
                ..Default::default()
            },
            seed: 4,
            micro_batch_tokens: tokens,
        };
        let r = sft(&mut p, &examples(12), &cfg, |_| true).unwrap();
        let w: Vec<(String, Vec<f32>)> = p
            .model
            .params
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        (r.first_loss, w)
    };
    let (loss_whole, whole) = run(0);
    let (loss_micro, micro) = run(150);
    assert!(
        (loss_whole - loss_micro).abs() < 1e-5,
        "{loss_whole} vs {loss_micro}"
    );
    for ((k, a), (_, b)) in whole.iter().zip(&micro) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{k} differs by {d}");
        assert!(
            a != &policy(9).model.params[k]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

#[test]
fn reused_batches_move_the_ratio_off_one() {
    // A mixed group (one right, one wrong answer) trained twice on the same samples: the
    // second update sees ratio ≠ 1, so at a large learning rate tokens leave the trust
    // region (clip fraction > 0), and a wide ε_high lets the upper side stay in.
    let run = |iterations: usize, eps_high: Option<f64>| {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(8);
        let (ex, rollouts) = mia(&p, ["7", "9"]);
        let mut cfg = config(CreditMode::Outcome, 0.0);
        cfg.rollout.prompts_per_step = 1;
        cfg.run.num_iterations = iterations;
        cfg.optim.lr = 0.05;
        cfg.loss.epsilon_high = eps_high;
        let mut t = trainer(cfg, p, ex.clone(), dir.path().to_path_buf(), false).unwrap();
        let m = t.learn(&rollouts).unwrap();
        (m, params_snapshot(&t))
    };
    let (one, p1) = run(1, None);
    assert_eq!(one["optim/iterations"], 1.0);
    assert_eq!(
        one["loss/clip_fraction"], 0.0,
        "ratio is exactly 1 on fresh samples"
    );
    let (two, p2) = run(2, None);
    assert_eq!(two["optim/iterations"], 2.0);
    assert!(two["loss/clip_fraction"] > 0.0, "{two:?}");
    assert_ne!(p1, p2);
    let (wide, _) = run(2, Some(100.0));
    assert!(
        wide["loss/clip_fraction"] < two["loss/clip_fraction"],
        "clip-higher: {} vs {}",
        wide["loss/clip_fraction"],
        two["loss/clip_fraction"]
    );
}
