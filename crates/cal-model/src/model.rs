//! The Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied or
//! untied `lm_head`, optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3), optional
//! LoRA adapters on any linear layer.
//!
//! Weights live in one name → tensor map with Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so loading, saving, LoRA and the
//! optimizer all speak the same language. Every op on the forward path is
//! differentiable (see [`crate::ops`]).

use crate::config::ModelConfig;
use crate::layer::{self, merge_heads, Layer, Weights};
pub use crate::layer::{Forward, KvCache};
use crate::qlinear::QLinear;
use crate::{attention, ops};
use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, D};
use rand::SeedableRng;
use rand_distr_lite::normal_vec;
use std::collections::BTreeMap;

/// Name → tensor, with Hugging Face names.
pub type Params = BTreeMap<String, Tensor>;

/// The token embedding's name (also the output projection of a tied model).
pub const EMBED: &str = "model.embed_tokens.weight";
/// An untied model's output projection.
pub const HEAD: &str = "lm_head.weight";

/// The format QLoRA holds the vocabulary matrices in when it quantizes a base: 8 bits
/// whatever the layers get, as llama.cpp's own 4-bit files hold SmolLM2's embedding
/// (the head's errors reach every token's log-probability directly).
pub const VOCAB_FORMAT: GgmlDType = GgmlDType::Q8_0;

/// Whether `name` is a frozen base weight QLoRA holds quantized: a decoder layer's
/// linear weight or a vocabulary matrix.
pub fn quantizable(name: &str) -> bool {
    (name.starts_with("model.layers.") && name.ends_with("_proj.weight"))
        || name == EMBED
        || name == HEAD
}

/// The format QLoRA quantizes base weight `name` to: `layers` for a decoder layer's,
/// [`VOCAB_FORMAT`] for a vocabulary matrix.
fn base_format(name: &str, layers: GgmlDType) -> GgmlDType {
    if name.starts_with("model.layers.") {
        layers
    } else {
        VOCAB_FORMAT
    }
}

/// LoRA settings. Adapter tensors are `<module>.lora_A` `[r, in]` and
/// `<module>.lora_B` `[out, r]`; `B` starts at zero so a fresh adapter is a no-op.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module suffixes, e.g. `q_proj`, `v_proj`.
    pub targets: Vec<String>,
}

pub struct Transformer {
    pub cfg: ModelConfig,
    pub params: Params,
    pub lora: Option<LoraConfig>,
    /// Run candle-nn's fused inference kernels (no backward; see [`ops::Kernels`]).
    /// Set only on the generator's view: reference and old log-probs go through the
    /// very kernels of the training forward, so that at step 0 the reference log-probs
    /// equal the policy's bit for bit and the KL term's gradient is exactly zero (a
    /// 1e-7 disagreement there becomes a full-size Adam step on untouched weights).
    pub fast_inference: bool,
    pub device: Device,
    pub dtype: DType,
    inv_freq: Tensor,
    /// Frozen linear weights held quantized (QLoRA's base), by parameter name; they are
    /// not in `params`. Empty unless [`Transformer::quantize_base`] ran.
    pub quantized: BTreeMap<String, QLinear>,
}

/// The parameter names and shapes an architecture needs.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v, d) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.head_dim,
    );
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if cfg.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

pub mod rand_distr_lite {
    use rand::Rng;
    /// Standard normal samples by Box–Muller (keeps the dependency list short).
    pub fn normal_vec(rng: &mut impl Rng, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push((r * t.cos() * std) as f32);
            if out.len() < n {
                out.push((r * t.sin() * std) as f32);
            }
        }
        out
    }
}

impl Transformer {
    /// Checks names, shapes and dtypes of `params` against `cfg` and builds the model.
    pub fn new(cfg: ModelConfig, params: Params, device: &Device) -> Result<Self> {
        Self::from_parts(cfg, params, BTreeMap::new(), device)
    }

