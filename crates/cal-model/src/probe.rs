//! What distillation reads inside a model: the residual stream after chosen layers and
//! the attention maps of chosen layers, from one differentiable forward; and a student
//! made of some of a teacher's layers (DistilBERT's initialisation).

use crate::layer;
use crate::model::{positions_from_mask, Forward, Params, Transformer};
use crate::ops;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::cell::RefCell;

/// One forward's insides.
pub struct Probe {
    /// Final-normed hidden states `[B, T, H]` (what the logits are read from).
    pub hidden: Tensor,
    /// The residual stream `[B, T, H]` after each asked-for layer, in the order asked.
    pub layers: Vec<Tensor>,
    /// Attention probabilities `[B, heads, T, T]` of each asked-for layer (empty when
    /// not asked), in the order asked.
    pub attention: Vec<Tensor>,
}

impl Transformer {
    /// A training forward of the padded batch `ids: [B, T]` that also returns the
    /// residual stream after each layer in `layers` and, with `attention`, those layers'
    /// attention maps. Differentiable kernels only; the same values as
    /// [`Transformer::forward_hidden`] without a cache.
    pub fn forward_probe(
        &self,
        ids: &Tensor,
        mask: &[Vec<u8>],
        fwd: Forward,
        layers: &[usize],
        attention: bool,
    ) -> Result<Probe> {
        let n = self.cfg.num_hidden_layers;
        if let Some(&l) = layers.iter().find(|&&l| l >= n) {
            bail!("layer {l} asked for, the model has {n} (0..{})", n - 1);
        }
        let (b, t) = ids.dims2()?;
        let kern = ops::Kernels::Differentiable;
        let positions = positions_from_mask(mask, &self.device)?;
        let bias = ops::attention_bias(mask, t, 0, self.dtype, &self.device)?;
        let rope = kern.rope_tables(&self.rope_angles(&positions)?, self.dtype)?;
        let mut x = self.embed(ids)?.reshape((b, t, ()))?;
        let mut outs: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut maps: Vec<Option<Tensor>> = vec![None; layers.len()];
        for l in 0..n {
            let want = layers.iter().position(|&w| w == l);
            let probs = RefCell::new(None);
            let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
                if attention && want.is_some() {
                    let (o, p) = attend_with_probs(q, k, v, &bias)?;
                    *probs.borrow_mut() = Some(p);
                    Ok(o)
                } else {
                    layer::attend(kern, q, k, v, &bias)
                }
            };
            x = self
                .layer(l, kern, false, fwd)
                .forward(x, &rope, None, attend)?;
            if let Some(i) = want {
                for (j, &w) in layers.iter().enumerate().skip(i) {
                    if w == l {
                        outs[j] = Some(x.clone());
                        maps[j] = probs.borrow().clone();
                    }
                }
            }
        }
        let hidden = kern.rms_norm(&x, &self.p("model.norm.weight")?, self.cfg.rms_norm_eps)?;
        Ok(Probe {
            hidden,
            layers: outs.into_iter().flatten().collect(),
            attention: maps.into_iter().flatten().collect(),
        })
    }

    /// A model of the layers `keep` of this one (in that order), with its embeddings,
    /// final norm and head: layer `keep[i]` becomes layer `i`. The student of
    /// `distill --student-layers` (DistilBERT initialises its student this way).
    /// Adapters are not carried over.
    pub fn keep_layers(&self, keep: &[usize]) -> Result<Transformer> {
        let n = self.cfg.num_hidden_layers;
        if !self.quantized.is_empty() {
            bail!("--student-layers: the teacher's base is quantized; keep layers of an unquantized model");
        }
        if keep.is_empty() {
            bail!("--student-layers: keep at least one layer");
        }
        if let Some(&l) = keep.iter().find(|&&l| l >= n) {
            bail!(
                "--student-layers: layer {l} is out of range: the teacher has {n} layers (0..{})",
                n - 1
            );
        }
        let mut seen = keep.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != keep.len() {
            bail!("--student-layers: a layer is listed twice ({keep:?})");
        }
        let mut params = Params::new();
        for (name, t) in &self.params {
            if name.contains("lora_") {
                continue;
            }
            let t = t.detach().copy()?;
            match name.strip_prefix("model.layers.") {
                Some(rest) => {
                    let (l, tail) = rest.split_once('.').unwrap_or((rest, ""));
                    let l: usize = l.parse()?;
                    if let Some(i) = keep.iter().position(|&k| k == l) {
                        params.insert(format!("model.layers.{i}.{tail}"), t);
                    }
                }
                None => {
                    params.insert(name.clone(), t);
                }
            }
        }
        let mut cfg = self.cfg.clone();
        cfg.num_hidden_layers = keep.len();
        Ok(Transformer::new(cfg, params, &self.device)?.with_compute_dtype(self.dtype))
    }
}

