//! Loading paths: sharded safetensors with an index, export → reload round trip, LoRA
//! merge on export, and clear errors for broken folders.

use cal_model::load;
use cal_model::{Forward, LoraConfig, Params};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-tiny")
}

fn logits(l: &load::Loaded) -> Vec<f32> {
    logits_with(l, Forward::INFERENCE)
}

fn logits_with(l: &load::Loaded, fwd: Forward) -> Vec<f32> {
    let ids = Tensor::new(&[[5u32, 17, 42, 7, 99]], &Device::Cpu).unwrap();
    let mask = [vec![1; 5]];
    let pos = cal_model::model::positions_from_mask(&mask, &Device::Cpu).unwrap();
    let h = l
        .model
        .forward_hidden(&ids, &pos, &mask, None, fwd)
        .unwrap();
    l.model
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn copy_meta(from: &Path, to: &Path) {
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
}

#[test]
fn sharded_index_loads_like_single_file() {
    let single = load::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_meta(&fixture(), dir.path());
    let all = load::load_safetensors(
        &fixture().join("model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (mut a, mut b) = (Params::new(), Params::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (k, t)) in all.into_iter().enumerate() {
        let shard = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(k.clone(), serde_json::json!(shard));
        if i % 2 == 0 {
            a.insert(k, t);
        } else {
            b.insert(k, t);
        }
    }
    load::save_safetensors(
        &a,
        &dir.path().join("model-00001-of-00002.safetensors"),
        |_| true,
    )
    .unwrap();
    load::save_safetensors(
        &b,
        &dir.path().join("model-00002-of-00002.safetensors"),
        |_| true,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let sharded = load::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(logits(&single), logits(&sharded));
}

#[test]
fn export_round_trip_merges_lora() {
    let mut l = load::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    l.model
        .add_lora(
            LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: vec!["q_proj".into(), "down_proj".into()],
            },
            1,
        )
        .unwrap();
    // make the adapters non-trivial
    for (k, t) in l.model.params.iter_mut() {
        if k.ends_with("lora_B") {
            *t = (t.ones_like().unwrap() * 0.05).unwrap();
        }
    }
    let with_lora = logits(&l);
    assert_ne!(
        with_lora,
        logits_with(&l, Forward::BASE),
        "adapters must change the output"
    );
    let dir = tempfile::tempdir().unwrap();
    load::export_hf(&l.model, &l.tokenizer, dir.path()).unwrap();
    // every file of the exported folder has the same mode (the weights were 0600 once)
    let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(mode(f), mode("config.json"), "{f}");
    }
    let back = load::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let merged = logits(&back);
    let diff = with_lora
        .iter()
        .zip(&merged)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "merged export differs by {diff}");
}

#[test]
fn broken_folders_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| {
        format!(
            "{:#}",
            load::load(p, DType::F32, &Device::Cpu).err().unwrap()
        )
    };
    assert!(err(&dir.path().join("nope")).contains("no such file"));
    assert!(err(dir.path()).contains("config.json"));
    copy_meta(&fixture(), dir.path());
    assert!(err(dir.path()).contains("no model.safetensors"));
    // a tensor with the wrong shape names the tensor and both shapes
    let mut all = load::load_safetensors(
        &fixture().join("model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    all.insert(
        "model.norm.weight".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    load::save_safetensors(&all, &dir.path().join("model.safetensors"), |_| true).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("[64]") && e.contains("[7]"),
        "{e}"
    );
    // an unknown architecture is named
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt_neox"}"#,
    )
    .unwrap();
    assert!(err(dir.path()).contains("gpt_neox"));
}

#[test]
fn peft_adapter_round_trips_and_gives_the_same_logits() {
    let mut l = load::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    l.model
        .add_lora(
            LoraConfig {
                rank: 2,
                alpha: 8.0,
                dropout: 0.0,
                targets: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
            },
            3,
        )
        .unwrap();
    for (k, t) in l.model.params.iter_mut() {
        if k.ends_with("lora_B") {
            *t = (t.ones_like().unwrap() * 0.03).unwrap();
        }
    }
    let with_lora = logits(&l);
    let dir = tempfile::tempdir().unwrap();
    cal_model::peft::export_adapter(&l.model, dir.path()).unwrap();
    // PEFT's layout: the key names, the config fields PEFT reads
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(2))
    );
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "up_proj", "v_proj"])
    );
    let tensors =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    let q = &l.model.params["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(a.dims(), [2, q.dim(1).unwrap()]);
    assert_eq!(b.dims(), [q.dim(0).unwrap(), 2]);
    assert!(tensors
        .keys()
        .all(|k| k.starts_with("base_model.model.model.layers.")));
    // the adapter on a fresh base gives the adapted model's logits
    let mut fresh = load::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    assert_ne!(logits(&fresh), with_lora);
    cal_model::peft::load_adapter(&mut fresh.model, dir.path()).unwrap();
    assert_eq!(logits(&fresh), with_lora);
    // a wrong shape names the file and the tensor
    let mut other = load::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"r": 3, "lora_alpha": 8.0}"#,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        cal_model::peft::load_adapter(&mut other.model, dir.path()).unwrap_err()
    );
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("expected"),
        "{err}"
    );
}
