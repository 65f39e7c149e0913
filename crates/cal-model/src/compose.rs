//! Differentiable compositions of candle-core primitives.
//!
//! candle-nn 0.11's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope*`
//! kernels have no backward pass: a graph through them silently drops gradients. Every
//! op here is built from candle-core primitives that do have one (checked against
//! finite differences in `tests/gradients.rs`). They serve every device; on the CPU,
//! [`crate::rowwise`] replaces them with fused kernels that compute the same values.

use candle_core::{Result, Tensor, D};

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`, computed in the input dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// Softmax over the last dimension. The max is subtracted (and detached: it cancels
/// out of the gradient) so that large logits do not overflow.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `[..., d]` → `[..., d]` with halves swapped and the first negated (HF Llama RoPE).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding of `x: [B, H, T, D]` with `cos, sin: [B, 1, T, D]` (per-row
/// positions, so left-padded batches rotate each row from its own first token).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}
