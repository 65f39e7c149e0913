//! Gradients through the training path: every parameter gets one, and they agree with
//! f64 central differences.

mod common;

use cal_model::generate::{build_batch, completion_logprobs};
use cal_model::{Forward, LoraConfig, Transformer};
use candle_core::{DType, Device, Tensor, Var};
use common::small;

/// A fixed weighted sum of completion log-probs over a ragged, left-padded batch.
fn loss(model: &Transformer) -> Tensor {
    loss_with(model, Forward::INFERENCE)
}

fn loss_with(model: &Transformer, fwd: Forward) -> Tensor {
    let prompts = vec![vec![1, 2, 3], vec![4, 5], vec![7]];
    let completions = vec![vec![6, 7, 8, 9], vec![10, 11], vec![12, 13, 14]];
    let batch = build_batch(&prompts, &completions, 0, &model.device).unwrap();
    let (logp, _) = completion_logprobs(model, &batch, fwd).unwrap();
    let (b, t) = logp.dims2().unwrap();
    let w: Vec<f64> = (0..b * t)
        .map(|i| {
            if batch.completion_mask[i / t][i % t] == 1 {
                0.3 + (i % 5) as f64 * 0.17
            } else {
                0.0
            }
        })
        .collect();
    let w = Tensor::from_vec(w, (b, t), &model.device)
        .unwrap()
        .to_dtype(logp.dtype())
        .unwrap();
    (logp * w).unwrap().sum_all().unwrap()
}

/// Sets every norm weight and bias to `value`: non-trivial, so that their gradients
/// and effects are not degenerate.
fn set_norms_and_biases(m: &mut Transformer, value: f64) {
    for (k, t) in m.params.iter_mut() {
        if k.ends_with("norm.weight") || k.ends_with(".bias") {
            *t = (t.ones_like().unwrap() * value).unwrap();
        }
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    for arch in ["llama", "qwen2", "qwen3"] {
        let mut m = Transformer::init_random(small(arch), 1, DType::F32, &dev).unwrap();
        set_norms_and_biases(&mut m, 1.1);
        let vars = m.make_trainable(|_| true).unwrap();
        let grads = loss(&m).backward().unwrap();
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{arch}: {name} has no gradient"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{arch}: {name} gradient is zero");
        }
    }
}

#[test]
fn lora_dropout_is_seeded_and_only_on_while_training() {
    let dev = Device::Cpu;
    let with = |dropout: f64| {
        let mut m = Transformer::init_random(small("llama"), 2, DType::F32, &dev).unwrap();
        m.add_lora(
            LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout,
                targets: vec!["q_proj".into(), "v_proj".into()],
            },
            3,
        )
        .unwrap();
        // non-zero B so that the adapters (and their dropout) change the output
        for (k, t) in m.params.iter_mut() {
            if k.ends_with("lora_B") {
                *t = (t.ones_like().unwrap() * 0.05).unwrap();
            }
        }
        m
    };
    let plain = loss(&with(0.0)).to_scalar::<f32>().unwrap();
    let m = with(0.5);
    assert_eq!(
        loss(&m).to_scalar::<f32>().unwrap(),
        plain,
        "no seed = eval mode"
    );
    let train = |seed| {
        loss_with(&m, Forward::training(seed))
            .to_scalar::<f32>()
            .unwrap()
    };
    let a = train(1);
    assert_eq!(a, train(1), "same seed, same masks");
    assert_ne!(a, plain);
    assert_ne!(a, train(2), "another seed, other masks");
    let err = Transformer::init_random(small("llama"), 2, DType::F32, &dev)
        .unwrap()
        .add_lora(
            LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 1.0,
                targets: vec!["q_proj".into()],
            },
            3,
        )
        .unwrap_err();
    assert!(err.to_string().contains("dropout"), "{err}");
}

