//! Attention of one decoding step: one new query per row and head against the cached
//! keys and values, in one pass per (row, KV head) group, for the generator only.
//!
//! The general path (`q·Kᵀ`, scale, bias, softmax, `·V`) is six candle ops and two
//! batched gemm calls of shape `[rep, D] × [D, Tk]` per layer; at decoding sizes their
//! fixed costs exceed the arithmetic. Here each (row, KV head) task computes its `rep`
//! query heads' scores, softmax and weighted sum directly from the cache buffer (a
//! strided view of the preallocated [`crate::KvCache`] is read in place). Forward only;
//! `tests/gradients.rs` checks it against the general path.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `q [B, nh, 1, D]`, `k`/`v [B, nkv, Tk, D]` (last two axes dense), `key_mask[b][j]`
/// = 0 hides key `j` of row `b` → `[B, nh, 1, D]`. f32 CPU tensors.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: &[Vec<u8>],
    scale: f64,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            key_mask: key_mask.to_vec(),
            scale: scale as f32,
        },
    )
}

/// Whether [`decode_attention`] serves a model on this device and dtype (else the
/// general path). Its shapes are checked by the op itself.
pub fn serves(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    crate::device::cpu_kernels(device) && dtype == candle_core::DType::F32
}

struct DecodeAttention {
    key_mask: Vec<Vec<u8>>,
    scale: f32,
}

/// Offsets of a `[B, H, T, D]` tensor whose last two axes are dense (a narrowed cache
/// buffer is): element `(b, h, t, 0)` is at `base + b·sb + h·sh + t·D`.
struct Dense3 {
    base: usize,
    sb: usize,
    sh: usize,
}

fn dense3(l: &Layout, d: usize, what: &str) -> Result<Dense3> {
    let s = l.stride();
    if l.dims().len() != 4 || s[3] != 1 || (l.dims()[2] > 1 && s[2] != d) {
        candle_core::bail!(
            "decode attention: {what} must be [B, H, T, D] with dense rows, got dims {:?} strides {:?}",
            l.dims(),
            s
        );
    }
    Ok(Dense3 {
        base: l.start_offset(),
        sb: s[0],
        sh: s[1],
    })
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("decode attention: expected f32 inputs");
        };
        let (&[b, nh, tq, d], &[kb, nkv, tk, kd]) = (ql.dims(), kl.dims()) else {
            candle_core::bail!(
                "decode attention: expected 4-D q and k, got {:?} and {:?}",
                ql.dims(),
                kl.dims()
            );
        };
        if tq != 1 || kb != b || kd != d || vl.dims() != kl.dims() || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "decode attention: q {:?}, k {:?}, v {:?} do not fit one decoding step",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        if self.key_mask.len() != b || self.key_mask.iter().any(|m| m.len() != tk) {
            candle_core::bail!("decode attention: key mask is not [{b}, {tk}]");
        }
        let Some((q0, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("decode attention: q must be contiguous");
        };
        let (kd3, vd3) = (dense3(kl, d, "k")?, dense3(vl, d, "v")?);
        let rep = nh / nkv;
        let simd = simd_available();
        let mut out = vec![0f32; b * nh * d];
        out.par_chunks_mut(rep * d).enumerate().for_each_init(
            || vec![0f32; tk],
            |scores, (task, dst)| {
                let (bi, g) = (task / nkv, task % nkv);
                let group = Group {
                    q: &q[q0 + (bi * nh + g * rep) * d..][..rep * d],
                    k: &k[kd3.base + bi * kd3.sb + g * kd3.sh..],
                    v: &v[vd3.base + bi * vd3.sb + g * vd3.sh..],
                    mask: &self.key_mask[bi],
                    d,
                    scale: self.scale,
                };
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd_available` checked avx2 and fma at run time.
                    unsafe { group.run_avx2(scores, dst) };
                    return;
                }
                let _ = simd;
                group.run(scores, dst);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, nh, 1, d))))
    }
}

/// The query heads of one (row, KV head) pair and that pair's cached keys/values.
struct Group<'a> {
    /// `rep` query heads, `d` values each.
    q: &'a [f32],
    /// Keys / values from position 0, `d` values per position, dense.
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a [u8],
    d: usize,
    scale: f32,
}

impl Group<'_> {
    /// The same body compiled for AVX2+FMA (the default target has only SSE2).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, scores: &mut [f32], out: &mut [f32]) {
        self.run(scores, out)
    }

    /// Scores, softmax and the weighted sum of values for each query head into `out`.
    #[inline(always)]
    fn run(&self, scores: &mut [f32], out: &mut [f32]) {
        let d = self.d;
        for (qh, o) in self.q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = if self.mask[j] == 0 {
                    f32::NEG_INFINITY
                } else {
                    dot(qh, &self.k[j * d..(j + 1) * d]) * self.scale
                };
                max = max.max(*s);
            }
            if max == f32::NEG_INFINITY {
                // A row with no visible key (all padding): the general path's finite
                // bias gives a uniform average; do the same.
                scores.iter_mut().for_each(|s| *s = 1.0);
                max = 1.0;
            }
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            for (j, &p) in scores.iter().enumerate() {
                if p > 0.0 {
                    axpy(p / total, &self.v[j * d..(j + 1) * d], o);
                }
            }
        }
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Eight partial sums so that the compiler vectorises without reassociating.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