    /// [`Transformer::new`] with some linear weights held quantized instead of in
    /// `params`.
    pub(crate) fn from_parts(
        cfg: ModelConfig,
        params: Params,
        quantized: BTreeMap<String, QLinear>,
        device: &Device,
    ) -> Result<Self> {
        // the final norm is never quantized, so it carries the parameters' dtype
        let dtype = params
            .get("model.norm.weight")
            .map(|t| t.dtype())
            .ok_or_else(|| anyhow::anyhow!("missing tensor model.norm.weight"))?;
        for (name, shape) in expected_shapes(&cfg) {
            if let Some(q) = quantized.get(&name) {
                let (o, i) = q.dims();
                if [o, i] != shape.as_slice() {
                    bail!("quantized {name}: expected shape {shape:?}, found [{o}, {i}]");
                }
                continue;
            }
            match params.get(&name) {
                None => bail!("missing tensor {name} (expected shape {shape:?})"),
                Some(t) if t.dims() != shape.as_slice() => {
                    bail!(
                        "tensor {name}: expected shape {shape:?}, found {:?}",
                        t.dims()
                    )
                }
                Some(t) if t.dtype() != dtype => {
                    bail!("tensor {name}: dtype {:?}, expected {dtype:?}", t.dtype())
                }
                _ => {}
            }
        }
        let inv: Vec<f32> = cfg.rope_inv_freq().iter().map(|x| *x as f32).collect();
        let n = inv.len();
        let inv_freq = Tensor::from_vec(inv, (1, 1, n), device)?;
        Ok(Self {
            cfg,
            params,
            lora: None,
            fast_inference: false,
            device: device.clone(),
            dtype,
            inv_freq,
            quantized,
        })
    }

    /// Random initialisation (normal, std 0.02; norms at 1), seeded; computes in `dtype`
    /// (half precision keeps f32 weights, see [`crate::load::load`]).
    pub fn init_random(cfg: ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::draw_random(cfg, seed, None, dtype, device)
    }

    /// [`Transformer::init_random`] with the decoder layers' linear weights quantized
    /// to `q` one at a time, as they are drawn: a QLoRA base of a shape whose f32 weights
    /// would not fit in memory (a 7B model's 28 GB) never exists in f32 at once. The
    /// same draws as `init_random`, so quantizing its model afterwards gives the same
    /// blocks.
    pub fn init_random_quantized(
        cfg: ModelConfig,
        seed: u64,
        q: GgmlDType,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::draw_random(cfg, seed, Some(q), dtype, device)
    }

