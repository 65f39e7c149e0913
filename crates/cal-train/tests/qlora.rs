//! QLoRA: LoRA over a base held quantized. The adapters' gradients through the
//! quantized base equal those through the same base dequantized to f32 (the training
//! forward multiplies by dequantized tiles); a quantized run resumes to the same bits.

mod common;

use cal_model::generate::build_batch;
use cal_train::config::{QuantizeBase, RunConfig};
use cal_train::policy::Policy;
use cal_train::sft::{BatchTotals, CrossEntropy, Objective};
use candle_core::Tensor;
use common::{examples, policy_shaped};

/// The adapters' gradients of SFT's loss on two examples, by name.
fn adapter_grads(p: &mut Policy, cfg: &RunConfig) -> Vec<(String, Tensor)> {
    let trainable = p.prepare(&cfg.model, 7).unwrap();
    let vars = p.model.make_trainable(trainable).unwrap();
    let ex = examples(2);
    let prompts: Vec<Vec<u32>> = ex
        .iter()
        .map(|e| p.prompt_ids(&e.question).unwrap())
        .collect();
    let targets: Vec<Vec<u32>> = ex
        .iter()
        .map(|e| p.target_ids(&e.answer).unwrap())
        .collect();
    let batch = build_batch(&prompts, &targets, p.tok.pad_id, &p.model.device).unwrap();
    let totals = BatchTotals {
        target_tokens: targets.iter().map(Vec::len).sum::<usize>() as f64,
        tokens: 1.0,
        rows: 2.0,
    };
    let (loss, _) = CrossEntropy.loss(p, &batch, &totals, 0).unwrap();
    let g = loss.backward().unwrap();
    vars.iter()
        .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

#[test]
fn adapter_gradients_through_a_quantized_base_match_the_dequantized_base() {
    for q in [QuantizeBase::Q8_0, QuantizeBase::Q4_0, QuantizeBase::Q4_1] {
        let mut cfg = RunConfig::default();
        cfg.model.lora.rank = 4;
        cfg.model.lora.alpha = Some(8.0);
        cfg.model.lora.targets = vec!["q_proj".into(), "v_proj".into(), "up_proj".into()];
        cfg.finish().unwrap();
        // hidden 64 and MLP 128: whole pairs of the formats' blocks of 32
        let mut quantized = policy_shaped(3, 32);
        cfg.model.quantize_base = q;
        // the same base, dequantized: what the quantized model computes with, in f32
        let mut plain = policy_shaped(3, 32);
        {
            let mut probe = policy_shaped(3, 32);
            probe.model.quantize_base(q.ggml().unwrap()).unwrap();
            for (name, ql) in &probe.model.quantized {
                plain
                    .model
                    .params
                    .insert(name.clone(), ql.dequantize().unwrap());
            }
        }
        let gq = adapter_grads(&mut quantized, &cfg);
        assert!(
            !quantized.model.quantized.is_empty(),
            "{q:?}: nothing quantized"
        );
        assert!(
            quantized
                .model
                .params
                .keys()
                .all(|k| !k.ends_with("_proj.weight") && k != "model.embed_tokens.weight"),
            "{q:?}: an f32 copy of the base is still held"
        );
        assert!(quantized
            .model
            .quantized
            .contains_key("model.embed_tokens.weight"));
        cfg.model.quantize_base = QuantizeBase::None;
        let gf = adapter_grads(&mut plain, &cfg);
        assert_eq!(gq.len(), gf.len());
        for ((name, a), (_, b)) in gq.iter().zip(&gf) {
            let norm = |t: &Tensor| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let rel = norm(&(a - b).unwrap()) / norm(b).max(1e-12);
            // the training forward multiplies by the dequantized tiles in f32: equal
            // but for the order of the sums
            assert!(
                rel < 1e-4,
                "{q:?} {name}: gradients differ by {rel:.4} (relative)"
            );
        }
    }
}

#[test]
fn qlora_needs_adapters() {
    let mut cfg = RunConfig::default();
    cfg.model.quantize_base = QuantizeBase::Q8_0;
    let err = policy_shaped(3, 32)
        .prepare(&cfg.model, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--lora-rank"), "{err}");
}

/// A QLoRA SFT run killed after a checkpoint resumes to the uninterrupted run's
/// adapters, bit for bit: the base is quantized again the same way, and only the
/// adapters and their moments travel in the checkpoint.
#[test]
fn a_qlora_run_resumes_bit_exact() {
    use cal_train::rundir::Start;
    use cal_train::sft::{SftHarness, SftRun};
    let run = |dir: &std::path::Path, start: Start| {
        let mut cfg = RunConfig::default();
        cfg.model.lora.rank = 4;
        cfg.model.lora.alpha = Some(8.0);
        cfg.model.quantize_base = QuantizeBase::Q4_0;
        cfg.sft.steps = 6;
        cfg.sft.batch_size = 3;
        cfg.sft.learning_rate = 3e-3;
        cfg.sft.micro_batch_tokens = 0;
        cfg.run.seed = 5;
        cfg.finish().unwrap();
        let harness = SftHarness {
            save_every: 2,
            ..SftHarness::default()
        };
        SftRun::new(
            dir,
            &cfg,
            policy_shaped(3, 32),
            &examples(20),
            Vec::new(),
            harness,
            start,
        )
        .unwrap()
    };
    let adapters = |r: &SftRun| -> Vec<Vec<u32>> {
        r.policy
            .model
            .params
            .iter()
            .filter(|(k, _)| k.contains(".lora_"))
            .map(|(_, t)| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let a = tempfile::tempdir().unwrap();
    let mut r = run(a.path(), Start::Fresh);
    r.run().unwrap();
    let want = adapters(&r);
    assert!(!want.is_empty() && !r.policy.model.quantized.is_empty());
    drop(r);
    let b = tempfile::tempdir().unwrap();
    let mut r = run(b.path(), Start::Fresh);
    for _ in 0..5 {
        r.train_step().unwrap();
    }
    drop(r);
    let mut r = run(b.path(), Start::Resume);
    assert_eq!(r.lp.step, 4);
    r.run().unwrap();
    assert!(want == adapters(&r), "adapters differ after resume");
}

/// A random model drawn straight into a quantized base (a layer at a time, for shapes
/// whose f32 weights do not fit) is the random model of the same seed quantized after.
#[test]
fn a_random_base_drawn_quantized_is_the_random_base_quantized() {
    let json = r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 96, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "max_position_embeddings": 64}"#;
    let cfg = cal_model::ModelConfig::from_hf_json(json, std::path::Path::new("c.json")).unwrap();
    let q = candle_core::quantized::GgmlDType::Q4_0;
    let (dt, dev) = (candle_core::DType::F32, candle_core::Device::Cpu);
    let drawn = cal_model::Transformer::init_random_quantized(cfg.clone(), 5, q, dt, &dev).unwrap();
    let mut after = cal_model::Transformer::init_random(cfg, 5, dt, &dev).unwrap();
    after.quantize_base(q).unwrap();
    let keys = |m: &cal_model::Transformer| m.quantized.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&drawn), keys(&after));
    // every layer's seven projections, the embedding and the untied head
    assert_eq!(drawn.quantized.len(), 2 * 7 + 2);
    for (name, ql) in &drawn.quantized {
        let (a, b) = (
            ql.dequantize().unwrap(),
            after.quantized[name].dequantize().unwrap(),
        );
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    assert_eq!(
        drawn.params.keys().collect::<Vec<_>>(),
        after.params.keys().collect::<Vec<_>>()
    );
    for (name, t) in &drawn.params {
        let d = (t - &after.params[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}
