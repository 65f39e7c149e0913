//! Benchmarks of this crate's kernels, beside them: the decoding-step products
//! (candle's gemm against [`crate::gemv`], with a memory-streaming reference) and the
//! training-shape products (candle's gemm against [`crate::blas`]), each pair measured
//! alternately within one run (`cal-grpo bench kernels`, `cal-grpo bench gemm`).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// The median of `xs` (the upper one of an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median wall time of `calls` calls of `f`, after one untimed warm-up call.
pub fn median_time<T>(calls: usize, f: &dyn Fn() -> Result<T>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// One row of `cal-grpo bench kernels`: a decoding-step product `[m, k] × [k, n]`
/// through candle's matmul (gemm) and through [`crate::gemv`], alternately.
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
        let gemv = || -> Result<Tensor> { Ok(crate::gemv::matmul_nt(&x, &w)?) };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            a.push(time(&gemm)?);
            b.push(time(&gemv)?);
        }
        let want = x.matmul(&w.t()?)?;
        let got = crate::gemv::matmul_nt(&x, &w)?;
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
/// [`crate::blas`] alternate within each of `rounds` rounds (median of 3 calls per
/// round). The best rate seen on the square product is the machine's GEMM reference.
pub fn bench_gemm(rounds: usize) -> Result<Vec<GemmRow>> {
    use crate::blas;
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
                let y = crate::ops::linear(x.as_tensor(), w.as_tensor(), None)?;
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

/// One row of `cal-grpo bench qmatmul`: a product through the f32 weight and through
/// the same weight held quantized ([`crate::qlinear::QLinear`]), both ways it computes:
/// dequantized tile by tile into an f32 GEMM (`forward`, whole sequences) and the row
/// kernel (`forward_decode`, decoding steps; forward only).
#[derive(Debug, Clone, serde::Serialize)]
pub struct QMatmulRow {
    pub shape: String,
    /// `q4_0`, `q4_1` or `q8_0`.
    pub format: String,
    /// `forward` (`x · Wᵀ`) or `fwd+bwd` (the same and the input's gradient `dy · W`:
    /// what a frozen base layer computes under LoRA).
    pub pass: &'static str,
    pub f32_ms: f64,
    pub tiles_ms: f64,
    /// The row kernel; NaN for `fwd+bwd`.
    pub rows_ms: f64,
    pub f32_gflops: f64,
    pub tiles_gflops: f64,
    pub rows_gflops: f64,
}

/// QLoRA's base products against f32: for each shape (SmolLM2-135M's and Qwen2.5-7B's
/// layer products, SmolLM2's vocabulary head, and two decoding steps of 8 rows) and format, the f32 product
/// (`ops::linear`, with the backward to the input alone, as for a frozen weight) and
/// the quantized layer's two forwards (with the tile-by-tile dequantizing backward)
/// take turns within each of `rounds` rounds (median of 3 calls per round).
pub fn bench_qmatmul(
    rounds: usize,
    formats: &[candle_core::quantized::GgmlDType],
    only: &str,
) -> Result<Vec<QMatmulRow>> {
    use crate::qlinear::QLinear;
    let dev = Device::Cpu;
    let time = |f: &dyn Fn() -> Result<()>| median_time(3, f);
    let shapes = [
        ("SmolLM2 gate/up", 2048, 576, 1536),
        ("SmolLM2 down", 2048, 1536, 576),
        ("SmolLM2 q/o", 2048, 576, 576),
        ("SmolLM2 head", 512, 576, 49152),
        ("Qwen2.5-7B gate/up", 128, 3584, 18944),
        ("Qwen2.5-7B down", 128, 18944, 3584),
        // decoding steps: a row per sequence, forward only (f32 through `linear_decode`)
        ("decode: SmolLM2 gate/up", 8, 576, 1536),
        ("decode: SmolLM2 head", 8, 576, 49152),
    ];
    let mut rows = Vec::new();
    for (name, m, k, n) in shapes.into_iter().filter(|s| s.0.contains(only)) {
        let decode = name.starts_with("decode");
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let up = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        for &fmt in formats {
            let q = QLinear::quantize(&w, fmt, 256)?;
            let passes: &[&'static str] = if decode {
                &["forward"]
            } else {
                &["forward", "fwd+bwd"]
            };
            for &pass in passes {
                // 0: f32, 1: dequantized tiles, 2: quantized matmul
                let run = |side: usize| -> Result<()> {
                    let y = match side {
                        0 if decode => {
                            crate::ops::linear_decode(&x.as_tensor().detach(), &w, None)?
                        }
                        0 => crate::ops::linear(x.as_tensor(), &w, None)?,
                        1 => q.forward(x.as_tensor())?,
                        _ => q.forward_decode(&x.as_tensor().detach())?,
                    };
                    if side == 2 {
                        return Ok(()); // the row kernel: forward only (decoding)
                    }
                    if pass == "fwd+bwd" {
                        let g = (y * &up)?.sum_all()?.backward()?;
                        anyhow::ensure!(g.get(&x).is_some());
                    } else {
                        anyhow::ensure!(y.dims() == [m, n]);
                    }
                    Ok(())
                };
                let mut t = [Vec::new(), Vec::new(), Vec::new()];
                let sides = if pass == "forward" { 3 } else { 2 };
                for _ in 0..rounds.max(1) {
                    for (side, v) in t.iter_mut().enumerate().take(sides) {
                        v.push(time(&|| run(side))?);
                    }
                }
                if sides == 2 {
                    t[2].push(f64::NAN);
                }
                let products = if pass == "forward" { 1.0 } else { 2.0 };
                let flops = products * 2.0 * (m * k * n) as f64;
                let [a, b, c] = t.map(median);
                rows.push(QMatmulRow {
                    shape: format!("{name} [{m}, {k}] x [{k}, {n}]"),
                    format: format!("{fmt:?}").to_lowercase(),
                    pass,
                    f32_ms: a * 1e3,
                    tiles_ms: b * 1e3,
                    rows_ms: c * 1e3,
                    f32_gflops: flops / a / 1e9,
                    tiles_gflops: flops / b / 1e9,
                    rows_gflops: flops / c / 1e9,
                });
            }
        }
    }
    Ok(rows)
}

pub fn qmatmul_table(rows: &[QMatmulRow]) -> String {
    let mut s = String::from(
        "| product | format | pass | f32 ms | tiles ms | row kernel ms | f32 GFLOP/s | tiles / f32 rate | row kernel / f32 rate |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let (rows_ms, rows_rate) = if r.rows_ms.is_nan() {
            ("–".to_string(), "–".to_string())
        } else {
            (
                format!("{:.1}", r.rows_ms),
                format!("{:.0}%", 100.0 * r.rows_gflops / r.f32_gflops),
            )
        };
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {:.0} | {:.0}% | {} |\n",
            r.shape,
            r.format,
            r.pass,
            r.f32_ms,
            r.tiles_ms,
            rows_ms,
            r.f32_gflops,
            100.0 * r.tiles_gflops / r.f32_gflops,
            rows_rate
        );
    }
    s
}
