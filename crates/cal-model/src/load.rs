//! Loading Hugging Face model folders and GGUF files; saving safetensors and exporting
//! a Hugging Face folder.

use crate::config::ModelConfig;
use crate::model::{Params, Transformer};
use crate::tokenizer::{self, ChatTemplate, TokenizerBundle};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model with its tokenizer.
pub struct Loaded {
    pub model: Transformer,
    pub tokenizer: TokenizerBundle,
}

/// Loads `path`: a `.gguf` file or a Hugging Face folder (or an `HF_HOME` cache
/// snapshot folder).
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            return load_gguf(path, dtype, device);
        }
        bail!(
            "{}: not a .gguf file or a Hugging Face model folder",
            path.display()
        );
    }
    load_hf(path, dtype, device)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Hugging Face folder: `config.json`, `model.safetensors` or a sharded index,
/// `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
pub fn load_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg = ModelConfig::from_hf_json(&cfg_text, &cfg_path)?;
    let files: Vec<PathBuf> = if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else if dir.join("model.safetensors.index.json").exists() {
        let idx = read_json(&dir.join("model.safetensors.index.json"))?;
        let mut shards: Vec<String> = idx["weight_map"]
            .as_object()
            .context("model.safetensors.index.json: no weight_map")?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    };
    let mut params = Params::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, device)
            .with_context(|| format!("reading {}", f.display()))?;
        for (k, t) in tensors {
            params.insert(k, t.to_dtype(dtype)?);
        }
    }
    if cfg.tie_word_embeddings {
        params.remove("lm_head.weight");
    }
    params.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    let model = Transformer::new(cfg, params, device)
        .with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer = hf_tokenizer(dir)?;
    Ok(Loaded { model, tokenizer })
}

/// `tokenizer.json` plus special tokens and chat template from `tokenizer_config.json`
/// and stop ids from `generation_config.json`.
pub fn hf_tokenizer(dir: &Path) -> Result<TokenizerBundle> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
    let tc = if dir.join("tokenizer_config.json").exists() {
        read_json(&dir.join("tokenizer_config.json"))?
    } else {
        serde_json::Value::Null
    };
    let token_str = |v: &serde_json::Value| -> Option<String> {
        v.as_str()
            .map(str::to_string)
            .or_else(|| v["content"].as_str().map(str::to_string))
    };
    let eos_tok = token_str(&tc["eos_token"]);
    let bos_tok = token_str(&tc["bos_token"]);
    let mut eos_ids: Vec<u32> = eos_tok
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    if dir.join("generation_config.json").exists() {
        let gc = read_json(&dir.join("generation_config.json"))?;
        match &gc["eos_token_id"] {
            serde_json::Value::Number(n) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
            serde_json::Value::Array(a) => {
                eos_ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
            }
            _ => {}
        }
    }
    for extra in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
        eos_ids.extend(tokenizer.token_to_id(extra));
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    if eos_ids.is_empty() {
        bail!(
            "{}: no eos token found in tokenizer_config.json or generation_config.json",
            dir.display()
        );
    }
    let pad_id = token_str(&tc["pad_token"])
        .and_then(|t| tokenizer.token_to_id(&t))
        .unwrap_or(eos_ids[0]);
    let chat_template = match &tc["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => a
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str().map(str::to_string)),
        _ => None,
    }
    .map(|s| ChatTemplate::new(s, eos_tok.clone().unwrap_or_default(), bos_tok.clone()));
    Ok(TokenizerBundle {
        bos_id: bos_tok.and_then(|t| tokenizer.token_to_id(&t)),
        tokenizer,
        eos_ids,
        pad_id,
        chat_template,
    })
}

