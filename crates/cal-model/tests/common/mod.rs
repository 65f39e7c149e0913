//! Test helpers shared by the integration tests.

use cal_model::ModelConfig;

/// A two-layer model of `arch` small enough for f64 finite differences, with grouped
/// query attention and each architecture's own switches (tied embeddings, biases, QK
/// norm).
pub fn small(arch: &str) -> ModelConfig {
    ModelConfig {
        architecture: arch.into(),
        vocab_size: 23,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_linear_factor: None,
        max_position_embeddings: 64,
        tie_word_embeddings: arch == "llama",
        attention_bias: arch == "qwen2",
        qk_norm: arch == "qwen3",
    }
}
