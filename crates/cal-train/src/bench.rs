//! `cal-grpo bench model`: generation throughput, training-step time, reference
//! log-prob pass and achieved GFLOP/s against a plain f32 matmul measured in the same
//! run. Each measurement is repeated, interleaved with the matmul reference, and the
//! median is reported, so a noisy neighbour shows up as spread rather than as a wrong
//! number.

use crate::policy::Policy;
use crate::update::{AdamW, OptimConfig};
use anyhow::Result;
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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median wall time of `calls` calls of `f`, after one untimed warm-up call.
fn median_time<T>(calls: usize, f: &dyn Fn() -> Result<T>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
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
) -> Result<(f64, Vec<f64>)> {
    let prompts = vec![policy.tok.encode(GEN_PROMPT)?; batch];
    let (cfg, tok) = gen_setup(policy, new_tokens);
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

/// One row of `cal-grpo bench kernels`: a decoding-step product `[m, k] × [k, n]`
/// through candle's matmul (gemm) and through [`cal_model::gemv`], alternately.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelRow {
    pub shape: String,
    pub gemm_ms: f64,
    pub gemv_ms: f64,
    /// Weight bytes streamed per second, GB/s.
    pub gemm_gbs: f64,
    pub gemv_gbs: f64,
    /// Largest |gemv − gemm| relative to the largest |gemm| value.
    pub rel_diff: f64,
}

/// Decoding-step products of SmolLM2's shapes (batch 8): the vocabulary product and
/// the per-layer ones, each measured `rounds` times alternating gemm and the
/// small-batch kernel (median of 9 calls per round), plus a streaming reference: the
/// GB/s of summing a 1 GiB tensor. The layer weights fit in L2/L3 when called in a
/// loop, so only the vocabulary product (113 MB) shows the memory-bound rate.
pub fn bench_kernels(rounds: usize) -> Result<(f64, Vec<KernelRow>)> {
    let dev = Device::Cpu;
    let time = |f: &dyn Fn() -> Result<Tensor>| median_time(9, f);
    let big = Tensor::ones(256 << 20, DType::F32, &dev)?;
    let stream = (0..3)
        .map(|_| {
            let t = Instant::now();
            big.sum_all()?.to_scalar::<f32>()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?;
    let stream_gbs = (1u64 << 30) as f64 / median(stream) / 1e9;
    drop(big);
    let mut rows = Vec::new();
    for (n, k) in [
        (49152, 576),
        (1536, 576),
        (576, 1536),
        (576, 576),
        (192, 576),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (8, k), &dev)?;
        let gemm = || -> Result<Tensor> { Ok(x.matmul(&w.t()?)?) };
        let gemv = || -> Result<Tensor> { Ok(cal_model::gemv::matmul_nt(&x, &w)?) };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            a.push(time(&gemm)?);
            b.push(time(&gemv)?);
        }
        let want = x.matmul(&w.t()?)?;
        let got = cal_model::gemv::matmul_nt(&x, &w)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let bytes = (n * k * 4) as f64 / 1e9;
        let (ga, gb) = (median(a), median(b));
        rows.push(KernelRow {
            shape: format!("[8, {k}] x [{k}, {n}]"),
            gemm_ms: ga * 1e3,
            gemv_ms: gb * 1e3,
            gemm_gbs: bytes / ga,
            gemv_gbs: bytes / gb,
            rel_diff: f64::from(diff / scale),
        });
    }
    Ok((stream_gbs, rows))
}

pub fn kernel_table(stream_gbs: f64, rows: &[KernelRow]) -> String {
    let mut s = String::from(
        "| decoding product (f32) | gemm ms | small-batch kernel ms | gemm GB/s | kernel GB/s | speed-up | max rel. diff |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.2}x | {:.1e} |\n",
            r.shape,
            r.gemm_ms,
            r.gemv_ms,
            r.gemm_gbs,
            r.gemv_gbs,
            r.gemm_ms / r.gemv_ms,
            r.rel_diff
        );
    }
    s + &format!("\nstreaming reference (sum of a 1 GiB f32 tensor): {stream_gbs:.1} GB/s\n")
}

