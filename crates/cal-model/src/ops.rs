//! Differentiable building blocks.
//!
//! candle-nn 0.11's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope*`
//! kernels have no backward pass: a graph through them silently drops gradients. Every
//! op here is a composition of candle-core primitives that do have one (checked against
//! finite differences in `tests/gradients.rs`).

use candle_core::{DType, Result, Shape, Tensor, D};
use rand::{Rng, SeedableRng};

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

/// `x: [N, in]` or `[B, T, in]` times `weight: [out, in]` transposed, plus `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = match x.dims() {
        [b, t, i] => x
            .reshape((b * t, *i))?
            .matmul(&weight.t()?)?
            .reshape((*b, *t, ()))?,
        _ => x.matmul(&weight.t()?)?,
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Additive attention bias `[B, 1, Tq, Tk]`: 0 where query `i` (absolute index
/// `offset + i`) may see key `j` (`j <= offset + i` and `key_mask[b, j] = 1`), a large
/// negative number elsewhere. Finite rather than −∞ so that fully masked (padding)
/// rows give a uniform softmax instead of NaN.
pub fn attention_bias(
    key_mask: &[Vec<u8>],
    tq: usize,
    offset: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let b = key_mask.len();
    let tk = key_mask.first().map_or(0, |m| m.len());
    let mut data = vec![0f32; b * tq * tk];
    for (bi, m) in key_mask.iter().enumerate() {
        for i in 0..tq {
            let row = &mut data[(bi * tq + i) * tk..(bi * tq + i + 1) * tk];
            for (j, v) in row.iter_mut().enumerate() {
                if j > offset + i || m[j] == 0 {
                    *v = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, tq, tk), dev)?.to_dtype(dtype)
}

/// Inverted-dropout mask of `shape`: each entry is `0` with probability `p`,
/// else `1 / (1 - p)`. Deterministic in (`seed`, `name`): the same training forward
/// always draws the same mask, which keeps checkpoint-resume bit-exact.
pub fn dropout_mask(
    shape: &Shape,
    p: f64,
    seed: u64,
    name: &str,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    // FNV-1a of the module name, mixed into the seed.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h);
    let keep = (1.0 / (1.0 - p)) as f32;
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(data, shape.clone(), dev)
}