/// Undoes llama.cpp's Q/K row permutation (it converts HF's half-split RoPE layout to
/// the interleaved one): `[heads, 2, d/2, in]` ← `[heads, d/2, 2, in]`.
fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    Ok(w.reshape((heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// GGUF: weights dequantized to `dtype`, tokenizer and chat template from metadata.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow!("{}: not a GGUF file: {e}", path.display()))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| anyhow!("{}: no general.architecture", path.display()))?;
    let (architecture, permuted) = match arch.as_str() {
        "llama" => ("llama", true),
        "qwen2" => ("qwen2", false),
        "qwen3" => ("qwen3", false),
        other => bail!(
            "{}: unsupported GGUF architecture {other:?} (llama, qwen2, qwen3)",
            path.display()
        ),
    };
    let u = |k: &str| -> Result<usize> {
        md.get(&format!("{arch}.{k}"))
            .ok_or_else(|| anyhow!("{}: metadata {arch}.{k} missing", path.display()))?
            .to_u64()
            .or_else(|_| md[&format!("{arch}.{k}")].to_u32().map(u64::from))
            .map(|x| x as usize)
            .map_err(|e| anyhow!("{arch}.{k}: {e}"))
    };
    let f = |k: &str, default: f64| -> f64 {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map_or(default, f64::from)
    };
    let tokenizer =
        tokenizer::from_gguf(md).with_context(|| format!("{}: tokenizer", path.display()))?;
    let hidden_size = u("embedding_length")?;
    let num_attention_heads = u("attention.head_count")?;
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let tie = !names.iter().any(|n| n == "output.weight");
    let vocab_size = content.tensor_infos["token_embd.weight"].shape.dims()[0];
    let head_dim = u("attention.key_length").unwrap_or(hidden_size / num_attention_heads);
    let cfg = ModelConfig {
        architecture: architecture.into(),
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads,
        num_key_value_heads: u("attention.head_count_kv").unwrap_or(num_attention_heads),
        head_dim,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta: f("rope.freq_base", 10_000.0),
        rope_scaling: None,
        rope_linear_factor: None,
        max_position_embeddings: u("context_length").unwrap_or(4096),
        tie_word_embeddings: tie,
        attention_bias: names.iter().any(|n| n.ends_with("attn_q.bias")),
        qk_norm: names.iter().any(|n| n.ends_with("attn_q_norm.weight")),
    };
    let mut params = Params::new();
    for name in &names {
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| anyhow!("{}: tensor {name}: {e}", path.display()))?;
        let t = q.dequantize(device)?.to_dtype(dtype)?;
        let hf = gguf_to_hf_name(name)
            .ok_or_else(|| anyhow!("{}: unexpected tensor {name}", path.display()))?;
        let t = match (permuted, hf.as_str()) {
            (true, n) if n.ends_with("q_proj.weight") => unpermute_qk(&t, cfg.num_attention_heads)?,
            (true, n) if n.ends_with("k_proj.weight") => unpermute_qk(&t, cfg.num_key_value_heads)?,
            _ => t,
        };
        params.insert(hf, t);
    }
    let model = Transformer::new(cfg, params, device)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(Loaded { model, tokenizer })
}

fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Saves `params` (all, or those whose name passes `filter`) as safetensors, atomically.
pub fn save_safetensors(params: &Params, path: &Path, filter: impl Fn(&str) -> bool) -> Result<()> {
    let map: HashMap<String, Tensor> = params
        .iter()
        .filter(|(k, _)| filter(k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Loads safetensors into a name → tensor map.
pub fn load_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<Params> {
    let map = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    map.into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect()
}

/// Exports `model` (LoRA merged into the base weights) with its tokenizer as a Hugging
/// Face folder that this project and `transformers` can load.
pub fn export_hf(model: &Transformer, tok: &TokenizerBundle, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut merged = Params::new();
    for (k, t) in &model.params {
        if k.ends_with(".lora_A") || k.ends_with(".lora_B") {
            continue;
        }
        let mut t = t.detach().copy()?;
        if let (Some(cfg), Some(module)) = (&model.lora, k.strip_suffix(".weight")) {
            if let (Some(a), Some(b)) = (
                model.params.get(&format!("{module}.lora_A")),
                model.params.get(&format!("{module}.lora_B")),
            ) {
                t = (t + (b.matmul(a)? * (cfg.alpha / cfg.rank as f64))?)?;
            }
        }
        merged.insert(k.clone(), t.to_dtype(DType::F32)?);
    }
    save_safetensors(&merged, &dir.join("model.safetensors"), |_| true)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&model.cfg.to_hf_json())?,
    )?;
    tok.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("saving tokenizer: {e}"))?;
    let eos = tok
        .eos_ids
        .first()
        .map(|i| tok.token_text(*i))
        .unwrap_or_default();
    let mut tc = serde_json::json!({
        "eos_token": eos,
        "pad_token": tok.token_text(tok.pad_id),
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(ct) = &tok.chat_template {
        tc["chat_template"] = serde_json::json!(ct.source);
    }
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )?;
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({"eos_token_id": tok.eos_ids}))?,
    )?;
    Ok(())
}
