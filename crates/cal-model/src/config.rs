//! Architecture hyper-parameters of the Llama family (Llama, SmolLM2, Qwen2/2.5, Qwen3),
//! read from a Hugging Face `config.json`, a GGUF header, or the embedded `tiny` preset.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `rope_scaling` of Llama 3.1+ (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `llama`, `qwen2`, `qwen3` (drives bias and q/k-norm defaults).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Linear scaling (`rope_type = "linear"`): positions are divided by this.
    pub rope_linear_factor: Option<f64>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
}

impl ModelConfig {
    /// The embedded default: a few million parameters, trained from scratch in-process.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            architecture: "llama".into(),
            vocab_size,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rope_linear_factor: None,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
        }
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        let arch = v["model_type"].as_str().unwrap_or("").to_string();
        let architecture = match arch.as_str() {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            other => bail!(
                "{}: unsupported model_type {other:?} (supported: llama, mistral, qwen2, qwen3)",
                path.display()
            ),
        };
        let req = |k: &str| -> Result<usize> {
            v[k].as_u64().map(|x| x as usize).with_context(|| {
                format!(
                    "{}: field `{k}` is missing or not an integer",
                    path.display()
                )
            })
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let head_dim = v["head_dim"].as_u64().map_or(
            hidden_size.checked_div(num_attention_heads).unwrap_or(0),
            |x| x as usize,
        );
        let (mut rope_scaling, mut rope_linear_factor) = (None, None);
        if let Some(rs) = v.get("rope_scaling").filter(|r| !r.is_null()) {
            let kind = rs["rope_type"]
                .as_str()
                .or(rs["type"].as_str())
                .unwrap_or("");
            match kind {
                "llama3" => {
                    rope_scaling = Some(Llama3RopeScaling {
                        factor: rs["factor"].as_f64().unwrap_or(8.0),
                        low_freq_factor: rs["low_freq_factor"].as_f64().unwrap_or(1.0),
                        high_freq_factor: rs["high_freq_factor"].as_f64().unwrap_or(4.0),
                        original_max_position_embeddings: rs["original_max_position_embeddings"]
                            .as_u64()
                            .unwrap_or(8192)
                            as usize,
                    })
                }
                "linear" => rope_linear_factor = rs["factor"].as_f64(),
                "default" | "" => {}
                other => bail!(
                    "{}: unsupported rope_scaling type {other:?}",
                    path.display()
                ),
            }
        }
        let cfg = Self {
            architecture: architecture.into(),
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: v["num_key_value_heads"]
                .as_u64()
                .map_or(num_attention_heads, |x| x as usize),
            head_dim,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10_000.0),
            rope_scaling,
            rope_linear_factor,
            max_position_embeddings: v["max_position_embeddings"].as_u64().unwrap_or(4096) as usize,
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: v["attention_bias"]
                .as_bool()
                .unwrap_or(architecture == "qwen2"),
            qk_norm: architecture == "qwen3",
        };
        cfg.check().with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// Rejects shapes no model can have (zero sizes, heads that do not group, an odd
    /// head size for RoPE, sizes whose products overflow), so that a damaged header is
    /// a clear error here rather than a division by zero or an absurd allocation later.
    pub fn check(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} is 0");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            );
        }
        // Every weight matrix's element count must fit comfortably in memory arithmetic.
        let fits = |a: usize, b: usize| a.checked_mul(b).is_some_and(|n| n < 1 << 40);
        let q = self.num_attention_heads.checked_mul(self.head_dim);
        if !(fits(self.vocab_size, self.hidden_size)
            && fits(self.hidden_size, self.intermediate_size)
            && q.is_some_and(|q| fits(q, self.hidden_size)))
        {
            bail!("layer sizes are too large to be a real model");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            bail!(
                "rms_norm_eps must be finite and non-negative, got {}",
                self.rms_norm_eps
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "rope_theta must be finite and positive, got {}",
                self.rope_theta
            );
        }
        Ok(())
    }

    /// Writes a Hugging Face `config.json` for this architecture.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (model_type, arch) = match self.architecture.as_str() {
            "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
            "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
            _ => ("llama", "LlamaForCausalLM"),
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(rs) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
            });
        }
        v
    }

    /// Inverse frequencies of RoPE, with Llama 3 scaling where configured.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        inv
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.attention_bias {
            attn += q + 2 * kv;
        }
        if self.qk_norm {
            attn += 2 * self.head_dim;
        }
        let layer = attn + 3 * h * i + 2 * h;
        v * h
            + self.num_hidden_layers * layer
            + h
            + if self.tie_word_embeddings { 0 } else { v * h }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_shapes_are_errors_naming_the_file() {
        let base = ModelConfig::tiny(64).to_hf_json();
        let p = Path::new("m/config.json");
        let ok = ModelConfig::from_hf_json(&base.to_string(), p).unwrap();
        assert_eq!(ok, ModelConfig::tiny(64));
        for (key, value, want) in [
            (
                "num_attention_heads",
                serde_json::json!(0),
                "num_attention_heads is 0",
            ),
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "not a multiple",
            ),
            ("head_dim", serde_json::json!(7), "must be even"),
            ("vocab_size", serde_json::json!(u64::MAX), "too large"),
            ("rope_theta", serde_json::json!(-1.0), "rope_theta"),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let err = format!(
                "{:#}",
                ModelConfig::from_hf_json(&v.to_string(), p).unwrap_err()
            );
            assert!(
                err.starts_with("m/config.json") && err.contains(want),
                "{key}: {err}"
            );
        }
    }
}
