//! `cal-grpo bench model`: generation throughput, training-step time, reference
//! log-prob pass and achieved GFLOP/s against a plain f32 matmul measured in the same
//! run. Each measurement is repeated, interleaved with the matmul reference, and the
//! median is reported, so a noisy neighbour shows up as spread rather than as a wrong
//! number.

use crate::adamw::{AdamW, OptimConfig};
use crate::policy::Policy;
use anyhow::Result;
use cal_model::bench::median;
use cal_model::generate::{build_batch, completion_logprobs, generate, SamplingConfig};
use cal_model::tokenizer::TokenizerBundle;
use cal_model::Forward;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub model: String,
    pub params: usize,
    pub gen_tokens_per_s: f64,
    pub train_step_s: f64,
    pub train_gflops: f64,
    pub ref_pass_s: f64,
    pub matmul_gflops: f64,
    pub train_vs_matmul: f64,
    pub peak_rss_mib: f64,
    pub repeats: usize,
    pub spread: String,
}

pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// GFLOP/s of one `[m, k] × [k, n]` matmul on `dev` in `dtype` (median of `reps`).
pub fn matmul_gflops(
    m: usize,
    k: usize,
    n: usize,
    reps: usize,
    dev: &Device,
    dtype: DType,
) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), dev)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    dev.synchronize()?;
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let _ = a.matmul(&b).unwrap();
            // a GPU queues the product: time it to completion
            dev.synchronize().unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    Ok(2.0 * (m * k * n) as f64 / median(times) / 1e9)
}

/// The fixed prompt of the generation measurements (also used by `bench/hf_generate.py`).
pub const GEN_PROMPT: &str =
    "Question: Mia has 12 apples. She buys 7 more. How many apples does she have?\nAnswer:";

/// Sampling settings of the generation measurement: plain temperature-1 sampling, and
/// the tokenizer's EOS ids cleared so that every row yields exactly `new_tokens`.
fn gen_setup(policy: &Policy, new_tokens: usize) -> (SamplingConfig, TokenizerBundle) {
    let cfg = SamplingConfig {
        max_new_tokens: new_tokens,
        temperature: 1.0,
        stop_tokens: Vec::new(),
        ..SamplingConfig::default()
    };
    let mut tok = policy.tok.clone();
    tok.eos_ids = vec![u32::MAX];
    (cfg, tok)
}

/// Generation throughput alone (tokens/s of `batch` rows × `new_tokens`): median and
/// every measurement, after one warm-up round.
pub fn bench_generation(
    policy: &Policy,
    batch: usize,
    new_tokens: usize,
    repeats: usize,
    share_prompts: bool,
) -> Result<(f64, Vec<f64>)> {
    let prompts = vec![policy.tok.encode(GEN_PROMPT)?; batch];
    let (mut cfg, tok) = gen_setup(policy, new_tokens);
    cfg.share_prompts = share_prompts;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tps = Vec::new();
    for r in 0..repeats + 1 {
        let t = Instant::now();
        let out = generate(&policy.model, &tok, &prompts, &cfg, &mut rng)?;
        let n: usize = out.iter().map(|g| g.ids.len()).sum();
        if r > 0 {
            tps.push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok((median(tps.clone()), tps))
}

/// Benchmarks `policy`: generation (batch × new_tokens), a training step on
/// `batch × seq` tokens (forward + backward + AdamW) and a reference pass.
pub fn bench_policy(
    name: &str,
    policy: &mut Policy,
    batch: usize,
    new_tokens: usize,
    seq: usize,
    repeats: usize,
) -> Result<BenchRow> {
    let (dev, dtype) = (policy.model.device.clone(), policy.model.dtype);
    let params = policy.model.cfg.num_params();
    let h = policy.model.cfg.hidden_size;
    let prompts = vec![policy.tok.encode(GEN_PROMPT)?; batch];
    let (gen_cfg, tok_no_eos) = gen_setup(policy, new_tokens);
    let half = seq / 2;
    let p_ids: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            (0..half)
                .map(|j| ((i * 7 + j * 3) % 200 + 10) as u32)
                .collect()
        })
        .collect();
    let c_ids: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            (0..seq - half)
                .map(|j| ((i * 5 + j * 11) % 200 + 10) as u32)
                .collect()
        })
        .collect();
    let sb = build_batch(&p_ids, &c_ids, policy.tok.pad_id, &dev)?;
    let reference = policy.model.frozen_copy()?;
    let vars = policy.model.make_trainable(|_| true)?;
    let mut opt = AdamW::new(
        vars,
        OptimConfig {
            lr: 1e-7,
            ..Default::default()
        },
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut gen_tps, mut step_s, mut ref_s, mut mm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..repeats + 1 {
        // A/B interleaved: the matmul reference runs between the model measurements
        let m = matmul_gflops(batch * seq, h, 4 * h, 3, &dev, dtype)?;
        let t = Instant::now();
        let out = generate(&policy.model, &tok_no_eos, &prompts, &gen_cfg, &mut rng)?;
        let gen = t.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|g| g.ids.len()).sum();
        let t = Instant::now();
        let (lp, _) = completion_logprobs(&policy.model, &sb, Forward::training(0))?;
        let loss = (lp.sum_all()? * -1e-3)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-7)?;
        dev.synchronize()?;
        let st = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = completion_logprobs(&reference, &sb, Forward::INFERENCE)?
            .0
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let rs = t.elapsed().as_secs_f64();
        if r > 0 {
            // the first round warms caches and the allocator
            gen_tps.push(n as f64 / gen);
            step_s.push(st);
            ref_s.push(rs);
            mm.push(m);
        }
    }
    let step = median(step_s.clone());
    let tokens = (batch * seq) as f64;
    let train_gflops = 6.0 * params as f64 * tokens / step / 1e9;
    let matmul = median(mm);
    let (lo, hi) = (
        step_s.iter().copied().fold(f64::INFINITY, f64::min),
        step_s.iter().copied().fold(0.0, f64::max),
    );
    Ok(BenchRow {
        model: name.into(),
        params,
        gen_tokens_per_s: median(gen_tps),
        train_step_s: step,
        train_gflops,
        ref_pass_s: median(ref_s),
        matmul_gflops: matmul,
        train_vs_matmul: train_gflops / matmul,
        peak_rss_mib: peak_rss_mib(),
        repeats,
        spread: format!("step {lo:.2}–{hi:.2}s"),
    })
}

