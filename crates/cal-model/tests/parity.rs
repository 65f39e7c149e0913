//! Parity with the reference implementation (`transformers`), through fixtures written by
//! `scripts/make_parity_fixtures.py`: identical tokenization, last-position logits within
//! 1e-4 (f32), identical greedy continuations.

use cal_model::generate::{generate, SamplingConfig};
use cal_model::load;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn last_logits(model: &cal_model::Transformer, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, &[vec![1u8; ids.len()]]).unwrap();
    logits
        .squeeze(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn greedy(l: &load::Loaded, ids: &[u32], n: usize) -> Vec<u32> {
    let cfg = SamplingConfig {
        max_new_tokens: n,
        greedy: true,
        ..SamplingConfig::default()
    };
    let mut rng = rand::rng();
    let mut out = generate(&l.model, &l.tokenizer, &[ids.to_vec()], &cfg, &mut rng)
        .unwrap()
        .remove(0)
        .ids;
    out.truncate(n);
    out
}

#[test]
fn qwen2_tiny_matches_transformers() {
    let l = load::load(&fixtures().join("qwen2-tiny"), DType::F32, &Device::Cpu).unwrap();
    assert!(l.model.cfg.attention_bias, "Qwen2 has q/k/v bias");
    for row in json("qwen2-tiny.json")["rows"].as_array().unwrap() {
        let want_ids = ids(&row["ids"]);
        assert_eq!(
            l.tokenizer.encode(row["text"].as_str().unwrap()).unwrap(),
            want_ids
        );
        let got = last_logits(&l.model, &want_ids);
        let want: Vec<f32> = row["last_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4, "max abs logit diff {diff}");
        let want_greedy = ids(&row["greedy"]);
        assert_eq!(greedy(&l, &want_ids, want_greedy.len()), want_greedy);
    }
}

#[test]
fn batched_left_padded_generation_equals_one_by_one() {
    let l = load::load(&fixtures().join("qwen2-tiny"), DType::F32, &Device::Cpu).unwrap();
    let rows = json("qwen2-tiny.json");
    let prompts: Vec<Vec<u32>> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["ids"]))
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        greedy: true,
        ..SamplingConfig::default()
    };
    let mut rng = rand::rng();
    let batched = generate(&l.model, &l.tokenizer, &prompts, &cfg, &mut rng).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let single = generate(
            &l.model,
            &l.tokenizer,
            std::slice::from_ref(p),
            &cfg,
            &mut rng,
        )
        .unwrap()
        .remove(0);
        assert_eq!(b.ids, single.ids);
    }
}

