//! The ops a forward pass calls, and which implementation serves each: [`Kernels`]
//! picks this crate's differentiable kernels ([`crate::rowwise`], falling back to the
//! compositions of [`crate::compose`]) or candle-nn's fused inference kernels; the
//! linear layers pick candle's matmul, OpenBLAS or the decoding kernel of
//! [`crate::gemv`].

use candle_core::{DType, Result, Shape, Tensor, D};
use rand::{Rng, SeedableRng};

/// Which kernels a forward pass runs. candle-nn's fused RMSNorm, RoPE and softmax have
/// no backward pass, so they may serve only a pass that records no gradient (the
/// generator's); there they replace 5–7 candle ops each, which on a decoding step of a
/// small model is most of the non-matmul time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Differentiable: [`crate::rowwise`]'s kernels with hand-written backward passes
    /// (f32/f64 CPU) or the compositions of [`crate::compose`].
    Differentiable,
    /// candle-nn's fused kernels, which have no backward: inference only.
    Inference,
}

impl Kernels {
    /// Inference kernels only when no parameter takes part in autograd.
    pub fn for_params<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Self {
        if params.into_iter().any(Tensor::track_op) {
            Kernels::Differentiable
        } else {
            Kernels::Inference
        }
    }

    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            Kernels::Differentiable => crate::rowwise::rms_norm(x, weight, eps),
            Kernels::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        }
    }

    /// Attention probabilities `softmax(scores + bias)`, `bias: [B, 1, T, Tk]` shared
    /// by the heads of `scores: [B, H, T, Tk]`.
    pub fn masked_softmax(self, scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Differentiable => crate::rowwise::masked_softmax(scores, bias),
            Kernels::Inference => {
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(bias)?.contiguous()?)
            }
        }
    }

    /// The SwiGLU gate `silu(gate) ⊙ up` of the MLP.
    pub fn swiglu(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Differentiable => crate::rowwise::swiglu(gate, up),
            Kernels::Inference => gate.silu()? * up,
        }
    }

    /// RoPE tables from angles `[B, T, D/2]`, in the form [`Kernels::rope`] takes.
    pub fn rope_tables(self, angles: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let angles = match self {
            // [B, 1, T, D], halves duplicated, broadcast over heads
            Kernels::Differentiable => Tensor::cat(&[angles, angles], D::Minus1)?.unsqueeze(1)?,
            // [B, T, D/2], as candle-nn's kernel wants
            Kernels::Inference => angles.contiguous()?,
        };
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }

    /// Rotary embedding of `x: [B, H, T, D]` with tables from [`Kernels::rope_tables`].
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Differentiable => crate::rowwise::rope(x, cos, sin),
            Kernels::Inference => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        }
    }
}

/// `x: [N, in]` or `[B, T, in]` times `weight: [out, in]` transposed, plus `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let use_blas = crate::blas::enabled()
        && crate::device::cpu_kernels(x.device())
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32;
    let product = |x2: &Tensor| {
        if use_blas {
            crate::blas::matmul_nt(x2, weight)
        } else {
            x2.matmul(&weight.t()?)
        }
    };
    let y = match x.dims() {
        [b, t, i] => product(&x.reshape((b * t, *i))?)?.reshape((*b, *t, ()))?,
        _ => product(x)?,
    };
    add_bias(y, bias)
}

/// [`linear`] for one decoding step (one new token per row): streams the weight once
/// through [`crate::gemv`] where that applies, else falls back to [`linear`].
///
/// Only decoding steps take it, never a forward over whole sequences, even a short
/// one: a sequence's log-probs then do not depend on how the batch was split into
/// micro-batches, down to the last bit.
pub fn linear_decode(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    if !decode_sized(x, weight, rows) {
        return linear(x, weight, bias);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = weight.dim(0)?;
    let y = crate::gemv::matmul_nt(&x.reshape((rows, k))?, weight)?.reshape(dims)?;
    add_bias(y, bias)
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Few rows, f32 on the CPU, nothing to differentiate: the shape of a decoding step.
fn decode_sized(x: &Tensor, w: &Tensor, rows: usize) -> bool {
    rows <= crate::gemv::MAX_ROWS
        && crate::gemv::available()
        && crate::device::cpu_kernels(x.device())
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op()
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
    // FNV-1a of the module name, mixed into the dropout seed.
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