#[test]
fn dropout_mask_has_the_right_rate_and_scale() {
    let shape = candle_core::Shape::from((100, 200));
    let m = cal_model::ops::dropout_mask(&shape, 0.25, 9, "q_proj", &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let zeros = m.iter().filter(|&&x| x == 0.0).count() as f64 / m.len() as f64;
    assert!((zeros - 0.25).abs() < 0.02, "zero fraction {zeros}");
    let mean = m.iter().map(|&x| f64::from(x)).sum::<f64>() / m.len() as f64;
    assert!(
        (mean - 1.0).abs() < 0.03,
        "inverted dropout keeps the mean: {mean}"
    );
    assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
}

#[test]
fn lora_gradients_reach_only_adapters() {
    let dev = Device::Cpu;
    let mut m = Transformer::init_random(small("llama"), 2, DType::F32, &dev).unwrap();
    m.add_lora(
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        },
        3,
    )
    .unwrap();
    let vars = m.make_trainable(|k| k.contains(".lora_")).unwrap();
    assert_eq!(vars.len(), 2 * 2 * 2);
    let before = loss(&m).to_scalar::<f32>().unwrap();
    let base = loss_with(&m, Forward::BASE).to_scalar::<f32>().unwrap();
    assert_eq!(before, base, "B = 0: a fresh adapter is a no-op");
    let grads = loss(&m).backward().unwrap();
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // With B = 0 only B receives gradient (dL/dA = B^T ... = 0).
        if name.ends_with("lora_B") {
            assert!(n > 0.0, "{name}");
        }
    }
}

fn finite_difference_check(arch: &str) {
    let dev = Device::Cpu;
    let mut m = Transformer::init_random(small(arch), 7, DType::F64, &dev).unwrap();
    // scale weights up so the function is far from linear and the check means something
    for (k, t) in m.params.iter_mut() {
        if !k.ends_with("norm.weight") {
            *t = (&*t * 20.0).unwrap();
        }
    }
    let vars = m.make_trainable(|_| true).unwrap();
    let grads = loss(&m).backward().unwrap();
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for (name, var) in vars.iter() {
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
        // a few entries per tensor, including the largest-gradient one
        let argmax = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        for &i in &[0, base.len() / 2, base.len() - 1, argmax] {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                set(var, &p);
                loss(&m).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            set(var, &base);
            let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-3);
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{arch} {name}[{i}]: analytic {} vs numeric {fd} (rel err {err:e})",
                g[i]
            );
        }
    }
    eprintln!("{arch}: worst relative error {worst:e}");
}

fn set(var: &Var, data: &[f64]) {
    let t = Tensor::from_vec(
        data.to_vec(),
        var.as_tensor().shape(),
        var.as_tensor().device(),
    )
    .unwrap();
    var.set(&t).unwrap();
}

#[test]
fn finite_differences_llama() {
    finite_difference_check("llama");
}

#[test]
fn finite_differences_qwen2_bias() {
    finite_difference_check("qwen2");
}

#[test]
fn finite_differences_qwen3_qk_norm() {
    finite_difference_check("qwen3");
}

#[test]
fn kv_cache_does_not_hold_the_graph_of_a_trainable_policy() {
    // A cached key that tracks its ops would keep every prefill activation alive while
    // decoding (this OOM-killed a SmolLM2 run before the cache was detached).
    let dev = Device::Cpu;
    let mut m = Transformer::init_random(small("llama"), 1, DType::F32, &dev).unwrap();
    let _vars = m.make_trainable(|_| true).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2]], &dev).unwrap();
    let mut cache = cal_model::KvCache::new(2);
    let h = m
        .forward_hidden(
            &ids,
            &pos,
            &[vec![1, 1, 1]],
            Some(&mut cache),
            Forward::INFERENCE,
        )
        .unwrap();
    assert!(h.track_op(), "the forward itself stays differentiable");
    for (k, v) in cache.layers.iter().flatten() {
        assert!(!k.track_op() && !v.track_op());
    }
}