    /// The draws of both: every weight N(0, 0.02²) in name order, norms 1, biases 0;
    /// with `q`, each layer's linear weight quantized as soon as it is drawn.
    fn draw_random(
        cfg: ModelConfig,
        seed: u64,
        q: Option<GgmlDType>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut params = Params::new();
        let mut quantized = BTreeMap::new();
        for (name, shape) in expected_shapes(&cfg) {
            let n: usize = shape.iter().product();
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            } else {
                Tensor::from_vec(normal_vec(&mut rng, n, 0.02), shape.as_slice(), device)?
            };
            if let (Some(q), true) = (q, quantizable(&name)) {
                let ql = QLinear::quantize(&t, base_format(&name, q), 256)
                    .with_context(|| format!("quantizing {name}"))?;
                quantized.insert(name, ql);
            } else {
                params.insert(name, t.to_dtype(crate::device::loss_dtype(dtype))?);
            }
        }
        Ok(Self::from_parts(cfg, params, quantized, device)?.with_compute_dtype(dtype))
    }

    /// A frozen deep copy (new storage): the reference policy of full fine-tuning.
    /// In the compute dtype: a bf16 policy with f32 master weights gets a bf16 reference.
    pub fn frozen_copy(&self) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.detach().to_dtype(self.dtype)?.copy()?)))
            .collect::<Result<Params>>()?;
        let mut m = Self::from_parts(
            self.cfg.clone(),
            params,
            self.quantized.clone(),
            &self.device,
        )?;
        m.lora = self.lora.clone();
        Ok(m)
    }

    /// Runs in `dtype` (activations, KV cache, products) whatever the parameters are
    /// stored in: f32 weights with a bf16 compute dtype are mixed-precision training's
    /// master weights.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// A copy on `device` (same dtypes, no autograd graph): how the GPU tests put one
    /// model on both devices.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if !self.quantized.is_empty() && !device.same_device(&self.device) {
            bail!("a model with a quantized base stays on the device it was quantized on");
        }
        let params = self
            .params
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.detach().to_device(device)?)))
            .collect::<Result<Params>>()?;
        let mut m = Self::from_parts(self.cfg.clone(), params, self.quantized.clone(), device)?
            .with_compute_dtype(self.dtype);
        m.lora = self.lora.clone();
        Ok(m)
    }

    /// The dtype trainable parameters and their optimizer state are kept in.
    pub fn master_dtype(&self) -> DType {
        crate::device::loss_dtype(self.dtype)
    }

    /// The same model on the same storage with gradient tracking cut: for inference on
    /// a trainable policy (its `Var`s keep being updated in place by the optimizer).
    /// Master weights kept wider than the compute dtype are cast once here (new storage,
    /// a snapshot), so that a decoding loop does not cast them at every token.
    pub fn detached(&self) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.detach().to_dtype(self.dtype)?)))
            .collect::<Result<Params>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            params,
            lora: self.lora.clone(),
            fast_inference: false,
            device: self.device.clone(),
            dtype: self.dtype,
            inv_freq: self.inv_freq.clone(),
            quantized: self.quantized.clone(),
        })
    }

    /// QLoRA's base: every decoder layer's linear weight (`*_proj.weight`) is quantized
    /// to `dtype`, and the embedding and LM head to [`VOCAB_FORMAT`], each dropped from
    /// `params`, so the frozen base is never held in f32 again; norms, biases and
    /// adapters stay as they are. Returns the bytes the quantized weights take. Call
    /// before adapters are attached or anything is made trainable (quantized weights
    /// are frozen).
    pub fn quantize_base(&mut self, dtype: GgmlDType) -> Result<usize> {
        let names: Vec<String> = self
            .params
            .keys()
            .filter(|k| quantizable(k))
            .cloned()
            .collect();
        let mut bytes = 0;
        for name in names {
            let w = self.params.remove(&name).expect("listed above");
            let q = QLinear::quantize(&w, base_format(&name, dtype), 256)
                .with_context(|| format!("quantizing {name}"))?;
            bytes += q.storage_bytes();
            self.quantized.insert(name, q);
        }
        Ok(bytes)
    }

    /// Adds zero-initialised (B = 0) LoRA adapters on every linear layer whose name ends
    /// with one of `cfg.targets`; returns the new adapter names.
    pub fn add_lora(&mut self, cfg: LoraConfig, seed: u64) -> Result<Vec<String>> {
        if !(0.0..1.0).contains(&cfg.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", cfg.dropout);
        }
        if cfg.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut added = Vec::new();
        // the linear weights, in f32 or quantized, with their [out, in]
        let weights = self
            .params
            .iter()
            .filter(|(_, t)| t.rank() == 2)
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .chain(self.quantized.iter().map(|(k, q)| {
                let (o, i) = q.dims();
                (k.clone(), vec![o, i])
            }));
        let mut targets: Vec<(String, Vec<usize>)> = weights
            .filter(|(k, _)| {
                k.ends_with(".weight")
                    && cfg
                        .targets
                        .iter()
                        .any(|tg| k.trim_end_matches(".weight").ends_with(tg.as_str()))
            })
            .map(|(k, d)| (k.trim_end_matches(".weight").to_string(), d))
            .collect();
        // one order whatever holds the weight, so a seed draws the same adapters
        targets.sort();
        if targets.is_empty() {
            bail!("LoRA targets {:?} match no linear layer", cfg.targets);
        }
        for (module, dims) in targets {
            let (out, inp) = (dims[0], dims[1]);
            // Kaiming-uniform-like scale for A, as PEFT does; B = 0.
            let a = normal_vec(&mut rng, cfg.rank * inp, 1.0 / (inp as f64).sqrt());
            let master = self.master_dtype();
            let a = Tensor::from_vec(a, (cfg.rank, inp), &self.device)?.to_dtype(master)?;
            let b = Tensor::zeros((out, cfg.rank), master, &self.device)?;
            self.params.insert(format!("{module}.lora_A"), a);
            self.params.insert(format!("{module}.lora_B"), b);
            added.push(format!("{module}.lora_A"));
            added.push(format!("{module}.lora_B"));
        }
        self.lora = Some(cfg);
        Ok(added)
    }

    /// Turns the parameters selected by `filter` into candle `Var`s (fresh storage the
    /// optimizer updates in place) and returns them, sorted by name. Half-precision
    /// models get f32 `Var`s (master weights); [`Self::p`] casts them for each forward.
    pub fn make_trainable(
        &mut self,
        filter: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, candle_core::Var)>> {
        let mut out = Vec::new();
        let master = self.master_dtype();
        for (name, t) in self.params.iter_mut() {
            if filter(name) {
                let var = candle_core::Var::from_tensor(&t.detach().to_dtype(master)?)?;
                *t = var.as_tensor().clone();
                out.push((name.clone(), var));
            }
        }
        Ok(out)
    }

    /// Parameter `name` in the compute dtype. Trainable half-precision models keep f32
    /// master weights (the `Var`s AdamW updates); this cast is differentiable, so their
    /// gradients arrive in f32. A no-op when the dtypes agree.
    pub(crate) fn p(&self, name: &str) -> candle_core::Result<Tensor> {
        self.params[name].to_dtype(self.dtype)
    }

    fn p_opt(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        self.params
            .get(name)
            .map(|t| t.to_dtype(self.dtype))
            .transpose()
    }

    /// `module.weight` (+ bias, + LoRA when `fwd` applies adapters) applied to `x`.
    /// `decode`: this is one decoding step of a pass without gradients.
    pub(crate) fn lin(
        &self,
        module: &str,
        x: &Tensor,
        decode: bool,
        fwd: Forward,
    ) -> candle_core::Result<Tensor> {
        let linear = if decode {
            ops::linear_decode
        } else {
            ops::linear
        };
        let name = format!("{module}.weight");
        let bias = self.p_opt(&format!("{module}.bias"))?;
        let y = match self.quantized.get(&name) {
            Some(q) => {
                let y = if decode {
                    q.forward_decode(x)?
                } else {
                    q.forward(x)?
                };
                match &bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            None => linear(x, &self.p(&name)?, bias.as_ref())?,
        };
        match (
            &self.lora,
            fwd.adapters,
            self.p_opt(&format!("{module}.lora_A"))?,
        ) {
            (Some(cfg), true, Some(a)) => {
                let b = self.p(&format!("{module}.lora_B"))?;
                let scale = cfg.alpha / cfg.rank as f64;
                let x = match fwd.dropout_seed {
                    Some(seed) if cfg.dropout > 0.0 => {
                        let mask =
                            ops::dropout_mask(x.shape(), cfg.dropout, seed, module, x.device())?;
                        x.broadcast_mul(&mask.to_dtype(x.dtype())?)?
                    }
                    _ => x.clone(),
                };
                y + (linear(&linear(&x, &a, None)?, &b, None)? * scale)?
            }
            _ => Ok(y),
        }
    }

    /// RoPE angles `[B, T, D/2]` of per-row `positions: [B, T]`.
    pub(crate) fn rope_angles(&self, positions: &Tensor) -> candle_core::Result<Tensor> {
        let mut pos = positions.to_dtype(DType::F32)?;
        if let Some(f) = self.cfg.rope_linear_factor {
            pos = (pos / f)?;
        }
        pos.unsqueeze(D::Minus1)?.broadcast_mul(&self.inv_freq)
    }

    /// Runs the decoder on `ids: [B, T]` (u32) at `positions: [B, T]` (u32) and returns
    /// the final-normed hidden states `[B, T, H]`. `key_mask` covers the new tokens;
    /// with a cache it is appended to the cached mask.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: &[Vec<u8>],
        mut cache: Option<&mut KvCache>,
        fwd: Forward,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let full_mask: Vec<Vec<u8>> = match cache.as_deref_mut() {
            Some(c) => {
                if c.mask.is_empty() {
                    c.mask = vec![Vec::new(); b];
                }
                for (m, new) in c.mask.iter_mut().zip(key_mask) {
                    m.extend_from_slice(new);
                }
                c.mask.clone()
            }
            None => key_mask.to_vec(),
        };
        // Fused inference kernels only when asked for and nothing here can take a
        // gradient.
        let kern = if self.fast_inference {
            ops::Kernels::for_params(self.params.values())
        } else {
            ops::Kernels::Differentiable
        };
        let decode = kern == ops::Kernels::Inference && t == 1;
        // The decoding attention kernel reads the key mask directly: no bias tensor.
        let bias = if decode && attention::serves(&self.device, self.dtype) {
            None
        } else {
            Some(ops::attention_bias(
                &full_mask,
                t,
                offset,
                self.dtype,
                &self.device,
            )?)
        };
        let rope = kern.rope_tables(&self.rope_angles(positions)?, self.dtype)?;
        let mut x = self.embed(ids)?.reshape((b, t, ()))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| match &bias {
            Some(bias) => layer::attend(kern, q, k, v, bias),
            None => attention::decode_attention(q, k, v, &full_mask, scale),
        };
        for l in 0..cfg.num_hidden_layers {
            let cached = cache.as_deref_mut().map(|c| (c, offset));
            x = self
                .layer(l, kern, decode, fwd)
                .forward(x, &rope, cached, attend)?;
        }
        if let Some(c) = cache {
            c.last_pos = positions
                .narrow(1, t - 1, 1)?
                .flatten_all()?
                .to_vec1::<u32>()?
                .into_iter()
                .map(i64::from)
                .collect();
        }
        kern.rms_norm(&x, &self.p("model.norm.weight")?, cfg.rms_norm_eps)
    }

    /// Token embeddings of `ids` (any shape) as `[ids.elem_count(), H]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self.quantized.get(EMBED) {
            Some(q) => q
                .rows(&ids.flatten_all()?.to_vec1::<u32>()?, &self.device)?
                .to_dtype(self.dtype),
            None => self.p(EMBED)?.embedding(&ids.flatten_all()?),
        }
    }

    /// Decoder layer `l` of one forward pass.
    pub(crate) fn layer(
        &self,
        l: usize,
        kern: ops::Kernels,
        decode: bool,
        fwd: Forward,
    ) -> Layer<'_> {
        Layer {
            m: self as &dyn Weights,
            l,
            p: format!("model.layers.{l}"),
            kern,
            decode,
            fwd,
        }
    }

    /// The shared-prefix forward: `G` completions of one prompt attend to that prompt's
    /// keys and values, computed once.
    ///
    /// `prefix_ids: [n, Lp]` are the distinct prompts (left-padded, `prefix_mask`),
    /// `suffix_ids: [B, Ts]` the continuations (right-padded, `suffix_mask`), and
    /// `group[b]` the prompt row `b` continues. Returns the final-normed hidden states of
    /// the prompts `[n, Lp, H]` and of the continuations `[B, Ts, H]`: the same values as
    /// [`Self::forward_hidden`] over the concatenated rows, with sums in another order.
    ///
    /// Per-token work (the linear layers, norms, MLP) runs once over the `n·Lp + B·Ts`
    /// tokens; the continuations' attention reads the prompt keys through an index
    /// select, whose backward sums the `G` rows' gradients into the prompt (LoRA
    /// adapters on prompt positions get their gradient there). LoRA dropout masks are
    /// drawn per token matrix, so with dropout they differ from the unshared forward's.
    pub fn forward_shared(
        &self,
        prefix_ids: &Tensor,
        prefix_mask: &[Vec<u8>],
        suffix_ids: &Tensor,
        suffix_mask: &[Vec<u8>],
        group: &[u32],
        fwd: Forward,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let cfg = &self.cfg;
        let ((n, lp), (b, ts)) = (prefix_ids.dims2()?, suffix_ids.dims2()?);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if group.len() != b || group.iter().any(|&g| g as usize >= n) {
            candle_core::bail!("forward_shared: {b} rows need a prompt index below {n} each");
        }
        let dev = &self.device;
        let gidx = Tensor::new(group, dev)?;
        // Continuation token t of row b sits at position (real prompt length) + t.
        let prompt_len: Vec<u32> = prefix_mask
            .iter()
            .map(|m| m.iter().map(|&x| u32::from(x != 0)).sum())
            .collect();
        let suffix_pos: Vec<u32> = group
            .iter()
            .flat_map(|&g| {
                let p = prompt_len[g as usize];
                (0..ts as u32).map(move |t| p + t)
            })
            .collect();
        let suffix_pos = Tensor::from_vec(suffix_pos, (b, ts), dev)?;
        let kern = ops::Kernels::Differentiable;
        let (cos_p, sin_p) = kern.rope_tables(
            &self.rope_angles(&positions_from_mask(prefix_mask, dev)?)?,
            self.dtype,
        )?;
        let (cos_s, sin_s) = kern.rope_tables(&self.rope_angles(&suffix_pos)?, self.dtype)?;
        let bias_p = ops::attention_bias(prefix_mask, lp, 0, self.dtype, dev)?;
        // A continuation sees its prompt's real tokens and its own tokens up to itself.
        let suffix_keys: Vec<Vec<u8>> = group
            .iter()
            .zip(suffix_mask)
            .map(|(&g, m)| prefix_mask[g as usize].iter().chain(m).copied().collect())
            .collect();
        let bias_s = ops::attention_bias(&suffix_keys, ts, lp, self.dtype, dev)?;
        let np = n * lp;
        let mut x = Tensor::cat(&[self.embed(prefix_ids)?, self.embed(suffix_ids)?], 0)?;
        for l in 0..cfg.num_hidden_layers {
            let layer = self.layer(l, kern, false, fwd);
            let (q, k, v) = layer.qkv(&x)?;
            let split = |y: &Tensor, heads: usize, norm: &str| -> candle_core::Result<_> {
                Ok((
                    layer.heads(&y.narrow(0, 0, np)?, n, lp, heads, norm)?,
                    layer.heads(&y.narrow(0, np, b * ts)?, b, ts, heads, norm)?,
                ))
            };
            let (qp, qs) = split(&q, nh, "q_norm")?;
            let (kp, ks) = split(&k, nkv, "k_norm")?;
            let (vp, vs) = split(&v, nkv, "")?;
            let (qp, kp) = (
                kern.rope(&qp, &cos_p, &sin_p)?,
                kern.rope(&kp, &cos_p, &sin_p)?,
            );
            let (qs, ks) = (
                kern.rope(&qs, &cos_s, &sin_s)?,
                kern.rope(&ks, &cos_s, &sin_s)?,
            );
            let op = layer::attend(kern, &qp, &kp, &vp, &bias_p)?;
            let ks = Tensor::cat(&[&kp.index_select(&gidx, 0)?, &ks], 2)?;
            let vs = Tensor::cat(&[&vp.index_select(&gidx, 0)?, &vs], 2)?;
            let os = layer::attend(kern, &qs, &ks, &vs, &bias_s)?;
            let o = Tensor::cat(
                &[
                    merge_heads(&op)?.reshape((np, ()))?,
                    merge_heads(&os)?.reshape((b * ts, ()))?,
                ],
                0,
            )?;
            x = layer.mlp(layer.output(x, &o)?)?;
        }
        let x = kern.rms_norm(&x, &self.p("model.norm.weight")?, cfg.rms_norm_eps)?;
        Ok((
            x.narrow(0, 0, np)?.reshape((n, lp, ()))?,
            x.narrow(0, np, b * ts)?.reshape((b, ts, ()))?,
        ))
    }

    /// The output projection's name: `lm_head`, or the embedding when tied.
    fn head_name(&self) -> &'static str {
        if self.cfg.tie_word_embeddings {
            EMBED
        } else {
            HEAD
        }
    }

    /// Vocabulary logits of hidden states `[..., H]`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match self.quantized.get(self.head_name()) {
            Some(q) => q.forward(hidden),
            None => ops::linear(hidden, &self.p(self.head_name())?, None),
        }
    }

    /// Logits of one decoding step's hidden states `[B, H]`: the vocabulary product is
    /// the largest of the step, so it takes [`ops::linear_decode`] (which keeps gemm for
    /// anything that records a gradient).
    pub fn decode_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match self.quantized.get(self.head_name()) {
            Some(q) => q.forward_decode(hidden),
            None => ops::linear_decode(hidden, &self.p(self.head_name())?, None),
        }
    }

    /// Full inference forward: logits `[B, T, V]` of a right- or left-padded batch.
    pub fn forward(&self, ids: &Tensor, mask: &[Vec<u8>]) -> candle_core::Result<Tensor> {
        let positions = positions_from_mask(mask, &self.device)?;
        let h = self.forward_hidden(ids, &positions, mask, None, Forward::INFERENCE)?;
        self.logits(&h)
    }
}

/// Per-row positions from a key mask: the n-th real token of a row has position n;
/// padding gets position 0 (it is masked anyway).
pub fn positions_from_mask(mask: &[Vec<u8>], dev: &Device) -> candle_core::Result<Tensor> {
    let (b, t) = (mask.len(), mask.first().map_or(0, |m| m.len()));
    let mut out = Vec::with_capacity(b * t);
    for m in mask {
        let mut n = 0u32;
        for &x in m {
            out.push(if x == 0 { 0 } else { n });
            n += u32::from(x != 0);
        }
    }
    Tensor::from_vec(out, (b, t), dev)
}

impl Weights for Transformer {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weight(&self, name: &str) -> candle_core::Result<Tensor> {
        self.p(name)
    }

    fn linear(
        &self,
        name: &str,
        x: &Tensor,
        decode: bool,
        fwd: Forward,
    ) -> candle_core::Result<Tensor> {
        self.lin(name, x, decode, fwd)
    }
}