/// Scaled dot-product attention that also returns its probabilities
/// `[B, nh, T, Tk]`; `q [B, nh, T, D]`, `k`, `v [B, nkv, Tk, D]`, `bias [B, 1, T, Tk]`.
/// Key/value heads are repeated for grouped queries (the maps are per query head).
fn attend_with_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, nh, _, hd) = q.dims4()?;
    let (nkv, tk) = (k.dim(1)?, k.dim(2)?);
    let rep = nh / nkv;
    let repeat = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.unsqueeze(2)?
            .broadcast_as((b, nkv, rep, tk, hd))?
            .reshape((b, nh, tk, hd))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scores = (q * (1.0 / (hd as f64).sqrt()))?.matmul(&k.t()?)?;
    let probs = crate::rowwise::masked_softmax(&scores, bias)?;
    Ok((probs.matmul(&v)?, probs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use candle_core::{DType, Device};

    fn model() -> Transformer {
        let mut cfg = ModelConfig::tiny(32);
        cfg.num_hidden_layers = 3;
        Transformer::init_random(cfg, 7, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_probe_is_the_plain_forward_and_maps_are_distributions() {
        let m = model();
        let ids = Tensor::new(&[[0u32, 5, 9, 3], [0, 0, 4, 8]], &Device::Cpu).unwrap();
        let mask = vec![vec![1, 1, 1, 1], vec![0, 0, 1, 1]];
        let pos = positions_from_mask(&mask, &Device::Cpu).unwrap();
        let plain = m
            .forward_hidden(&ids, &pos, &mask, None, Forward::INFERENCE)
            .unwrap();
        let p = m
            .forward_probe(&ids, &mask, Forward::INFERENCE, &[2, 0], true)
            .unwrap();
        let diff = (plain - &p.hidden)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        assert_eq!(p.layers.len(), 2);
        assert_eq!(p.attention.len(), 2);
        let (nh, t) = (m.cfg.num_attention_heads, 4);
        assert_eq!(p.attention[0].dims(), &[2, nh, t, t]);
        // causal rows that sum to one, nothing on padding or the future
        let maps = p.attention[0]
            .flatten_to(2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in maps.iter().enumerate() {
            let (bi, rest) = (r / (nh * t), r % (nh * t));
            let qi = rest % t;
            if mask[bi][qi] == 0 {
                continue;
            }
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {r} sums to {sum}");
            for (ki, &w) in row.iter().enumerate() {
                if ki > qi || mask[bi][ki] == 0 {
                    assert_eq!(w, 0.0, "row {r} attends to key {ki}");
                }
            }
        }
    }

    #[test]
    fn a_student_of_kept_layers_is_the_teacher_when_it_keeps_all() {
        let m = model();
        let same = m.keep_layers(&[0, 1, 2]).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
        let mask = vec![vec![1, 1, 1, 1]];
        let a = m.forward(&ids, &mask).unwrap();
        let b = same.forward(&ids, &mask).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        let two = m.keep_layers(&[0, 2]).unwrap();
        assert_eq!(two.cfg.num_hidden_layers, 2);
        let w = |m: &Transformer, name: &str| {
            m.params[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(
            w(&two, "model.layers.1.mlp.up_proj.weight"),
            w(&m, "model.layers.2.mlp.up_proj.weight")
        );
        let Err(err) = m.keep_layers(&[0, 3]) else {
            panic!("layer 3 of 3 accepted")
        };
        let err = err.to_string();
        assert!(
            err.contains("--student-layers") && err.contains("3 layers"),
            "{err}"
        );
    }
}
