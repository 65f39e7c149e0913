//! Loading Hugging Face model folders and GGUF files; saving safetensors and exporting
//! a Hugging Face folder.

use crate::config::ModelConfig;
use crate::model::{Params, Transformer};
use crate::tokenizer::{self, ChatTemplate, TokenizerBundle};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model with its tokenizer.
pub struct Loaded {
    pub model: Transformer,
    pub tokenizer: TokenizerBundle,
}

/// Loads `path`: a `.gguf` file or a Hugging Face folder (or an `HF_HOME` cache
/// snapshot folder). `dtype` is the compute dtype; a half-precision model keeps its
/// weights in f32 (the master weights when it is trained) and casts them to `dtype` per
/// training forward, once per generation, and once for a frozen reference.
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
            params.insert(k, t.to_dtype(crate::device::loss_dtype(dtype))?);
        }
    }
    if cfg.tie_word_embeddings {
        params.remove("lm_head.weight");
    }
    params.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    let model = Transformer::new(cfg, params, device)
        .with_context(|| format!("loading {}", dir.display()))?
        .with_compute_dtype(dtype);
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

/// What a GGUF file says before its tensor data: the architecture, the tokenizer and
/// where each tensor lies. Reading it touches only the header and metadata.
pub struct GgufHeader {
    pub config: ModelConfig,
    pub tokenizer: TokenizerBundle,
    /// Llama GGUFs store q/k rows permuted for llama.cpp's RoPE; undone on load.
    pub permuted: bool,
    pub content: gguf_file::Content,
}

/// Reads and checks a GGUF header and metadata from `reader`; `label` (the file name)
/// starts every error. Damaged input is an error, never a panic: this is what
/// `fuzz/fuzz_targets/gguf_header.rs` exercises.
pub fn read_gguf_header<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    label: &str,
) -> Result<GgufHeader> {
    let start = reader.stream_position()?;
    if let Some(a) = gguf_alignment(reader).ok().flatten() {
        // candle divides by it; llama.cpp requires a power of two.
        if !a.is_power_of_two() {
            bail!("{label}: general.alignment is {a}, not a power of two");
        }
    }
    reader.seek(std::io::SeekFrom::Start(start))?;
    let content =
        gguf_file::Content::read(reader).map_err(|e| anyhow!("{label}: not a GGUF file: {e}"))?;
    check_tensor_extents(&content, reader, label)?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| anyhow!("{label}: no general.architecture"))?;
    let (architecture, permuted) = match arch.as_str() {
        "llama" => ("llama", true),
        "qwen2" => ("qwen2", false),
        "qwen3" => ("qwen3", false),
        other => bail!("{label}: unsupported GGUF architecture {other:?} (llama, qwen2, qwen3)"),
    };
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        let v = md
            .get(&key)
            .ok_or_else(|| anyhow!("{label}: metadata {key} missing"))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .ok()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| anyhow!("{label}: metadata {key} is not an unsigned integer"))
    };
    let f = |k: &str, default: f64| -> f64 {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map_or(default, f64::from)
    };
    let tokenizer = tokenizer::from_gguf(md).with_context(|| format!("{label}: tokenizer"))?;
    let hidden_size = u("embedding_length")?;
    let num_attention_heads = u("attention.head_count")?;
    let names: Vec<&String> = content.tensor_infos.keys().collect();
    let tie = !names.iter().any(|n| *n == "output.weight");
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| anyhow!("{label}: no token_embd.weight tensor"))?;
    let head_dim = u("attention.key_length")
        .unwrap_or_else(|_| hidden_size.checked_div(num_attention_heads).unwrap_or(0));
    let config = ModelConfig {
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
    config
        .check()
        .with_context(|| format!("{label}: model header"))?;
    Ok(GgufHeader {
        config,
        tokenizer,
        permuted,
        content,
    })
}

