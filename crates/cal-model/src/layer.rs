//! One decoder layer in parts, as candle's `qwen2.rs` splits it: the attention half
//! ([`Layer::qkv`], [`Layer::heads`], [`attend`], [`Layer::output`]) and the MLP half
//! ([`Layer::mlp`]), with [`Layer::forward`] the plain layer. The shared-prefix forward
//! runs the same parts with its own attention between them (prompt keys computed once),
//! so the two forwards cannot drift apart. Token-wise parts take any `[..., H]` shape.

use crate::config::ModelConfig;
use crate::ops;
use candle_core::{Result, Tensor};

/// What a layer reads of its model: the configuration, weights by name, and the linear
/// layers with their LoRA adapters (the model implements it; the layer never sees the
/// model's type, so the two files do not import each other).
pub(crate) trait Weights {
    fn config(&self) -> &ModelConfig;
    fn weight(&self, name: &str) -> Result<Tensor>;
    /// `x` through linear module `name` (`.weight`, bias, adapters per `fwd`).
    fn linear(&self, name: &str, x: &Tensor, decode: bool, fwd: Forward) -> Result<Tensor>;
}

/// Per-layer key/value cache for incremental decoding.
///
/// With a capacity (the generator knows prompt + max new tokens), each layer's keys
/// and values live in one preallocated `[B, nkv, capacity, D]` buffer written in place;
/// without one, every step concatenates, copying the whole cache again (on SmolLM2 at
/// batch 8 that is 55 MB per step near the end of a 128-token completion).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values (the whole buffer when preallocated).
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Preallocated length along the sequence axis; 0 = grow by concatenation.
    pub capacity: usize,
    /// Key mask `[B, len]` of everything cached so far (0 = padding).
    pub mask: Vec<Vec<u8>>,
    /// Last position index used per row.
    pub last_pos: Vec<i64>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers hold `capacity` positions (it still grows past them).
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            capacity,
            mask: Vec::new(),
            last_pos: Vec::new(),
        }
    }

    /// Appends `k`, `v` `[B, nkv, T, D]` at `offset` to layer `l`; returns the keys and
    /// values of all `offset + T` positions.
    pub(crate) fn append(
        &mut self,
        l: usize,
        offset: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        // Cached keys/values are constants for later steps: detached, they do not keep
        // the whole prefill graph of a trainable policy alive.
        let (k, v) = (k.detach(), v.detach());
        let t = k.dim(2)?;
        if self.capacity == 0 {
            let kv = match self.layers[l].take() {
                Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
                None => (k, v),
            };
            self.layers[l] = Some(kv.clone());
            return Ok(kv);
        }
        let need = offset + t;
        let (bk, bv) = match self.layers[l].take() {
            Some((bk, bv)) if bk.dim(2)? >= need => (bk, bv),
            old => {
                // First use, or past the capacity: a larger buffer, old contents copied.
                let cap = need
                    .max(self.capacity)
                    .max(2 * old.as_ref().map_or(0, |o| o.0.dim(2).unwrap_or(0)));
                let (b, h, _, d) = k.dims4()?;
                let bk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
                let bv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
                if let Some((ok, ov)) = old {
                    bk.slice_set(&ok.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                    bv.slice_set(&ov.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                }
                (bk, bv)
            }
        };
        bk.slice_set(&k.contiguous()?, 2, offset)?;
        bv.slice_set(&v.contiguous()?, 2, offset)?;
        let kv = (bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?);
        self.layers[l] = Some((bk, bv));
        Ok(kv)
    }

    /// Row `i` of the cache becomes a copy of row `rows[i]` (a prefilled prompt handed
    /// to the rows that continue it).
    pub fn select_rows(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        let Some(dev) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
        else {
            return Ok(());
        };
        let idx = Tensor::new(rows, &dev)?;
        for kv in self.layers.iter_mut().flatten() {
            *kv = (kv.0.index_select(&idx, 0)?, kv.1.index_select(&idx, 0)?);
        }
        let pick = |i: &u32| i.to_owned() as usize;
        self.mask = rows.iter().map(|i| self.mask[pick(i)].clone()).collect();
        self.last_pos = rows.iter().map(|i| self.last_pos[pick(i)]).collect();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one forward pass applies beyond the base weights. Passed to every call rather
/// than stored on the model, so that no call can leave the model in another mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// Apply the LoRA adapters (off: the frozen base, the reference of a LoRA run).
    pub adapters: bool,
    /// LoRA dropout with masks drawn from this seed (training forwards only). The masks
    /// are a pure function of the seed and the module name, so a resumed run draws
    /// exactly the masks the uninterrupted one drew without saving any RNG state.
    pub dropout_seed: Option<u64>,
}

impl Forward {
    /// Adapters on (if any), no dropout: generation, old and reference log-probs.
    pub const INFERENCE: Forward = Forward {
        adapters: true,
        dropout_seed: None,
    };
    /// The base model without adapters.
    pub const BASE: Forward = Forward {
        adapters: false,
        dropout_seed: None,
    };

    /// A training forward: adapters on, LoRA dropout (if configured) seeded by `seed`.
    pub fn training(seed: u64) -> Self {
        Forward {
            adapters: true,
            dropout_seed: Some(seed),
        }
    }
}

/// Decoder layer `l` of one forward pass.
pub(crate) struct Layer<'a> {
    pub m: &'a dyn Weights,
    pub l: usize,
    /// `model.layers.{l}`.
    pub p: String,
    pub kern: ops::Kernels,
    pub decode: bool,
    pub fwd: Forward,
}

impl Layer<'_> {
    fn lin(&self, module: &str, x: &Tensor) -> Result<Tensor> {
        self.m
            .linear(&format!("{}.{module}", self.p), x, self.decode, self.fwd)
    }

    fn norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.m.weight(&format!("{}.{name}.weight", self.p))?;
        self.kern.rms_norm(x, &w, self.m.config().rms_norm_eps)
    }

    /// The plain layer on the residual stream `x: [B, T, H]`: q, k, v as heads with
    /// RoPE (`rope`: cos and sin tables), the keys and values appended to `cache` at its
    /// offset when there is one, `attend(q, k, v)` between them, then the output
    /// projection and the MLP.
    pub fn forward(
        &self,
        x: Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<(&mut KvCache, usize)>,
        attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let cfg = self.m.config();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (cos, sin) = rope;
        let (q, k, v) = self.qkv(&x)?;
        let q = self
            .kern
            .rope(&self.heads(&q, b, t, nh, "q_norm")?, cos, sin)?;
        let k = self
            .kern
            .rope(&self.heads(&k, b, t, nkv, "k_norm")?, cos, sin)?;
        let v = self.heads(&v, b, t, nkv, "")?;
        let (k, v) = match cache {
            Some((c, offset)) => c.append(self.l, offset, k, v)?,
            None => (k, v),
        };
        let o = attend(&q, &k, &v)?;
        self.mlp(self.output(x, &merge_heads(&o)?)?)
    }

    /// Query, key and value projections of the residual stream `x` (`[..., n·D]` each).
    pub fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let h = self.norm(x, "input_layernorm")?;
        Ok((
            self.lin("self_attn.q_proj", &h)?,
            self.lin("self_attn.k_proj", &h)?,
            self.lin("self_attn.v_proj", &h)?,
        ))
    }

    /// `[b·t, n·D]` (or `[b, t, n·D]`) → heads `[b, n, t, D]`, RMS-normed by
    /// `self_attn.{norm}` when the model has q/k norms and `norm` names one.
    pub fn heads(&self, y: &Tensor, b: usize, t: usize, n: usize, norm: &str) -> Result<Tensor> {
        let cfg = self.m.config();
        let hd = cfg.head_dim;
        let y = y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?;
        if cfg.qk_norm && !norm.is_empty() {
            self.norm(&y, &format!("self_attn.{norm}"))
        } else {
            Ok(y)
        }
    }

    /// The attention output `o` (`[..., nh·D]`, shaped as `x`) projected and added to
    /// the residual stream.
    pub fn output(&self, x: Tensor, o: &Tensor) -> Result<Tensor> {
        x + self.lin("self_attn.o_proj", o)?
    }

    /// The SwiGLU MLP block, added to the residual stream.
    pub fn mlp(&self, x: Tensor) -> Result<Tensor> {
        let h = self.norm(&x, "post_attention_layernorm")?;
        let g = self.lin("mlp.gate_proj", &h)?;
        let u = self.lin("mlp.up_proj", &h)?;
        let gu = self.kern.swiglu(&g, &u)?;
        x + self.lin("mlp.down_proj", &gu)?
    }
}

