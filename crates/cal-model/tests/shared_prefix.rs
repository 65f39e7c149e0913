//! The shared-prefix forward against the unshared one: the same completion log-probs
//! (to 1e-5) and the same gradients (to 1e-4 relative) for full fine-tuning and LoRA,
//! on groups of different sizes and prompt lengths in one batch; and generation that
//! prefills each distinct prompt once gives the same tokens.

mod common;

use cal_model::generate::{
    build_batch, build_shared_batch, completion_logprobs, generate, SamplingConfig,
};
use cal_model::{Forward, LoraConfig, ModelConfig, Transformer};
use candle_core::{DType, Device, Tensor, Var};
use common::small;
use rand::SeedableRng;

/// SmolLM2-135M's widths (hidden 576, 9 query / 3 KV heads of 64, FFN 1536, rope θ
/// 1e5, tied embeddings) with few layers and a smaller vocabulary (debug builds).
fn smollm2_widths(layers: usize) -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        vocab_size: 512,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: layers,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        rope_linear_factor: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        attention_bias: false,
        qk_norm: false,
    }
}

/// Three groups: prompt lengths 5, 2 and 3, sizes 3, 2 and 1, ragged completions.
fn groups(vocab: u32) -> (Vec<Vec<u32>>, Vec<usize>, Vec<Vec<u32>>) {
    let t = |xs: &[u32]| xs.iter().map(|x| 1 + x % (vocab - 1)).collect::<Vec<u32>>();
    let prompts = vec![t(&[1, 2, 3, 4, 5]), t(&[6, 7]), t(&[8, 9, 10])];
    let group = vec![0, 0, 0, 1, 1, 2];
    let completions = vec![
        t(&[11, 12, 13, 14]),
        t(&[15, 16]),
        t(&[17, 18, 19, 20, 21]),
        t(&[22]),
        t(&[23, 24, 25]),
        t(&[26, 27]),
    ];
    (prompts, group, completions)
}

/// The completion log-probs `[B, Tc]` of the groups through either forward, and a
/// fixed weighted sum of them to differentiate.
fn logprobs(model: &Transformer, shared: bool, fwd: Forward) -> (Tensor, Tensor) {
    let (prompts, group, completions) = groups(model.cfg.vocab_size as u32);
    let batch = if shared {
        build_shared_batch(&prompts, &group, &completions, 0, &model.device).unwrap()
    } else {
        let rows: Vec<Vec<u32>> = group.iter().map(|&g| prompts[g].clone()).collect();
        build_batch(&rows, &completions, 0, &model.device).unwrap()
    };
    assert_eq!(batch.shared.is_some(), shared);
    let (logp, _) = completion_logprobs(model, &batch, fwd).unwrap();
    let (b, t) = logp.dims2().unwrap();
    let mask = Tensor::from_vec(batch.completion_mask_f32(), (b, t), &model.device).unwrap();
    let w: Vec<f32> = (0..b * t).map(|i| 0.3 + (i % 5) as f32 * 0.17).collect();
    let w = (Tensor::from_vec(w, (b, t), &model.device).unwrap() * mask).unwrap();
    let loss = (&logp * &w).unwrap().sum_all().unwrap();
    (
        (logp * w.ne(0f32).unwrap().to_dtype(DType::F32).unwrap()).unwrap(),
        loss,
    )
}

fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// Shared against unshared on `model`'s trainable `vars`: log-probs within 1e-5,
/// every gradient within 1e-4 of its norm (and non-zero).
fn check(what: &str, model: &Transformer, vars: &[(String, Var)], fwd: Forward) {
    let (lp_u, loss_u) = logprobs(model, false, fwd);
    let (lp_s, loss_s) = logprobs(model, true, fwd);
    for (ru, rs) in vec2(&lp_u).iter().zip(vec2(&lp_s)) {
        for (a, b) in ru.iter().zip(rs) {
            assert!((a - b).abs() <= 1e-5, "{what}: log-prob {a} vs {b}");
        }
    }
    let (gu, gs) = (loss_u.backward().unwrap(), loss_s.backward().unwrap());
    for (name, v) in vars {
        let flat = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
            g.get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: {name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (flat(&gu), flat(&gs));
        let norm = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt();
        assert!(norm > 0.0, "{what}: {name} has a zero gradient");
        assert!(
            diff <= 1e-4 * norm,
            "{what}: {name} gradient differs by {diff} (norm {norm})"
        );
    }
}

#[test]
fn shared_prefix_matches_unshared_full_fine_tuning() {
    let dev = Device::Cpu;
    let cfgs = [
        ("llama", small("llama")),
        ("qwen2 (qkv bias)", small("qwen2")),
        ("qwen3 (q/k norm)", small("qwen3")),
        ("tiny", ModelConfig::tiny(40)),
        ("smollm2 widths, 2 layers", smollm2_widths(2)),
    ];
    for (what, cfg) in cfgs {
        let mut m = Transformer::init_random(cfg, 3, DType::F32, &dev).unwrap();
        for (k, t) in m.params.iter_mut() {
            if k.ends_with("norm.weight") || k.ends_with(".bias") {
                *t = (t.ones_like().unwrap() * 1.1).unwrap();
            }
        }
        let vars = m.make_trainable(|_| true).unwrap();
        check(what, &m, &vars, Forward::training(7));
    }
}

#[test]
fn shared_prefix_matches_unshared_lora() {
    let dev = Device::Cpu;
    for (what, cfg) in [
        ("llama", small("llama")),
        ("smollm2 widths, 3 layers", smollm2_widths(3)),
    ] {
        let mut m = Transformer::init_random(cfg, 5, DType::F32, &dev).unwrap();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        };
        m.add_lora(lora, 9).unwrap();
        // B = 0 would leave A without a gradient: start from a trained-looking adapter.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (k, t) in m.params.iter_mut() {
            if k.ends_with("lora_B") {
                let n = t.elem_count();
                let v: Vec<f32> = (0..n)
                    .map(|_| rand::Rng::random_range(&mut rng, -0.05..0.05))
                    .collect();
                *t = Tensor::from_vec(v, t.shape(), &dev).unwrap();
            }
        }
        let vars = m.make_trainable(|n| n.contains(".lora_")).unwrap();
        check(what, &m, &vars, Forward::training(7));
        // the reference of a LoRA run: the base with adapters off
        let (u, _) = logprobs(&m, false, Forward::BASE);
        let (s, _) = logprobs(&m, true, Forward::BASE);
        for (ru, rs) in vec2(&u).iter().zip(vec2(&s)) {
            for (a, b) in ru.iter().zip(rs) {
                assert!((a - b).abs() <= 1e-5, "{what} base: {a} vs {b}");
            }
        }
    }
}

#[test]
fn generation_with_shared_prefill_gives_the_same_tokens() {
    let dev = Device::Cpu;
    let corpus = (0..200).map(|i| {
        format!(
            "Question: what is {i} plus {}? Answer: {}",
            i % 7,
            i + i % 7
        )
    });
    let tok = cal_model::tokenizer::train_tiny(corpus, 97).unwrap();
    let vocab = tok.tokenizer.get_vocab_size(true);
    let mut m = Transformer::init_random(ModelConfig::tiny(vocab), 11, DType::F32, &dev).unwrap();
    // sharper logits than a 0.02-std start, so that greedy picks are well separated
    for (k, t) in m.params.iter_mut() {
        if k.contains("embed_tokens") {
            *t = (&*t * 5.0).unwrap();
        }
    }
    let (prompts, group, _) = groups(vocab as u32);
    let rows: Vec<Vec<u32>> = group.iter().map(|&g| prompts[g].clone()).collect();
    for greedy in [true, false] {
        let base = SamplingConfig {
            max_new_tokens: 12,
            greedy,
            ..SamplingConfig::default()
        };
        let shared = SamplingConfig {
            share_prompts: true,
            ..base.clone()
        };
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let a = generate(&m, &tok, &rows, &base, &mut r1).unwrap();
        let b = generate(&m, &tok, &rows, &shared, &mut r2).unwrap();
        let ids = |g: &[cal_model::generate::Generation]| {
            g.iter().map(|x| x.ids.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b), "greedy {greedy}");
        if !greedy {
            // the rows of a group sampled different completions from one prefill
            assert_ne!(a[0].ids, a[1].ids);
        }
    }
}
