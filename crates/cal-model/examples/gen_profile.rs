//! Profiling aid: `cargo run --release -p cal-model --example gen_profile -- MODEL [BATCH] [NEW]`
//! times batched sampled generation (used with `perf record`).
use cal_model::generate::{generate, SamplingConfig};
use rand::SeedableRng;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: gen_profile MODEL [BATCH] [NEW]");
    let batch: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let new: usize = args.get(3).map_or(128, |s| s.parse().unwrap());
    let l = cal_model::load::load(
        std::path::Path::new(path),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let (mut model, mut tok) = (l.model, l.tokenizer);
    if std::env::var("TRAINABLE").is_ok() {
        model.make_trainable(|_| true)?;
    }
    tok.eos_ids = vec![u32::MAX];
    let prompt = tok.encode(
        "Question: Mia has 12 apples. She buys 7 more. How many apples does she have?\nAnswer:",
    )?;
    let cfg = SamplingConfig {
        max_new_tokens: new,
        stop_tokens: vec![],
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for _ in 0..2 {
        let t = Instant::now();
        let g = generate(&model, &tok, &vec![prompt.clone(); batch], &cfg, &mut rng)?;
        let n: usize = g.iter().map(|g| g.ids.len()).sum();
        println!(
            "{n} tokens in {:.2}s = {:.1} tok/s",
            t.elapsed().as_secs_f64(),
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
