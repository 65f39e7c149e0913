//! LoRA adapters in PEFT's on-disk format, so that a run's adapter loads in Python
//! `peft` on the base model, and in serving engines that hot-load PEFT adapters (vLLM's
//! runtime LoRA loading).
//!
//! A PEFT adapter folder holds `adapter_config.json` (`r`, `lora_alpha`,
//! `target_modules`, …) and `adapter_model.safetensors` whose keys are the base
//! model's module names under `base_model.model.`, each with `lora_A.weight` `[r, in]`
//! and `lora_B.weight` `[out, r]`. PEFT scales the product by `lora_alpha / r`, as
//! [`crate::model::Transformer`] does, so the same tensors give the same outputs.

use crate::load::save_safetensors;
use crate::model::{LoraConfig, Params, Transformer};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::path::Path;

const PREFIX: &str = "base_model.model.";

/// Writes the adapters of `model` (which must have LoRA) as a PEFT folder in `dir`.
pub fn export_adapter(model: &Transformer, dir: &Path) -> Result<()> {
    let Some(cfg) = &model.lora else {
        bail!("the model has no LoRA adapters to export");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors = Params::new();
    let mut modules = std::collections::BTreeSet::new();
    for (k, t) in &model.params {
        for (ours, theirs) in [(".lora_A", "lora_A"), (".lora_B", "lora_B")] {
            if let Some(module) = k.strip_suffix(ours) {
                let t = t.detach().to_dtype(DType::F32)?.contiguous()?;
                tensors.insert(format!("{PREFIX}{module}.{theirs}.weight"), t);
                if let Some(short) = module.rsplit('.').next() {
                    modules.insert(short.to_string());
                }
            }
        }
    }
    save_safetensors(&tensors, &dir.join("adapter_model.safetensors"), |_| true)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules.into_iter().collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "modules_to_save": null,
        "base_model_name_or_path": null,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )
    .with_context(|| format!("writing {}", dir.join("adapter_config.json").display()))?;
    Ok(())
}

/// Loads a PEFT adapter folder onto `model` (which must have no adapters yet): the
/// inverse of [`export_adapter`], and a reader for adapters PEFT wrote.
pub fn load_adapter(model: &mut Transformer, dir: &Path) -> Result<()> {
    if model.lora.is_some() {
        bail!("the model already has LoRA adapters");
    }
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    let field = |k: &str| {
        v.get(k)
            .with_context(|| format!("{}: no field `{k}`", cfg_path.display()))
    };
    let rank = field("r")?
        .as_u64()
        .with_context(|| format!("{}: `r` must be a positive integer", cfg_path.display()))?
        as usize;
    let alpha = field("lora_alpha")?
        .as_f64()
        .with_context(|| format!("{}: `lora_alpha` must be a number", cfg_path.display()))?;
    if v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true) {
        bail!("{}: rsLoRA scaling is not supported", cfg_path.display());
    }
    let weights = dir.join("adapter_model.safetensors");
    let tensors = crate::load::load_safetensors(&weights, model.master_dtype(), &model.device)?;
    let mut targets = std::collections::BTreeSet::new();
    let mut found = Vec::new();
    for (k, t) in tensors {
        let name = k.strip_prefix(PREFIX).unwrap_or(&k);
        let (module, ours) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, "lora_A")
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, "lora_B")
        } else {
            bail!("{}: unexpected tensor {k}", weights.display());
        };
        let base = format!("{module}.weight");
        let dims = match (model.params.get(&base), model.quantized.get(&base)) {
            (Some(t), _) => Some((t.dim(0)?, t.dim(1)?)),
            (None, Some(q)) => Some(q.dims()),
            (None, None) => None,
        };
        let Some((out, inp)) = dims else {
            bail!(
                "{}: {k} adapts {module}, which the model does not have",
                weights.display()
            );
        };
        let want = if ours == "lora_A" {
            [rank, inp]
        } else {
            [out, rank]
        };
        if t.dims() != want {
            bail!(
                "{}: {k} has shape {:?}, expected {want:?}",
                weights.display(),
                t.dims()
            );
        }
        if let Some(short) = module.rsplit('.').next() {
            targets.insert(short.to_string());
        }
        found.push((format!("{module}.{ours}"), t));
    }
    if found.is_empty() {
        bail!("{}: no LoRA tensors", weights.display());
    }
    for (k, t) in found {
        model.params.insert(k, t);
    }
    model.lora = Some(LoraConfig {
        rank,
        alpha,
        dropout: 0.0,
        targets: targets.into_iter().collect(),
    });
    Ok(())
}