/// The integer value of `general.alignment`, found by skimming the metadata without
/// allocating. `Ok(None)` when absent; any malformation is left for candle's reader to
/// report (`Err` here only stops the skim).
fn gguf_alignment<R: std::io::Read + std::io::Seek>(r: &mut R) -> std::io::Result<Option<u64>> {
    use std::io::{Error, SeekFrom};
    fn u32_of<R: std::io::Read>(r: &mut R) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_of<R: std::io::Read>(r: &mut R) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    let bad = || Error::other("malformed");
    if u32_of(r)? != 0x4655_4747 {
        return Err(bad());
    }
    let v1 = match u32_of(r)? {
        1 => true,
        2 | 3 => false,
        _ => return Err(bad()),
    };
    let len = |r: &mut R| {
        if v1 {
            u32_of(r).map(u64::from)
        } else {
            u64_of(r)
        }
    };
    let _tensors = len(r)?;
    let kvs = len(r)?;
    // Fixed sizes of the scalar value types, by type id.
    let size = |t: u32| match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    fn skip_value<R: std::io::Read + std::io::Seek>(
        r: &mut R,
        t: u32,
        depth: usize,
        len: &dyn Fn(&mut R) -> std::io::Result<u64>,
        size: &dyn Fn(u32) -> Option<i64>,
    ) -> std::io::Result<()> {
        if depth > 8 {
            return Err(Error::other("nested too deep"));
        }
        if let Some(n) = size(t) {
            r.seek(SeekFrom::Current(n))?;
            return Ok(());
        }
        match t {
            8 => {
                let n = i64::try_from(len(r)?).map_err(Error::other)?;
                r.seek(SeekFrom::Current(n))?;
            }
            9 => {
                let et = u32_of(r)?;
                let n = len(r)?;
                if let Some(sz) = size(et) {
                    let bytes = i64::try_from(n).ok().and_then(|n| n.checked_mul(sz));
                    r.seek(SeekFrom::Current(
                        bytes.ok_or_else(|| Error::other("array"))?,
                    ))?;
                } else {
                    for _ in 0..n {
                        skip_value(r, et, depth + 1, len, size)?;
                    }
                }
            }
            _ => return Err(Error::other("unknown type")),
        }
        Ok(())
    }
    let file_size = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(if v1 { 16 } else { 24 }))?;
    for _ in 0..kvs {
        let key_len = len(r)?;
        if key_len > 256 {
            return Err(bad());
        }
        let mut key = vec![0u8; key_len as usize];
        r.read_exact(&mut key)?;
        let t = u32_of(r)?;
        if key == b"general.alignment" {
            let v = match t {
                0 | 1 => {
                    let mut b = [0u8; 1];
                    r.read_exact(&mut b)?;
                    u64::from(b[0])
                }
                2 | 3 => {
                    let mut b = [0u8; 2];
                    r.read_exact(&mut b)?;
                    u64::from(u16::from_le_bytes(b))
                }
                4 | 5 => u64::from(u32_of(r)?),
                _ => return Ok(None),
            };
            return Ok(Some(v));
        }
        skip_value(r, t, 0, &len, &|t| size(t))?;
        if r.stream_position()? > file_size {
            return Err(bad());
        }
    }
    Ok(None)
}

/// Every tensor's element count must not overflow and its bytes must lie inside the
/// file, so that a damaged header is refused before any tensor buffer is allocated.
fn check_tensor_extents<R: std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    label: &str,
) -> Result<()> {
    let file_size = reader.seek(std::io::SeekFrom::End(0))?;
    for (name, info) in &content.tensor_infos {
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d));
        let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        let bytes = elems
            .filter(|n| n.is_multiple_of(block))
            .and_then(|n| (n / block).checked_mul(size))
            .ok_or_else(|| {
                anyhow!(
                    "{label}: tensor {name}: shape {:?} is not a valid {:?} tensor",
                    info.shape.dims(),
                    info.ggml_dtype
                )
            })?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes as u64));
        if end.is_none_or(|end| end > file_size) {
            bail!(
                "{label}: tensor {name} ({bytes} bytes at data offset {}) lies past the end of the file ({file_size} bytes); truncated download?",
                info.offset
            );
        }
    }
    Ok(())
}

/// GGUF: weights dequantized to `dtype`, tokenizer and chat template from metadata.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    read_gguf(path, dtype, device, false)
}

/// [`load_gguf`] with the frozen base held as the file's own quantized blocks (QLoRA's
/// `keep`), never dequantized: the decoder layers' linear weights, the embedding and
/// the LM head. Only the norms (and biases) are dequantized. A permuted q/k projection
/// is held with its rows put back in order, block rows copied; a vocabulary matrix in
/// a format the quantized matmul cannot take (f16, or rows not a whole number of block
/// pairs) is requantized to 8 bits instead.
pub fn load_gguf_keep(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    read_gguf(path, dtype, device, true)
}