/// The fused vocabulary kernels against the differentiable composition of `compose`
/// (itself checked by finite differences above): values, gradients and entropy.
#[test]
fn fused_token_logprobs_match_the_composition() {
    use cal_model::vocab;
    let dev = Device::Cpu;
    let (b, t, v) = (3, 5, 37);
    let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (b, t, v), &dev).unwrap())).unwrap();
    let y: Vec<u32> = (0..(b * t) as u32)
        .map(|i| (i * 7 + 3) % v as u32)
        .collect();
    let y = Tensor::from_vec(y, (b, t), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (b, t), &dev).unwrap();
    let fused_lp = vocab::token_logprobs(x.as_tensor(), &y).unwrap();
    let reference = cal_model::compose::log_softmax_last_dim(x.as_tensor())
        .unwrap()
        .gather(&y.unsqueeze(2).unwrap(), 2)
        .unwrap()
        .squeeze(2)
        .unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len());
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "{what}[{i}]: {p} vs {q}"
            );
        }
    };
    close(&flat(&fused_lp), &flat(&reference), "logp");
    let g_fused = (fused_lp * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_ref = (reference * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    close(
        &flat(g_fused.get(x.as_tensor()).unwrap()),
        &flat(g_ref.get(x.as_tensor()).unwrap()),
        "grad",
    );
    let lp = cal_model::compose::log_softmax_last_dim(x.as_tensor()).unwrap();
    let h_ref = (lp.exp().unwrap() * &lp)
        .unwrap()
        .sum(2)
        .unwrap()
        .neg()
        .unwrap();
    close(
        &flat(&vocab::entropy(x.as_tensor()).unwrap()),
        &flat(&h_ref),
        "entropy",
    );
    // a shape mismatch is an error, not a silent broadcast
    let bad = Tensor::zeros((b, t + 1), DType::U32, &dev).unwrap();
    assert!(vocab::token_logprobs(x.as_tensor(), &bad).is_err());
}

/// The inference path (candle-nn's fused RMSNorm/RoPE/softmax, the small-batch matmul)
/// computes the same function as the differentiable one, on every architecture, over a
/// left-padded batch; and a trainable policy never takes it.
#[test]
fn fused_inference_path_matches_the_training_path() {
    use cal_model::ops::Kernels;
    let dev = Device::Cpu;
    for arch in ["llama", "qwen2", "qwen3"] {
        let mut m = Transformer::init_random(small(arch), 3, DType::F32, &dev).unwrap();
        set_norms_and_biases(&mut m, 1.3);
        assert_eq!(Kernels::for_params(m.params.values()), Kernels::Inference);
        let ids = Tensor::new(&[[0u32, 0, 5, 6], [1, 2, 3, 4]], &dev).unwrap();
        let mask = vec![vec![0u8, 0, 1, 1], vec![1, 1, 1, 1]];
        let exact = m.forward(&ids, &mask).unwrap();
        m.fast_inference = true;
        let fused = m.forward(&ids, &mask).unwrap();
        let diff = (fused - &exact)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-5,
            "{arch}: fused vs differentiable logits differ by {diff}"
        );
        // A trainable policy never takes the fused kernels, even when asked to.
        let _vars = m.make_trainable(|k| k.ends_with("q_proj.weight")).unwrap();
        assert_eq!(
            Kernels::for_params(m.params.values()),
            Kernels::Differentiable
        );
        let trained = m.forward(&ids, &mask).unwrap();
        assert!(
            trained.track_op(),
            "{arch}: no graph through the trainable policy"
        );
        // Token-by-token decoding on a detached view (fused kernels, small-batch
        // matmul, KV cache grown by concatenation, preallocated, or outgrown)
        // reproduces the full forward's last logits.
        let mut view = m.detached().unwrap();
        view.fast_inference = true;
        let want = exact.narrow(1, 3, 1).unwrap();
        let mut diff = 0f32;
        for capacity in [0, 2, 8] {
            let mut cache = cal_model::KvCache::with_capacity(view.cfg.num_hidden_layers, capacity);
            let mut last = None;
            for s in 0..4 {
                let step_ids = ids.narrow(1, s, 1).unwrap();
                let step_mask: Vec<Vec<u8>> = mask.iter().map(|r| vec![r[s]]).collect();
                let pos: Vec<u32> = mask
                    .iter()
                    .map(|r| r[..s].iter().map(|&x| u32::from(x)).sum())
                    .collect();
                let pos = Tensor::from_vec(pos, (2, 1), &dev).unwrap();
                let h = view
                    .forward_hidden(
                        &step_ids,
                        &pos,
                        &step_mask,
                        Some(&mut cache),
                        Forward::INFERENCE,
                    )
                    .unwrap();
                last = Some(view.logits(&h).unwrap());
            }
            let d = (last.unwrap() - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            diff = diff.max(d);
        }
        assert!(diff < 1e-5, "{arch}: cached decoding differs by {diff}");
    }
}

/// The row-wise kernels (one pass forward, hand-written backward) against the
/// differentiable compositions in `compose`, in f64: values and the gradients of every
/// input, for RMSNorm (x and weight) and softmax (with a masked, all-equal row).
#[test]
fn rowwise_kernels_match_the_compositions() {
    use cal_model::{compose, rowwise};
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (3, 5, 67), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f64, 0.3, 67, &dev).unwrap()).unwrap();
    let probe = Tensor::randn(0f64, 1.0, (3, 5, 67), &dev).unwrap();
    let run = |y: Tensor| {
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        (y, g(&x), g(&w))
    };
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let (a, b) = (flat(a), flat(b));
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                (p - q).abs() <= 1e-12 * (1.0 + q.abs()),
                "{what}[{i}]: {p} vs {q}"
            );
        }
    };
    let fused = run(rowwise::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap());
    let reference = run(compose::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap());
    close(&fused.0, &reference.0, "rms_norm");
    close(&fused.1, &reference.1, "rms_norm dx");
    close(&fused.2, &reference.2, "rms_norm dw");

    // Softmax of x·w (so that w gets a gradient through it too), one row all masked.
    let masked = Tensor::from_vec(
        (0..3 * 5 * 67)
            .map(|i| if i < 67 { -1e9 } else { 0.0 })
            .collect::<Vec<f64>>(),
        (3, 5, 67),
        &dev,
    )
    .unwrap();
    let keep = (masked.ones_like().unwrap() - (&masked / -1e9).unwrap()).unwrap();
    let logits = || {
        x.as_tensor()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .mul(&keep)
            .unwrap()
            .add(&masked)
            .unwrap()
    };
    let fused = run(rowwise::softmax_last_dim(&logits()).unwrap());
    let reference = run(compose::softmax_last_dim(&logits()).unwrap());
    close(&fused.0, &reference.0, "softmax");
    close(&fused.1, &reference.1, "softmax dx");
    close(&fused.2, &reference.2, "softmax dw");
    let first: Vec<f64> = flat(&fused.0)[..67].to_vec();
    assert!(
        first.iter().all(|p| (p - 1.0 / 67.0).abs() < 1e-12),
        "masked row is uniform"
    );

    // A frozen weight gets no gradient and costs no reduction; f32 takes the kernel too.
    let x32 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 16), &dev).unwrap()).unwrap();
    let w32 = Tensor::ones(16, DType::F32, &dev).unwrap();
    let g = rowwise::rms_norm(x32.as_tensor(), &w32, 1e-6)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(x32.as_tensor()).is_some() && g.get(&w32).is_none());
    let bad = rowwise::rms_norm(
        x32.as_tensor(),
        &Tensor::ones(3, DType::F32, &dev).unwrap(),
        1e-6,
    );
    assert!(bad.unwrap_err().to_string().contains("does not match"));
}

