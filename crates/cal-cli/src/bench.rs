//! `cal-grpo bench`: the model stack (`model`, `generate`, `step`) and the kernels
//! (`kernels`, `gemm`), each printed as a table with the load average around it.

use crate::source::Source;
use anyhow::Result;
use cal_model::Placement;
use cal_train::policy::PolicySource;
use clap::Args;
use std::path::Path;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to benchmark: `model` (the whole table), `generate` (generation only),
    /// `kernels` (decoding-step matmuls: gemm vs the small-batch kernel) or `gemm`
    /// (training-shape products: candle vs OpenBLAS, alternately) or `step` (the
    /// training step of the first `--model`, candle vs OpenBLAS, alternately); the
    /// last two need the `openblas` feature. `qmatmul`: QLoRA's quantized products
    /// (q4_0, q4_1, q8_0; forward, and with the input's gradient) against f32.
    #[arg(default_value = "model")]
    pub what: String,
    /// Models to measure: `tiny` and/or paths (default: tiny and the SmolLM2 asset).
    #[arg(long)]
    pub model: Vec<String>,
    /// Measured repetitions per model (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Tokens per sequence of the training step.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// New tokens per row of the generation measurement.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Rows per batch (`model`: the first; `generate`: each, e.g. `--batch 8,64,256`).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub batch: Vec<usize>,
    /// `generate`: prefill the rows' one prompt once and copy its keys and values
    /// (`on`), or prefill every row (`off`).
    #[arg(long, value_enum, default_value = "off")]
    pub shared_prefix: cal_train::config::Switch,
    /// `qmatmul`: only the products whose name contains this (e.g. `decode`, `7B`).
    #[arg(long, default_value = "")]
    pub only: String,
    #[command(flatten)]
    pub placement: crate::config::PlacementFlags,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let placement = args.placement.placement();
    anyhow::ensure!(
        args.batch.iter().all(|&b| b > 0),
        "--batch: every size must be at least 1"
    );
    let (model, repeats) = (&args.model, args.repeats);
    match args.what.as_str() {
        "model" => bench(
            model,
            placement,
            repeats,
            args.seq,
            args.new_tokens,
            args.batch[0],
        ),
        "generate" => {
            anyhow::ensure!(!model.is_empty(), "bench generate needs --model");
            let share = args.shared_prefix.on();
            bench_generate(
                model,
                placement,
                repeats,
                args.new_tokens,
                &args.batch,
                share,
            )
        }
        "kernels" => bench_kernels(repeats),
        "gemm" => bench_gemm(repeats),
        "qmatmul" => bench_qmatmul(repeats, &args.only),
        "step" => {
            let m = model.first().map_or("tiny", String::as_str);
            bench_step(m, placement, repeats, args.seq)
        }
        what => anyhow::bail!(
            "unknown benchmark {what:?} (model, generate, kernels, gemm, qmatmul, step)"
        ),
    }
}

/// `cal-grpo bench generate`: generation throughput alone, one line per model, for
/// `bench/hf_generate.py` to interleave with `transformers`' `generate`.
fn bench_generate(
    models: &[String],
    placement: Placement,
    repeats: usize,
    new_tokens: usize,
    batches: &[usize],
    share: bool,
) -> Result<()> {
    for m in models {
        let p = Source::new(m, placement).fresh()?;
        for &b in batches {
            let (med, all) = cal_train::bench::bench_generation(&p, b, new_tokens, repeats, share)?;
            let all: Vec<String> = all.iter().map(|x| format!("{x:.1}")).collect();
            println!(
                "{m}: generation batch {b} x {new_tokens} new tokens on {} (shared prefill: {share}): {med:.1} tok/s (median of {}: {})",
                placement.device,
                all.len(),
                all.join(", ")
            );
        }
    }
    Ok(())
}

fn bench_kernels(rounds: usize) -> Result<()> {
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (stream, rows) = cal_model::bench::bench_kernels(rounds)?;
    print!("{}", cal_model::bench::kernel_table(stream, &rows));
    println!(
        "medians of {rounds} alternating rounds (9 calls each); {} threads; load average before: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

fn bench_qmatmul(rounds: usize, only: &str) -> Result<()> {
    use candle_core::quantized::GgmlDType;
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let formats = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
    let rows = cal_model::bench::bench_qmatmul(rounds, &formats, only)?;
    print!("{}", cal_model::bench::qmatmul_table(&rows));
    println!(
        "medians of {rounds} alternating rounds (3 calls each); {} threads; load average before: {}, after: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn bench_gemm(rounds: usize) -> Result<()> {
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rows = cal_model::bench::bench_gemm(rounds)?;
    print!("{}", cal_model::bench::gemm_table(&rows));
    let after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "medians of {rounds} alternating rounds (candle, OpenBLAS, candle, …; 3 calls each); {} threads; load average before: {}, after: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        three(&load_avg),
        three(&after)
    );
    Ok(())
}

fn bench_step(model: &str, placement: Placement, repeats: usize, seq: usize) -> Result<()> {
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut p = Source::new(model, placement).fresh()?;
    let (rows, best) = cal_train::bench::bench_train_step(&mut p, 8, seq, repeats)?;
    println!("| training step, 8 x {seq} tokens ({model}) | median s | tokens/s | GFLOP/s (6·N·tokens) | share of best GEMM | steps (s) |\n|---|---|---|---|---|---|");
    for r in &rows {
        let steps: Vec<String> = r.steps.iter().map(|s| format!("{s:.2}")).collect();
        println!(
            "| {} | {:.2} | {:.0} | {:.1} | {:.0}% | {} |",
            r.product,
            r.step_s,
            r.tokens_per_s,
            r.gflops,
            100.0 * r.gflops / best,
            steps.join(", ")
        );
    }
    let after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "\ncandle / OpenBLAS step time: {:.2}x; best GEMM (2048³, either library, measured between rounds): {best:.0} GFLOP/s; \
         {repeats} alternating rounds after a warm-up; {} threads; load average before: {}, after: {}",
        rows[0].step_s / rows[1].step_s,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        three(&load_avg),
        three(&after)
    );
    Ok(())
}

fn bench(
    models: &[String],
    placement: Placement,
    repeats: usize,
    seq: usize,
    new_tokens: usize,
    batch: usize,
) -> Result<()> {
    let models: Vec<String> = if models.is_empty() {
        let smol = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
        let mut m = vec!["tiny".to_string()];
        if Path::new(smol).exists() {
            m.push(smol.to_string());
        }
        m
    } else {
        models.to_vec()
    };
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before: {}", load_avg.trim());
    let mut rows = Vec::new();
    for m in &models {
        let mut p = Source::new(m, placement).fresh()?;
        eprintln!("benchmarking {m} ...");
        let name = Path::new(m)
            .file_name()
            .map_or(m.clone(), |n| n.to_string_lossy().into_owned());
        rows.push(cal_train::bench::bench_policy(
            &name, &mut p, batch, new_tokens, seq, repeats,
        )?);
    }
    println!("{}", cal_train::bench::table(&rows));
    println!(
        "batch {batch}; generation {new_tokens} new tokens per row; training step = forward + backward + AdamW on {batch} × {seq} tokens; \
         medians of {repeats} runs, each interleaved with the matmul reference ({}, {}); {} CPU threads; load average before: {}",
        placement.device,
        placement.dtype.name(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
