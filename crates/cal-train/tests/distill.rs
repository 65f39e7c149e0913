//! Distillation's losses against numpy (`scripts/make_distill_fixtures.py`), their
//! gradients through a model against finite differences, and a short run that cuts the
//! student's KL to the teacher.

mod common;

use cal_model::generate::build_batch;
use cal_model::Transformer;
use cal_train::config::DistillSection;
use cal_train::distill::{
    attention_sq_sum, layer_map, logit_kl_sum, pooled_feature_sq_sum, Distiller, Strategy,
};
use cal_train::policy::Policy;
use cal_train::sft::{BatchTotals, Objective};
use candle_core::{DType, Device, Tensor, Var};
use common::{examples, policy_shaped};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/distill.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A nested JSON array as an f64 tensor.
fn tensor(v: &Value) -> Tensor {
    fn shape(v: &Value, out: &mut Vec<usize>) {
        if let Value::Array(a) = v {
            out.push(a.len());
            shape(&a[0], out);
        }
    }
    fn flat(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.push(x.as_f64().unwrap()),
        }
    }
    let (mut s, mut f) = (Vec::new(), Vec::new());
    shape(v, &mut s);
    flat(v, &mut f);
    Tensor::from_vec(f, s, &Device::Cpu).unwrap()
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let d = d.to_scalar::<f64>().unwrap();
    assert!(d < 1e-9, "{what}: off by {d}");
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

#[test]
fn the_three_losses_and_their_gradients_match_numpy() {
    let f = fixture();
    // logit
    let l = &f["logit"];
    let s = Var::from_tensor(&tensor(&l["student"])).unwrap();
    let v = logit_kl_sum(
        s.as_tensor(),
        &tensor(&l["teacher"]),
        l["tau"].as_f64().unwrap(),
    )
    .unwrap();
    assert!((scalar(&v) - l["value"].as_f64().unwrap()).abs() < 1e-9);
    let g = v.backward().unwrap();
    close(
        g.get(s.as_tensor()).unwrap(),
        &tensor(&l["grad_student"]),
        "logit grad",
    );
    // attention, with a head projection and without one
    let a = &f["attention"];
    let (s, p) = (
        Var::from_tensor(&tensor(&a["student"])).unwrap(),
        Var::from_tensor(&tensor(&a["proj"])).unwrap(),
    );
    let (t, rows) = (tensor(&a["teacher"]), tensor(&a["rows"]));
    let v = attention_sq_sum(s.as_tensor(), &t, Some(p.as_tensor()), &rows).unwrap();
    assert!((scalar(&v) - a["value"].as_f64().unwrap()).abs() < 1e-9);
    let g = v.backward().unwrap();
    close(
        g.get(s.as_tensor()).unwrap(),
        &tensor(&a["grad_student"]),
        "attention grad",
    );
    close(
        g.get(p.as_tensor()).unwrap(),
        &tensor(&a["grad_proj"]),
        "projection grad",
    );
    let two = s.as_tensor().narrow(1, 0, 2).unwrap();
    let v = attention_sq_sum(&two, &t, None, &rows).unwrap();
    assert!((scalar(&v) - a["value_same_heads"].as_f64().unwrap()).abs() < 1e-9);
    // feature
    let x = &f["feature"];
    let (h, w) = (
        Var::from_tensor(&tensor(&x["student"])).unwrap(),
        Var::from_tensor(&tensor(&x["proj"])).unwrap(),
    );
    let v = pooled_feature_sq_sum(
        h.as_tensor(),
        &tensor(&x["teacher"]),
        w.as_tensor(),
        &tensor(&x["rows"]),
    )
    .unwrap();
    assert!((scalar(&v) - x["value"].as_f64().unwrap()).abs() < 1e-9);
    let g = v.backward().unwrap();
    close(
        g.get(h.as_tensor()).unwrap(),
        &tensor(&x["grad_student"]),
        "feature grad",
    );
    close(
        g.get(w.as_tensor()).unwrap(),
        &tensor(&x["grad_proj"]),
        "feature projection grad",
    );
}

fn f64_policy(seed: u64, head_dim: usize) -> Policy {
    let p = policy_shaped(seed, head_dim);
    let m = Transformer::init_random(p.model.cfg.clone(), seed, DType::F64, &Device::Cpu).unwrap();
    Policy::new(m, p.tok)
}

fn section(strategy: Strategy) -> DistillSection {
    DistillSection {
        strategy,
        temperature: 2.0,
        alpha: 0.7,
        ..DistillSection::default()
    }
}

