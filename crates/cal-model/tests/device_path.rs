//! The device-generic path: what a CUDA device runs (candle's differentiable
//! compositions, mixed precision, sampling on the device), checked against the CPU
//! kernels.
//!
//! Every check runs on a [`Target`]. `Portable` is the CPU with this build's own
//! kernels switched off ([`cal_model::device::portable`]), which takes exactly the ops a
//! GPU takes; it runs in every `cargo test`. `Cuda` is the GPU group: the same checks on
//! `cuda:0`, compiled with `--features cuda` (see `scripts/build-cuda.sh`) and listed as
//! ignored otherwise. A CUDA build on a machine without a device fails them, unless
//! `CAL_GRPO_SKIP_CUDA=1` skips them (printing `SKIPPED`).

use cal_model::generate::{build_batch, completion_logprobs, generate, sample_on_device};
use cal_model::generate::{SamplingConfig, SequenceBatch};
use cal_model::{tokenizer, Forward, ModelConfig, Transformer};
use candle_core::{DType, Device, Tensor};

#[derive(Clone)]
enum Target {
    Portable,
    #[allow(dead_code)] // built only with the cuda feature
    Device(Device),
}

impl Target {
    fn device(&self) -> Device {
        match self {
            Target::Portable => Device::Cpu,
            Target::Device(d) => d.clone(),
        }
    }

    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        match self {
            Target::Portable => cal_model::device::portable(|| {
                assert!(!cal_model::device::cpu_kernels(&Device::Cpu));
                f()
            }),
            Target::Device(_) => f(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Portable => "cpu-portable",
            Target::Device(_) => "cuda",
        }
    }
}

/// `cuda:0` as a target, or `None` after saying why the GPU test is skipped.
#[allow(dead_code)]
fn cuda() -> Option<Target> {
    cal_model::device::cuda_for_tests().map(Target::Device)
}

fn config() -> ModelConfig {
    ModelConfig {
        architecture: "qwen2".into(),
        vocab_size: 97,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_linear_factor: None,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        attention_bias: true,
        qk_norm: false,
    }
}

/// A random f32 model on the CPU with non-trivial norms and biases.
fn model() -> Transformer {
    let mut m = Transformer::init_random(config(), 7, DType::F32, &Device::Cpu).unwrap();
    for (k, t) in m.params.iter_mut() {
        if k.ends_with("norm.weight") || k.ends_with(".bias") {
            *t = (t.ones_like().unwrap() * 1.3).unwrap();
        }
    }
    m
}

fn batch(dev: &Device) -> SequenceBatch {
    let prompts = vec![vec![1, 2, 3, 4], vec![5, 6], vec![7]];
    let completions = vec![vec![8, 9, 10, 11, 12], vec![13, 14], vec![15, 16, 17]];
    build_batch(&prompts, &completions, 0, dev).unwrap()
}