/// Rows that stop early leave the decoding batch (once a quarter of it has stopped):
/// every row still samples exactly what it samples alone, from its own stream.
#[test]
fn rows_that_stop_early_leave_the_batch_without_changing_any_row() {
    use cal_model::generate::{generate_per_row, FinishReason};
    use rand::SeedableRng;
    let l = load::load(&fixtures().join("qwen2-tiny"), DType::F32, &Device::Cpu).unwrap();
    let fixture = json("qwen2-tiny.json");
    let base: Vec<Vec<u32>> = fixture["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["ids"]))
        .collect();
    let prompts: Vec<Vec<u32>> = base.iter().cycle().take(12).cloned().collect();
    let cfg = SamplingConfig {
        max_new_tokens: 24,
        greedy: false,
        temperature: 1.0,
        // about one token in eight stops a row: lengths spread over the batch
        stop_tokens: (0..40).collect(),
        ..SamplingConfig::default()
    };
    let rngs = |rows: std::ops::Range<u64>| -> Vec<rand_chacha::ChaCha8Rng> {
        rows.map(rand_chacha::ChaCha8Rng::seed_from_u64).collect()
    };
    let batched =
        generate_per_row(&l.model, &l.tokenizer, &prompts, &cfg, &mut rngs(0..12)).unwrap();
    let lens: Vec<usize> = batched.iter().map(|g| g.ids.len()).collect();
    let longest = *lens.iter().max().unwrap();
    let early = lens.iter().filter(|&&n| n < longest).count();
    assert!(
        early >= 3 && batched.iter().any(|g| g.finish == FinishReason::Stop),
        "too few rows stop early to shrink the batch: {lens:?}"
    );
    for (i, (p, b)) in prompts.iter().zip(&batched).enumerate() {
        let i = i as u64;
        let alone = generate_per_row(
            &l.model,
            &l.tokenizer,
            std::slice::from_ref(p),
            &cfg,
            &mut rngs(i..i + 1),
        )
        .unwrap()
        .remove(0);
        assert_eq!(b.ids, alone.ids, "row {i}");
        assert_eq!(b.finish, alone.finish, "row {i}");
    }
}

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh --with-model"]
fn smollm2_gguf_matches_transformers() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/fetch-assets.sh --with-model`",
        path.display()
    );
    let l = load::load(&path, DType::F32, &Device::Cpu).unwrap();
    let fx = json("smollm2.json");
    // the chat template renders exactly as transformers renders it
    let chat = l
        .tokenizer
        .chat_template
        .as_ref()
        .unwrap()
        .render(&[("user", "What is 12 + 7?")], true)
        .unwrap();
    assert_eq!(chat, fx["chat_prompt"].as_str().unwrap());
    for row in fx["rows"].as_array().unwrap() {
        let text = row["text"].as_str().unwrap();
        let want_ids = ids(&row["ids"]);
        assert_eq!(
            l.tokenizer.encode(text).unwrap(),
            want_ids,
            "tokenization of {text:?}"
        );
        let got = last_logits(&l.model, &want_ids);
        let top: Vec<usize> = row["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let mut diff = 0f32;
        for (i, v) in top.iter().zip(row["top_logits"].as_array().unwrap()) {
            diff = diff.max((got[*i] - v.as_f64().unwrap() as f32).abs());
        }
        let sum: f64 = got.iter().map(|x| *x as f64).sum();
        let want_sum = row["logits_sum"].as_f64().unwrap();
        assert!(diff <= 1e-4, "{text:?}: top-64 logit diff {diff}");
        assert!(
            (sum - want_sum).abs() / want_sum.abs().max(1.0) < 1e-4,
            "{text:?}: logit sum {sum} vs {want_sum}"
        );
        let want_greedy = ids(&row["greedy"]);
        assert_eq!(
            greedy(&l, &want_ids, want_greedy.len()),
            want_greedy,
            "greedy continuation of {text:?}"
        );
    }
}

/// The attention maps and per-layer residual streams distillation reads
/// (`Transformer::forward_probe`) against transformers' eager attention
/// (`scripts/make_attention_fixture.py`).
#[test]
fn qwen2_tiny_attention_maps_and_layer_states_match_transformers() {
    let l = load::load(&fixtures().join("qwen2-tiny"), DType::F32, &Device::Cpu).unwrap();
    let f = json("qwen2-tiny-attention.json");
    let ids = ids(&f["ids"]);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let n = l.model.cfg.num_hidden_layers;
    let layers: Vec<usize> = (0..n).collect();
    let p = l
        .model
        .forward_probe(
            &input,
            &[vec![1u8; ids.len()]],
            cal_model::Forward::INFERENCE,
            &layers,
            true,
        )
        .unwrap();
    let flat = |v: &serde_json::Value| -> Vec<f32> {
        fn go(v: &serde_json::Value, out: &mut Vec<f32>) {
            match v {
                serde_json::Value::Array(a) => a.iter().for_each(|x| go(x, out)),
                x => out.push(x.as_f64().unwrap() as f32),
            }
        }
        let mut out = Vec::new();
        go(v, &mut out);
        out
    };
    let worst = |ours: &Tensor, theirs: &[f32]| {
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ours.len(), theirs.len());
        ours.iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    for (i, maps) in f["attention"].as_array().unwrap().iter().enumerate() {
        let d = worst(&p.attention[i], &flat(maps));
        assert!(d < 1e-5, "layer {i} attention maps off by {d}");
    }
    for (i, states) in f["layers"].as_array().unwrap().iter().enumerate() {
        let d = worst(&p.layers[i], &flat(states));
        assert!(d < 1e-4, "layer {i} residual stream off by {d}");
    }
}