fn read_gguf(path: &Path, dtype: DType, device: &Device, keep: bool) -> Result<Loaded> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let label = path.display().to_string();
    let GgufHeader {
        config: cfg,
        tokenizer,
        permuted,
        content,
    } = read_gguf_header(&mut file, &label)?;
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let mut params = Params::new();
    let mut quantized = std::collections::BTreeMap::new();
    for name in &names {
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| anyhow!("{label}: tensor {name}: {e}"))?;
        let hf =
            gguf_to_hf_name(name).ok_or_else(|| anyhow!("{label}: unexpected tensor {name}"))?;
        // llama.cpp stores q and k with their rows permuted
        let heads = match (permuted, hf.as_str()) {
            (true, n) if n.ends_with("q_proj.weight") => Some(cfg.num_attention_heads),
            (true, n) if n.ends_with("k_proj.weight") => Some(cfg.num_key_value_heads),
            _ => None,
        };
        // the vocabulary matrices: kept as they are when the quantized matmul takes
        // their format, else requantized to 8 bits one tensor at a time
        if keep && !hf.starts_with("model.layers.") && crate::model::quantizable(&hf) {
            let (_, inp) = q.shape().dims2()?;
            let fmt = q.dtype();
            let direct = !matches!(fmt, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
                && inp % (2 * fmt.block_size()) == 0;
            let ql = if direct {
                let rows: Vec<usize> = (0..q.shape().dims2()?.0).collect();
                crate::qlinear::QLinear::from_rows(&q, &rows, 256)
            } else {
                let w = q.dequantize(device)?;
                crate::qlinear::QLinear::quantize(&w, crate::model::VOCAB_FORMAT, 256)
            }
            .with_context(|| format!("{label}: {name} kept quantized"))?;
            quantized.insert(hf, ql);
            continue;
        }
        if keep && hf.starts_with("model.layers.") && hf.ends_with("_proj.weight") {
            let (out, _) = q.shape().dims2()?;
            // the row order unpermute_qk gives, read off a column of row indices
            let rows: Vec<usize> = match heads {
                Some(h) => {
                    let idx: Vec<f32> = (0..out).map(|i| i as f32).collect();
                    let col = Tensor::from_vec(idx, (out, 1), &Device::Cpu)?;
                    (unpermute_qk(&col, h)?.flatten_all()?.to_vec1::<f32>()?)
                        .into_iter()
                        .map(|x| x as usize)
                        .collect()
                }
                None => (0..out).collect(),
            };
            let ql = crate::qlinear::QLinear::from_rows(&q, &rows, 256)
                .with_context(|| format!("{label}: {name} kept quantized"))?;
            quantized.insert(hf, ql);
            continue;
        }
        let t = q
            .dequantize(device)?
            .to_dtype(crate::device::loss_dtype(dtype))?;
        let t = match heads {
            Some(h) => unpermute_qk(&t, h)?,
            None => t,
        };
        params.insert(hf, t);
    }
    let model = Transformer::from_parts(cfg, params, quantized, device)
        .with_context(|| format!("loading {label}"))?
        .with_compute_dtype(dtype);
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
    // The safetensors writer creates its file with mode 0600; give it the mode every
    // other file of the folder gets (0666 under the user's umask), read off a fresh file.
    let probe = path.with_extension("safetensors.mode");
    std::fs::File::create(&probe).with_context(|| format!("creating {}", probe.display()))?;
    let mode = std::fs::metadata(&probe)?.permissions();
    std::fs::remove_file(&probe)?;
    std::fs::set_permissions(&tmp, mode)
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
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
    export_hf_with(model, tok, dir, false)
}

