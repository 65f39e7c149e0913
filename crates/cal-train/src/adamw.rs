//! The update stage: AdamW with decoupled weight decay, global grad-norm clipping and a
//! warmup + cosine learning-rate schedule.
//!
//! Our own AdamW (rather than candle-nn's) because its moments must be saved in
//! checkpoints for a bit-exact resume.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// AdamW and its schedule: the `[optim]` section of a run configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    #[serde(rename = "learning-rate")]
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this (0 = off).
    pub max_grad_norm: f64,
    pub warmup_steps: usize,
    /// Cosine decays to `lr * min_lr_ratio` at `total_steps`.
    pub min_lr_ratio: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
        }
    }
}

/// Learning rate at `step` (0-based) of `total` steps: linear warmup, then cosine.
pub fn lr_at(cfg: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
}

pub struct AdamW {
    pub cfg: OptimConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Each variable's learning rate as a multiple of the schedule's (a critic's own).
    lr_scale: Vec<f64>,
    pub step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: OptimConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            lr_scale: vec![1.0; vars.len()],
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Variables whose name `select`s learn at `scale` × the scheduled rate.
    pub fn scale_lr(&mut self, select: impl Fn(&str) -> bool, scale: f64) {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            if select(name) {
                self.lr_scale[i] = scale;
            }
        }
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The trained parameters by name, as tensors (checkpoints, weight checks, tests).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        (self.vars.iter())
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// An empty gradient accumulator, one slot per variable.
    pub fn zero_accumulator(&self) -> Vec<Option<Tensor>> {
        vec![None; self.vars.len()]
    }

    /// Data parallel: sums `acc` over the ranks, in place. A gradient some ranks lack
    /// counts as zeros there (candle prunes a branch multiplied by zero, which is what a
    /// rank's loss with nothing to learn from is); one that no rank has stays absent,
    /// as in one process.
    pub fn all_reduce(
        &self,
        c: &dyn crate::collective::Collective,
        acc: &mut [Option<Tensor>],
    ) -> Result<()> {
        if c.world() == 1 {
            return Ok(());
        }
        let mut present: Vec<f64> = acc
            .iter()
            .map(|g| f64::from(u8::from(g.is_some())))
            .collect();
        c.all_reduce_sum_f64(&mut present)?;
        for ((slot, (_, var)), n) in acc.iter_mut().zip(&self.vars).zip(&present) {
            if slot.is_none() && *n > 0.0 {
                *slot = Some(var.as_tensor().zeros_like()?);
            }
        }
        crate::collective::reduce_gradients(c, acc)
    }

    /// Adds the gradients of one micro-batch to `acc`.
    pub fn accumulate(&self, acc: &mut [Option<Tensor>], grads: &GradStore) -> Result<()> {
        for (slot, (_, var)) in acc.iter_mut().zip(&self.vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// One update at learning rate `lr` from a [`GradStore`]; see [`Self::step_accumulated`].
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<f64> {
        let mut acc = self.zero_accumulator();
        self.accumulate(&mut acc, grads)?;
        self.step_accumulated(&acc, lr)
    }

    /// One update at learning rate `lr`; gradients are clipped to `max_grad_norm` first.
    /// Returns the pre-clip gradient norm.
    pub fn step_accumulated(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<f64> {
        let mut total = 0.0;
        for g in grads.iter().flatten() {
            total += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let norm: f64 = total.sqrt();
        let clip = if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let c = &self.cfg;
        let (bc1, bc2) = (
            1.0 - c.beta1.powi(self.step as i32),
            1.0 - c.beta2.powi(self.step as i32),
        );
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else {
                continue;
            };
            let g = (g * clip)?;
            let lr = lr * self.lr_scale[i];
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor();
            let decayed = (theta * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, path: &Path, step: usize) -> Result<()> {
        let dev = self
            .vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("reading {}", path.display()))?;
        for (i, (name, _)) in self.vars.iter().enumerate() {
            self.m[i] = map
                .get(&format!("m.{name}"))
                .with_context(|| format!("{}: no moment m.{name}", path.display()))?
                .clone();
            self.v[i] = map
                .get(&format!("v.{name}"))
                .with_context(|| format!("{}: no moment v.{name}", path.display()))?
                .clone();
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Gradients of `sum(y)`.
    fn grads_of(y: Tensor) -> GradStore {
        y.sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn first_adamw_step_moves_by_lr_times_sign() {
        // After one step the bias-corrected ratio m̂/√v̂ is g/|g|: θ ← θ(1 − lr·wd) − lr·sign(g).
        let x = Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 0.0,
            ..OptimConfig::default()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg).unwrap();
        let grads = grads_of(x.as_tensor().sqr().unwrap());
        let norm = opt.step(&grads, 0.1).unwrap();
        assert!((norm - (4.0f64 + 16.0 + 1.0).sqrt()).abs() < 1e-12);
        let got = x.as_tensor().to_vec1::<f64>().unwrap();
        for (g, x0) in got.iter().zip([1.0f64, -2.0, 0.5]) {
            let want = x0 * (1.0 - 0.1 * 0.01) - 0.1 * x0.signum();
            assert!((g - want).abs() < 1e-7, "{g} vs {want}");
        }
    }

    #[test]
    fn clipping_scales_the_gradient_the_moments_see() {
        // loss = x·[3, 4] → g = [3, 4], |g| = 5. Adam's first step is scale-free, so the
        // check is on the moments it stores: m = (1 − β1)·ĝ, v = (1 − β2)·ĝ², with ĝ the
        // gradient clipped to norm 1, i.e. [0.6, 0.8] (not [3, 4]).
        let run = |max_grad_norm: f64| {
            let x = Var::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
            let cfg = OptimConfig {
                lr: 0.1,
                max_grad_norm,
                ..OptimConfig::default()
            };
            let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg).unwrap();
            let w = Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
            let grads = grads_of((x.as_tensor() * &w).unwrap());
            let norm = opt.step(&grads, 0.1).unwrap();
            let st = opt.state();
            let v = |k: &str| st[k].to_vec1::<f64>().unwrap();
            (norm, v("m.x"), v("v.x"))
        };
        let (norm, m, v) = run(1.0);
        assert!((norm - 5.0).abs() < 1e-12, "pre-clip norm reported");
        let (b1, b2) = (OptimConfig::default().beta1, OptimConfig::default().beta2);
        for (i, g) in [0.6f64, 0.8].into_iter().enumerate() {
            assert!((m[i] - (1.0 - b1) * g).abs() < 1e-6, "m {m:?}");
            assert!((v[i] - (1.0 - b2) * g * g).abs() < 1e-6, "v {v:?}");
        }
        // no clipping below the threshold, and with it off
        for off in [0.0, 10.0] {
            let (_, m, _) = run(off);
            assert!((m[1] - (1.0 - b1) * 4.0).abs() < 1e-12, "{off}: m {m:?}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = OptimConfig {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..OptimConfig::default()
        };
        assert_eq!(lr_at(&cfg, 0, 20), 0.25);
        assert_eq!(lr_at(&cfg, 3, 20), 1.0);
        assert!((lr_at(&cfg, 4, 20) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 12, 20) - 0.55).abs() < 1e-12); // half-way: 0.1 + 0.9·0.5
        assert!((lr_at(&cfg, 20, 20) - 0.1).abs() < 1e-12);
    }
}