/// One training-shape product timed with candle's matmul and with the BLAS op.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemmRow {
    pub shape: String,
    /// `forward` (`x · Wᵀ`) or `fwd+bwd` (the same plus both gradient products).
    pub pass: &'static str,
    pub candle_ms: f64,
    pub blas_ms: f64,
    pub candle_gflops: f64,
    pub blas_gflops: f64,
    /// min–max of each side's rounds, ms.
    pub spread: String,
}

/// f32 products of the training path (`linear`'s `[rows, in] · [out, in]ᵀ`, forward
/// and forward+backward) on SmolLM2-135M's layer shapes at 8 × 256 rows and the tiny
/// model's at 8 × 96, plus a 2048³ square product: candle's gemm and
/// [`cal_model::blas`] alternate within each of `rounds` rounds (median of 3 calls per
/// round). The best rate seen on the square product is the machine's GEMM reference.
pub fn bench_gemm(rounds: usize) -> Result<Vec<GemmRow>> {
    use cal_model::blas;
    anyhow::ensure!(
        blas::compiled(),
        "bench gemm compares candle with OpenBLAS: build with `--features openblas`"
    );
    let dev = Device::Cpu;
    let time = |f: &dyn Fn() -> Result<()>| median_time(3, f);
    let mut rows = Vec::new();
    let shapes = [
        ("square", 2048, 2048, 2048),
        ("SmolLM2 gate/up", 2048, 576, 1536),
        ("SmolLM2 down", 2048, 1536, 576),
        ("SmolLM2 q/o", 2048, 576, 576),
        ("SmolLM2 k/v", 2048, 576, 192),
        ("tiny up", 768, 256, 688),
        ("tiny down", 768, 688, 256),
        ("tiny q/o", 768, 256, 256),
    ];
    for (name, m, k, n) in shapes {
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.02, (n, k), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        for pass in ["forward", "fwd+bwd"] {
            let run = |on: bool| -> Result<()> {
                blas::set_enabled(on);
                let y = cal_model::ops::linear(x.as_tensor(), w.as_tensor(), None)?;
                if pass == "fwd+bwd" {
                    let g = (y * &up)?.sum_all()?.backward()?;
                    anyhow::ensure!(g.get(&w).is_some() && g.get(&x).is_some());
                } else {
                    anyhow::ensure!(y.dims() == [m, n]);
                }
                Ok(())
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..rounds.max(1) {
                a.push(time(&|| run(false))?);
                b.push(time(&|| run(true))?);
            }
            let products = if pass == "forward" { 1.0 } else { 3.0 };
            let flops = products * 2.0 * (m * k * n) as f64;
            let span = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                format!("{:.1}–{:.1}", lo * 1e3, hi * 1e3)
            };
            let spread = format!("candle {} / blas {}", span(&a), span(&b));
            let (ma, mb) = (median(a), median(b));
            rows.push(GemmRow {
                shape: format!("{name} [{m}, {k}] x [{k}, {n}]"),
                pass,
                candle_ms: ma * 1e3,
                blas_ms: mb * 1e3,
                candle_gflops: flops / ma / 1e9,
                blas_gflops: flops / mb / 1e9,
                spread,
            });
        }
    }
    blas::set_enabled(true);
    Ok(rows)
}

pub fn gemm_table(rows: &[GemmRow]) -> String {
    let best = rows
        .iter()
        .map(|r| r.candle_gflops.max(r.blas_gflops))
        .fold(0.0, f64::max);
    let mut s = String::from(
        "| product (f32) | pass | candle ms | OpenBLAS ms | candle GFLOP/s | OpenBLAS GFLOP/s | speed-up | OpenBLAS / best | spread (ms) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2}x | {:.0}% | {} |\n",
            r.shape,
            r.pass,
            r.candle_ms,
            r.blas_ms,
            r.candle_gflops,
            r.blas_gflops,
            r.candle_ms / r.blas_ms,
            100.0 * r.blas_gflops / best,
            r.spread
        );
    }
    s + &format!("\nbest rate seen (the normaliser): {best:.0} GFLOP/s\n")
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