/// [`export_hf`], and with `untie` a tied model's output projection written as its own
/// `lm_head.weight` (`tie_word_embeddings: false`). A serving engine that reloads
/// weights in place needs that: vLLM's in-place reload cannot refill a tied head, so a
/// tied model would keep serving the old one.
pub fn export_hf_with(
    model: &Transformer,
    tok: &TokenizerBundle,
    dir: &Path,
    untie: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut merged = Params::new();
    // a quantized base is written dequantized (the adapters merged into it)
    let dequantized = model
        .quantized
        .iter()
        .map(|(k, q)| Ok((k.clone(), q.dequantize()?)))
        .collect::<Result<Params>>()?;
    for (k, t) in model.params.iter().chain(&dequantized) {
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
    let mut config = model.cfg.to_hf_json();
    if untie && model.cfg.tie_word_embeddings {
        let embed = merged
            .get("model.embed_tokens.weight")
            .ok_or_else(|| anyhow!("a tied model without model.embed_tokens.weight"))?
            .copy()?;
        merged.insert("lm_head.weight".into(), embed);
        config["tie_word_embeddings"] = false.into();
    }
    save_safetensors(&merged, &dir.join("model.safetensors"), |_| true)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file::Value, QTensor};
    use std::io::Cursor;

    /// Written by llama.cpp's own `gguf` package (`fuzz/seeds/make_seeds.py`).
    fn reference_seed() -> Vec<u8> {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf_header/llama.gguf");
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn reads_a_header_written_by_the_reference_writer() {
        let h = read_gguf_header(&mut Cursor::new(reference_seed()), "seed.gguf").unwrap();
        let c = &h.config;
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers
            ),
            (8, 8, 16, 1)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (2, 1, 4)
        );
        assert!(c.tie_word_embeddings && h.permuted);
        assert_eq!(h.tokenizer.eos_ids, vec![7]);
    }

    /// A small llama GGUF written by candle's writer, with `edit` applied to its metadata.
    fn gguf_with(edit: impl Fn(&mut Vec<(String, Value)>), with_embedding: bool) -> Vec<u8> {
        let s = |v: &str| Value::String(v.into());
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), s("llama")),
            ("llama.embedding_length".into(), Value::U32(8)),
            ("llama.feed_forward_length".into(), Value::U32(16)),
            ("llama.block_count".into(), Value::U32(1)),
            ("llama.attention.head_count".into(), Value::U32(2)),
            ("llama.attention.head_count_kv".into(), Value::U32(1)),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(["a", "b", "ab", "c"].map(s).to_vec()),
            ),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![s("a b")])),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(3)),
        ];
        edit(&mut md);
        let emb = QTensor::quantize(
            &Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let tensors: Vec<(&str, &QTensor)> = if with_embedding {
            vec![("token_embd.weight", &emb)]
        } else {
            vec![("output_norm.weight", &emb)]
        };
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &md_refs, &tensors).unwrap();
        out.into_inner()
    }

    fn error_of(bytes: Vec<u8>) -> String {
        match read_gguf_header(&mut Cursor::new(bytes), "bad.gguf") {
            Ok(_) => panic!("damaged GGUF was accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn set(key: &'static str, v: Value) -> impl Fn(&mut Vec<(String, Value)>) {
        move |md| {
            md.retain(|(k, _)| k != key);
            md.push((key.into(), v.clone()));
        }
    }

    #[test]
    fn damaged_headers_are_errors_that_name_the_file() {
        if let Err(e) = read_gguf_header(&mut Cursor::new(gguf_with(|_| {}, true)), "ok.gguf") {
            panic!("{e:#}");
        }
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                gguf_with(set("llama.attention.head_count", Value::U32(0)), true),
                "num_attention_heads is 0",
            ),
            (
                gguf_with(set("llama.attention.head_count_kv", Value::U32(3)), true),
                "not a multiple",
            ),
            (
                gguf_with(set("llama.block_count", Value::String("1".into())), true),
                "llama.block_count is not an unsigned integer",
            ),
            (gguf_with(|_| {}, false), "no token_embd.weight"),
            (
                gguf_with(set("general.alignment", Value::U32(0)), true),
                "general.alignment",
            ),
            (
                gguf_with(set("general.alignment", Value::U32(48)), true),
                "general.alignment",
            ),
            (
                gguf_with(|_| {}, true)[..200].to_vec(),
                "bad.gguf: not a GGUF file",
            ),
            (b"GGUF".to_vec(), "bad.gguf: not a GGUF file"),
        ];
        for (bytes, want) in cases {
            let err = error_of(bytes);
            assert!(err.starts_with("bad.gguf"), "{err}");
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
        // Tensor data cut off: header intact, bytes missing.
        let full = gguf_with(|_| {}, true);
        let err = error_of(full[..full.len() - 16].to_vec());
        assert!(err.contains("past the end of the file"), "{err}");
    }
}