/// Normal samples with standard deviation `std`, drawn in f32 and cast to `dtype` (so
/// the f32 and f64 runs of a test see the same numbers).
fn randn(std: f32, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor's values as f64, exactly (f32 widens without rounding).
fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `y`'s values and the gradients of `sum(y ⊙ probe)` with respect to `wrt`.
fn values_and_grads(y: &Tensor, probe: &Tensor, wrt: &[&Var]) -> Vec<Vec<f64>> {
    let g = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    std::iter::once(values(y))
        .chain(wrt.iter().map(|v| values(g.get(v.as_tensor()).unwrap())))
        .collect()
}

/// The fused RoPE kernel against the composition in `ops`: the same bits forward and
/// backward, in f32 and f64 (it does the same floating-point operations in the same
/// order, so a training run does not change by switching).
#[test]
fn rope_kernel_matches_the_composition_bit_for_bit() {
    use cal_model::{compose, rowwise};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&randn(1.5, &[2, 3, 5, 8], dtype)).unwrap();
        // Per-row positions (the second row left-padded), halves duplicated.
        let pos = Tensor::new(&[[0f32, 1., 2., 3., 4.], [0., 0., 0., 1., 2.]], &dev).unwrap();
        let inv_freq = Tensor::new(&[1f32, 0.1, 0.01, 0.001], &dev).unwrap();
        let angles = pos.unsqueeze(2).unwrap().broadcast_mul(&inv_freq).unwrap();
        let angles = Tensor::cat(&[&angles, &angles], 2)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let (cos, sin) = (
            angles.cos().unwrap().to_dtype(dtype).unwrap(),
            angles.sin().unwrap().to_dtype(dtype).unwrap(),
        );
        let probe = randn(1.0, &[2, 3, 5, 8], dtype);
        let run = |y: Tensor| values_and_grads(&y, &probe, &[&x]);
        let fused = run(rowwise::rope(x.as_tensor(), &cos, &sin).unwrap());
        let reference = run(compose::rope(x.as_tensor(), &cos, &sin).unwrap());
        assert_eq!(fused[0], reference[0], "{dtype:?} rope values");
        assert_eq!(fused[1], reference[1], "{dtype:?} rope gradient");
        // And it is a rotation: norms of each (j, j + D/2) pair are kept.
        let xs = values(x.as_tensor());
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((norm(&fused[0]) - norm(&xs)).abs() < 1e-4 * norm(&xs));
    }
}