pub fn table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| model | params | gen tok/s (batch 8) | train step (s) | train GFLOP/s | ref pass (s) | matmul GFLOP/s | train / matmul | peak RSS (MiB) | spread |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1}M | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {:.0}% | {:.0} | {} |\n",
            r.model,
            r.params as f64 / 1e6,
            r.gen_tokens_per_s,
            r.train_step_s,
            r.train_gflops,
            r.ref_pass_s,
            r.matmul_gflops,
            100.0 * r.train_vs_matmul,
            r.peak_rss_mib,
            r.spread
        ));
    }
    s
}

/// One side of [`bench_train_step`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRow {
    pub product: &'static str,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    /// All measured step times, s.
    pub steps: Vec<f64>,
}

/// The training step (forward + backward + AdamW on `batch × seq` tokens) with the
/// linear layers on candle's gemm and on OpenBLAS, alternating each round, and the
/// best f32 GEMM rate of either library on a 2048³ product measured between rounds
/// (the normaliser). Returns both sides and that rate.
pub fn bench_train_step(
    policy: &mut Policy,
    batch: usize,
    seq: usize,
    rounds: usize,
) -> Result<(Vec<StepRow>, f64)> {
    use cal_model::blas;
    anyhow::ensure!(
        blas::compiled(),
        "bench step compares candle with OpenBLAS: build with `--features openblas`"
    );
    let dev = policy.model.device.clone();
    let params = policy.model.cfg.num_params();
    let half = seq / 2;
    let ids = |a: usize, b: usize, len: usize| -> Vec<Vec<u32>> {
        (0..batch)
            .map(|i| {
                (0..len)
                    .map(|j| ((i * a + j * b) % 200 + 10) as u32)
                    .collect()
            })
            .collect()
    };
    let sb = build_batch(
        &ids(7, 3, half),
        &ids(5, 11, seq - half),
        policy.tok.pad_id,
        &dev,
    )?;
    let vars = policy.model.make_trainable(|_| true)?;
    let mut opt = AdamW::new(
        vars,
        OptimConfig {
            lr: 1e-7,
            ..Default::default()
        },
    )?;
    let step = |opt: &mut AdamW| -> Result<f64> {
        let t = Instant::now();
        let (lp, _) = completion_logprobs(&policy.model, &sb, Forward::training(0))?;
        let grads = (lp.sum_all()? * -1e-3)?.backward()?;
        opt.step(&grads, 1e-7)?;
        policy.model.device.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let square = |on: bool| -> Result<f64> {
        blas::set_enabled(on);
        let a = Tensor::randn(0f32, 1.0, (2048, 2048), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (2048, 2048), &Device::Cpu)?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            cal_model::ops::linear(&a, &w, None)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * 2048f64.powi(3) / best / 1e9)
    };
    let (mut times, mut best_gemm) = ([Vec::new(), Vec::new()], 0f64);
    for r in 0..rounds + 1 {
        for (side, on) in [false, true].into_iter().enumerate() {
            best_gemm = best_gemm.max(square(on)?);
            blas::set_enabled(on);
            let s = step(&mut opt)?;
            if r > 0 {
                // round 0 warms caches, the allocator and OpenBLAS's buffers
                times[side].push(s);
            }
        }
    }
    blas::set_enabled(true);
    let tokens = (batch * seq) as f64;
    let rows = ["candle gemm", "OpenBLAS"]
        .into_iter()
        .zip(times)
        .map(|(product, steps)| {
            let s = median(steps.clone());
            StepRow {
                product,
                step_s: s,
                tokens_per_s: tokens / s,
                gflops: 6.0 * params as f64 * tokens / s / 1e9,
                steps,
            }
        })
        .collect();
    Ok((rows, best_gemm))
}