#[test]
fn each_strategy_s_gradient_through_the_model_matches_finite_differences() {
    for strategy in [Strategy::Logit, Strategy::Attention, Strategy::Feature] {
        // a wider two-layer teacher, a narrower two-layer student: the feature
        // projection maps 16 → 32
        let teacher = f64_policy(4, 16);
        let mut student = f64_policy(3, 8);
        let map = layer_map("", None, 2, 2).unwrap();
        let d = Distiller::new(teacher.model, &student.model, &section(strategy), map, 1).unwrap();
        let mut vars = student
            .model
            .make_trainable(|n| n == "model.layers.0.mlp.up_proj.weight")
            .unwrap();
        vars.extend(d.vars());
        let ex = examples(2);
        let prompts: Vec<Vec<u32>> = ex
            .iter()
            .map(|e| student.prompt_ids(&e.question).unwrap())
            .collect();
        let targets: Vec<Vec<u32>> = ex
            .iter()
            .map(|e| student.target_ids(&e.answer).unwrap())
            .collect();
        let batch = build_batch(&prompts, &targets, student.tok.pad_id, &Device::Cpu).unwrap();
        let totals = BatchTotals {
            target_tokens: targets.iter().map(Vec::len).sum::<usize>() as f64,
            tokens: (0..2)
                .map(|i| prompts[i].len() + targets[i].len())
                .sum::<usize>() as f64,
            rows: 2.0,
        };
        let eval = |s: &Policy| d.loss(s, &batch, &totals, 0).unwrap().0;
        let grads = eval(&student).backward().unwrap();
        for (name, var) in &vars {
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
            let mut idx: Vec<usize> = (0..g.len()).collect();
            idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            assert!(g[idx[0]].abs() > 1e-8, "{strategy:?} {name}: no gradient");
            for &i in &idx[..3] {
                let at = |dx: f64| {
                    let mut v = base.clone();
                    v[i] += dx;
                    var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    scalar(&eval(&student).to_dtype(DType::F64).unwrap())
                };
                let fd = (at(1e-5) - at(-1e-5)) / 2e-5;
                var.set(&Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    (fd - g[i]).abs() < 1e-6 * (1.0 + g[i].abs()),
                    "{strategy:?} {name}[{i}]: fd {fd} vs {}",
                    g[i]
                );
            }
        }
        let _ = &mut student;
    }
}

#[test]
fn a_layer_map_out_of_range_names_the_flag() {
    let err = layer_map("0:0,1:5", None, 2, 4).unwrap_err().to_string();
    assert!(err.contains("--layer-map") && err.contains("1:5"), "{err}");
    assert_eq!(layer_map("", None, 2, 6).unwrap(), vec![(0, 2), (1, 5)]);
    assert_eq!(
        layer_map("", Some(&[0, 4]), 2, 6).unwrap(),
        vec![(0, 0), (1, 4)]
    );
}

fn run_in(
    dir: &std::path::Path,
    strategy: Strategy,
    start: cal_train::rundir::Start,
) -> cal_train::sft::SftRun {
    use cal_train::sft::{RunSpec, SftConfig, SftHarness, SftRun};
    let mut config = cal_train::config::RunConfig::default();
    config.run.seed = 5;
    // α = 1: pure distillation (a random teacher is far from the data, the CE would
    // pull the student away from it)
    config.distill = DistillSection {
        alpha: 1.0,
        ..section(strategy)
    };
    let teacher = policy_shaped(4, 16);
    let student = policy_shaped(3, 8);
    let map = layer_map("", None, 2, 2).unwrap();
    let d = Distiller::new(teacher.model, &student.model, &config.distill, map, 5).unwrap();
    let cfg = SftConfig {
        steps: 12,
        batch_size: 4,
        micro_batch_tokens: 300, // several micro-batches a step
        optim: cal_train::adamw::OptimConfig {
            lr: 3e-3,
            warmup_steps: 0,
            ..config.optim
        },
        seed: 5,
    };
    let harness = SftHarness {
        save_every: 4,
        eval_every: 12,
        skip_start_eval: false,
        eval: cal_train::evaluate::EvalConfig {
            max_new_tokens: 4,
            ..cal_train::evaluate::EvalConfig::of_run(&config)
        },
        weight_check_every: 0,
    };
    let spec = RunSpec {
        config: &config,
        cfg,
        objective: Box::new(d),
        ranks: std::sync::Arc::new(cal_train::collective::SingleProcess),
    };
    SftRun::with_objective(
        dir,
        spec,
        student,
        &examples(40),
        examples(6),
        harness,
        start,
    )
    .unwrap()
}

fn bits(r: &cal_train::sft::SftRun) -> Vec<Vec<u32>> {
    r.policy
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
        .collect()
}

fn kl_curve(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["eval/distill/kl"].as_f64())
        .collect()
}

#[test]
fn distillation_cuts_the_held_out_kl_and_resumes_bit_exact() {
    use cal_train::rundir::Start;
    for strategy in [Strategy::Logit, Strategy::Feature] {
        let a = tempfile::tempdir().unwrap();
        let mut r = run_in(a.path(), strategy, Start::Fresh);
        r.run().unwrap();
        let want = bits(&r);
        drop(r);
        let kl = kl_curve(a.path());
        assert_eq!(kl.len(), 2, "{kl:?}");
        if strategy == Strategy::Logit {
            assert!(kl[1] < 0.8 * kl[0], "held-out KL {kl:?}");
        }
        // killed after step 6 (its last checkpoint is step 4's): the projection of the
        // feature strategy comes back from the checkpoint with the student
        let b = tempfile::tempdir().unwrap();
        let mut r = run_in(b.path(), strategy, Start::Fresh);
        r.evaluate_held_out().unwrap();
        for _ in 0..6 {
            r.train_step().unwrap();
        }
        drop(r);
        let mut r = run_in(b.path(), strategy, Start::Resume);
        assert_eq!(r.lp.step, 4);
        r.run().unwrap();
        assert!(
            want == bits(&r),
            "{strategy:?}: weights differ after resume"
        );
        assert_eq!(kl, kl_curve(b.path()), "{strategy:?}");
    }
}

#[test]
fn tokenizers_that_differ_are_refused_with_both_names() {
    use cal_train::distill::check_same_tokenizer;
    let a = policy_shaped(1, 8).tok;
    let corpus = (0..200).map(|i| format!("other words number {i} entirely"));
    let b = cal_model::tokenizer::train_tiny(corpus, 120).unwrap();
    assert!(check_same_tokenizer(("t", &a), ("s", &a)).is_ok());
    let err = check_same_tokenizer(("teacher-x", &a), ("student-y", &b))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("teacher-x")
            && err.contains("student-y")
            && err.contains("different tokenizers"),
        "{err}"
    );
}