/// Scaled dot-product attention of `q [B, nh, T, D]` over `k`, `v [B, nkv, Tk, D]`
/// with an additive `bias [B, 1, T, Tk]`; returns `[B, nh, T, D]`.
///
/// Grouped-query attention without repeating keys and values: the `rep` query heads
/// that share a KV head are stacked along the query axis (`[B, nh, T, D]` is
/// `[B, nkv, rep·T, D]` in memory), so each KV head is multiplied once, never copied.
pub(crate) fn attend(
    kern: ops::Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, tk) = (k.dim(1)?, k.dim(2)?);
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    // Scaling q (`T·D` values) rather than the scores (`T·Tk`) is the cheaper op.
    let att = (q * scale)?
        .reshape((b, nkv, rep * t, hd))?
        .matmul(&k.t()?)?;
    let att = kern.masked_softmax(&att.reshape((b, nh, t, tk))?, bias)?;
    att.reshape((b, nkv, rep * t, tk))?
        .matmul(v)?
        .reshape((b, nh, t, hd))
}

/// `[B, nh, T, D]` attention output → `[B, T, nh·D]`.
pub(crate) fn merge_heads(o: &Tensor) -> Result<Tensor> {
    let (b, nh, t, hd) = o.dims4()?;
    o.transpose(1, 2)?.reshape((b, t, nh * hd))
}