/// The fused SwiGLU gate against candle's `silu(gate) * up`: the same bits forward and
/// for both gradients, in f32 and f64, over a range that reaches SiLU's flat tails.
#[test]
fn swiglu_kernel_matches_candle_silu_bit_for_bit() {
    use cal_model::rowwise;
    for dtype in [DType::F32, DType::F64] {
        let var = |std: f32| Var::from_tensor(&randn(std, &[3, 7, 45], dtype)).unwrap();
        let (gate, up) = (var(6.0), var(1.0));
        let probe = randn(1.0, &[3, 7, 45], dtype);
        let run = |y: Tensor| values_and_grads(&y, &probe, &[&gate, &up]);
        let fused = run(rowwise::swiglu(gate.as_tensor(), up.as_tensor()).unwrap());
        let reference = run((gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap());
        for (i, what) in ["values", "d gate", "d up"].iter().enumerate() {
            assert_eq!(fused[i], reference[i], "{dtype:?} swiglu {what}");
        }
    }
}

/// The masked softmax of attention (the additive mask folded into the kernel) against
/// the broadcast sum followed by the softmax kernel: the same bits, values and gradient,
/// with a causal mask, a left-padded row and a fully masked (padding) query.
#[test]
fn masked_softmax_matches_the_broadcast_sum_bit_for_bit() {
    use cal_model::{ops, rowwise};
    let dev = Device::Cpu;
    let mask = vec![vec![1u8; 6], vec![0, 0, 1, 1, 1, 1]];
    for dtype in [DType::F32, DType::F64] {
        let scores = Var::from_tensor(&randn(3.0, &[2, 3, 6, 6], dtype)).unwrap();
        let bias = ops::attention_bias(&mask, 6, 0, dtype, &dev).unwrap();
        let probe = randn(1.0, &[2, 3, 6, 6], dtype);
        let run = |y: Tensor| values_and_grads(&y, &probe, &[&scores]);
        let fused = run(rowwise::masked_softmax(scores.as_tensor(), &bias).unwrap());
        let reference = run(rowwise::softmax_last_dim(
            &scores.as_tensor().broadcast_add(&bias).unwrap(),
        )
        .unwrap());
        assert_eq!(fused[0], reference[0], "{dtype:?} masked softmax values");
        assert_eq!(fused[1], reference[1], "{dtype:?} masked softmax gradient");
        // Row (b=1, query 0) sees no key at all: uniform in f32, as documented (the
        // −1e9 bias swallows the scores).
        if dtype == DType::F32 {
            assert!(fused[0][3 * 36..3 * 36 + 6]
                .iter()
                .all(|p| (p - 1.0 / 6.0).abs() < 1e-6));
        }
    }
}