/// A fixed weighted sum of completion log-probs (f32 or wider).
fn loss(m: &Transformer) -> Tensor {
    let b = batch(&m.device);
    let (logp, _) = completion_logprobs(m, &b, Forward::INFERENCE).unwrap();
    let (rows, t) = logp.dims2().unwrap();
    let w: Vec<f32> = (0..rows * t)
        .map(|i| f32::from(b.completion_mask[i / t][i % t]) * (0.3 + (i % 5) as f32 * 0.17))
        .collect();
    let w = Tensor::from_vec(w, (rows, t), &m.device).unwrap();
    (logp * w).unwrap().sum_all().unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max(1, max |b|).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn logits(m: &Transformer) -> Vec<f32> {
    let ids = Tensor::new(&[[0u32, 0, 5, 6, 9], [1, 2, 3, 4, 60]], &m.device).unwrap();
    let mask = vec![vec![0u8, 0, 1, 1, 1], vec![1; 5]];
    host(&m.forward(&ids, &mask).unwrap())
}

/// f32 logits on the target against the CPU kernels.
fn check_logits_f32(target: &Target) {
    let cpu = model();
    let want = logits(&cpu);
    let got = target.run(|| logits(&cpu.to_device(&target.device()).unwrap()));
    let d = rel_diff(&got, &want);
    assert!(d < 1e-5, "{}: f32 logits differ by {d}", target.name());
}

/// Gradients of every parameter (f32) on the target against the CPU kernels.
fn check_gradients_f32(target: &Target) {
    let grads = |m: &mut Transformer| {
        let vars = m.make_trainable(|_| true).unwrap();
        let g = loss(m).backward().unwrap();
        vars.into_iter()
            .map(|(k, v)| {
                let gv = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{k}: no grad"));
                (k, host(gv))
            })
            .collect::<Vec<_>>()
    };
    let want = grads(&mut model());
    let got = target.run(|| grads(&mut model().to_device(&target.device()).unwrap()));
    assert_eq!(want.len(), got.len());
    for ((k, w), (_, g)) in want.iter().zip(&got) {
        let d = rel_diff(g, w);
        assert!(
            d < 1e-4,
            "{}: gradient of {k} differs by {d}",
            target.name()
        );
        assert!(w.iter().any(|x| *x != 0.0), "{k}: zero gradient");
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// bf16 compute with f32 master weights: the logits stay within bf16's precision of the
/// f32 model's, the loss is f32, gradients arrive in f32 on the f32 `Var`s and point
/// where the f32 gradients point, and the frozen reference is bf16.
fn check_mixed_precision(target: &Target) {
    let dev = target.device();
    let want_logits = logits(&model());
    let mut want_model = model();
    let want_vars = want_model.make_trainable(|_| true).unwrap();
    let want_g = loss(&want_model).backward().unwrap();
    target.run(|| {
        let mut m = model()
            .to_device(&dev)
            .unwrap()
            .with_compute_dtype(DType::BF16);
        assert_eq!(m.master_dtype(), DType::F32);
        let d = rel_diff(&logits(&m), &want_logits);
        assert!(d < 3e-2, "{}: bf16 logits differ by {d}", target.name());
        let reference = m.frozen_copy().unwrap();
        assert!(reference.params.values().all(|t| t.dtype() == DType::BF16));
        let vars = m.make_trainable(|_| true).unwrap();
        let l = loss(&m);
        assert_eq!(l.dtype(), DType::F32, "the loss is computed in f32");
        let g = l.backward().unwrap();
        let max_norm = want_vars
            .iter()
            .map(|(_, v)| {
                let w = host(want_g.get(v.as_tensor()).unwrap());
                w.iter().map(|x| x * x).sum::<f32>().sqrt()
            })
            .fold(0f32, f32::max);
        for ((k, v), (_, wv)) in vars.iter().zip(&want_vars) {
            assert_eq!(v.dtype(), DType::F32, "{k}: master weight not f32");
            let gv = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{k}: no grad"));
            assert_eq!(gv.dtype(), DType::F32, "{k}: gradient not f32");
            let (got, want) = (host(gv), host(want_g.get(wv.as_tensor()).unwrap()));
            // Relative to the gradient itself, or to the largest one for gradients that
            // are tiny here (the last layer's queries and keys: near-uniform attention
            // at init), where bf16 rounding of the activations decides the direction.
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let tol = (0.1 * norm(&want)).max(1e-3 * max_norm);
            assert!(
                norm(&diff) < tol,
                "{}: {k}: bf16 gradient off by {} (|f32 grad| {}, cosine {:.4})",
                target.name(),
                norm(&diff),
                norm(&want),
                cosine(&got, &want)
            );
        }
    });
}

fn tokenizer() -> cal_model::tokenizer::TokenizerBundle {
    let corpus = (0..200).map(|i| {
        format!(
            "Question: what is {i} plus {}?\nAnswer: {}",
            i + 3,
            2 * i + 3
        )
    });
    tokenizer::train_tiny(corpus, 97).unwrap()
}

/// Greedy generation on the target (device sampling, preallocated cache) gives the
/// CPU's tokens, and temperature sampling runs there.
fn check_generation(target: &Target) {
    let tok = tokenizer();
    let mut cfg = config();
    cfg.vocab_size = tok.tokenizer.get_vocab_size(true);
    let cpu = Transformer::init_random(cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = ["Question: what is 4", "Question: what"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let greedy = SamplingConfig {
        max_new_tokens: 12,
        greedy: true,
        ..SamplingConfig::default()
    };
    let mut rng = rand::rng();
    let want = generate(&cpu, &tok, &prompts, &greedy, &mut rng).unwrap();
    target.run(|| {
        let m = cpu.to_device(&target.device()).unwrap();
        let got = generate(&m, &tok, &prompts, &greedy, &mut rng).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.ids, w.ids, "{}: greedy tokens differ", target.name());
        }
        let sampled = SamplingConfig {
            temperature: 0.8,
            greedy: false,
            ..greedy.clone()
        };
        let got = generate(&m, &tok, &prompts, &sampled, &mut rng).unwrap();
        assert!(got.iter().all(|g| !g.ids.is_empty()));
    });
}

/// The device sampler: argmax when greedy; otherwise frequencies that match
/// `softmax(x / T)` (4 000 rows of the same logits, each cell within 5 standard errors).
fn check_device_sampler(target: &Target) {
    let dev = target.device();
    let mut rng = rand::rng();
    let row = [1.0f32, 0.0, 2.0, -1.0, 0.5];
    let t = 0.7;
    let n = 4000;
    let logits = Tensor::from_vec(row.repeat(n), (n, row.len()), &dev).unwrap();
    let greedy = SamplingConfig {
        greedy: true,
        ..SamplingConfig::default()
    };
    let ids = sample_on_device(&logits, &greedy, &mut rng)
        .unwrap()
        .unwrap();
    assert!(ids.iter().all(|&i| i == 2));
    let cfg = SamplingConfig {
        temperature: t,
        ..SamplingConfig::default()
    };
    let ids = sample_on_device(&logits, &cfg, &mut rng).unwrap().unwrap();
    let z: f64 = row.iter().map(|&x| (f64::from(x) / t).exp()).sum();
    for (i, &x) in row.iter().enumerate() {
        let p = (f64::from(x) / t).exp() / z;
        let freq = ids.iter().filter(|&&j| j as usize == i).count() as f64 / n as f64;
        let se = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (freq - p).abs() < 5.0 * se,
            "{}: token {i}: frequency {freq:.4}, probability {p:.4}",
            target.name()
        );
    }
    let top_k = SamplingConfig {
        top_k: 2,
        ..cfg.clone()
    };
    assert!(sample_on_device(&logits, &top_k, &mut rng)
        .unwrap()
        .is_none());
}

#[test]
fn portable_logits_match_the_cpu_kernels() {
    check_logits_f32(&Target::Portable);
}

#[test]
fn portable_gradients_match_the_cpu_kernels() {
    check_gradients_f32(&Target::Portable);
}

#[test]
fn portable_mixed_precision_keeps_f32_masters_and_loss() {
    check_mixed_precision(&Target::Portable);
}

#[test]
fn portable_generation_samples_on_the_device() {
    check_generation(&Target::Portable);
}

#[test]
fn device_sampler_follows_the_softmax() {
    check_device_sampler(&Target::Portable);
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_logits_match_the_cpu() {
    if let Some(t) = cuda() {
        check_logits_f32(&t);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_gradients_match_the_cpu() {
    if let Some(t) = cuda() {
        check_gradients_f32(&t);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_mixed_precision_bf16() {
    if let Some(t) = cuda() {
        check_mixed_precision(&t);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_generation_matches_the_cpu() {
    if let Some(t) = cuda() {
        check_generation(&t);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "GPU group: needs --features cuda")]
fn cuda_device_sampler_follows_the_softmax() {
    if let Some(t) = cuda() {
        check_device_sampler(&t);
    }
}
