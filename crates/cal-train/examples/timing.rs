#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use cal_model::generate::{build_batch, completion_logprobs};
use cal_model::{ModelConfig, Transformer};
use candle_core::{DType, Device};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let spec = cal_train::tiny::TinySpec::default();
    let mut m = Transformer::init_random(spec.model_config(400), 1, DType::F32, &dev)?;
    let _vars = m.make_trainable(|_| true)?;
    let b: usize = std::env::var("B").map(|s| s.parse().unwrap()).unwrap_or(32);
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|i| (0..50).map(|j| ((i + j) % 300) as u32).collect())
        .collect();
    let comps: Vec<Vec<u32>> = (0..b)
        .map(|i| (0..50).map(|j| ((i * 3 + j) % 300) as u32).collect())
        .collect();
    let batch = build_batch(&prompts, &comps, 0, &dev)?;
    for _ in 0..3 {
        let t0 = Instant::now();
        let (logp, _) = completion_logprobs(&m, &batch)?;
        let loss = logp.sum_all()?;
        let t1 = Instant::now();
        let _g = loss.backward()?;
        let t2 = Instant::now();
        eprintln!(
            "fwd {:.3}s bwd {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64()
        );
    }
    let _ = ModelConfig::tiny(10);
    Ok(())
}
