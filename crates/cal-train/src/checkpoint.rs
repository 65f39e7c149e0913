//! Checkpoints: trainable weights, optimizer moments, RNG state, step, data cursor and
//! config, written atomically (temp folder + rename) so a killed run always finds a
//! complete one.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub cursor: usize,
    /// ChaCha8 state of the sampling RNG: seed, stream, word position.
    pub rng_seed: [u8; 32],
    pub rng_stream: u64,
    pub rng_word_pos: u128,
    pub config: serde_json::Value,
    /// Scalars accumulated so far (e.g. skipped steps).
    pub counters: serde_json::Value,
}

pub fn rng_state(rng: &rand_chacha::ChaCha8Rng) -> ([u8; 32], u64, u128) {
    (rng.get_seed(), rng.get_stream(), rng.get_word_pos())
}

pub fn restore_rng(seed: [u8; 32], stream: u64, word_pos: u128) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(seed);
    rng.set_stream(stream);
    rng.set_word_pos(word_pos);
    rng
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The folder of step `step`'s checkpoint.
pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    checkpoints_dir(out).join(format!("step-{step:06}"))
}

/// Writes `checkpoints/step-N` through a temp folder, then points `latest` at it.
pub fn save(
    out: &Path,
    state: &TrainState,
    weights: &cal_model::Params,
    optimizer: &std::collections::BTreeMap<String, candle_core::Tensor>,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{:06}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    cal_model::load::save_safetensors(weights, &tmp.join("weights.safetensors"), |_| true)?;
    let opt: cal_model::Params = optimizer.clone();
    cal_model::load::save_safetensors(&opt, &tmp.join("optimizer.safetensors"), |_| true)?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    let dest = root.join(&name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).with_context(|| format!("publishing {}", dest.display()))?;
    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, &name)?;
    std::fs::rename(&latest_tmp, root.join("latest"))?;
    Ok(dest)
}

/// The latest complete checkpoint folder, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    let root = checkpoints_dir(out);
    let name = std::fs::read_to_string(root.join("latest")).ok()?;
    let dir = root.join(name.trim());
    dir.join("state.json").exists().then_some(dir)
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid checkpoint state", p.display()))
}

/// Where a resumed run continues.
pub struct Resumed {
    pub dir: PathBuf,
    pub step: usize,
    pub cursor: usize,
    pub rng: rand_chacha::ChaCha8Rng,
    pub skipped: usize,
    /// How the run seeded its sampling (`rollout.seeds`; `None` before the key existed).
    pub sample_seeds: Option<crate::config::SampleSeeds>,
}

/// Loads the latest checkpoint of `out` into the optimizer's variables and moments.
pub fn resume(out: &Path, opt: &mut crate::adamw::AdamW) -> Result<Resumed> {
    let ck = latest(out).with_context(|| {
        format!(
            "--resume: no checkpoint in {}",
            checkpoints_dir(out).display()
        )
    })?;
    let state = read_state(&ck)?;
    let (dtype, device) = match opt.vars().first() {
        Some((_, v)) => (v.dtype(), v.device().clone()),
        None => anyhow::bail!("nothing to train: no trainable parameters"),
    };
    let weights =
        cal_model::load::load_safetensors(&ck.join("weights.safetensors"), dtype, &device)?;
    for (name, var) in opt.vars() {
        let t = weights
            .get(name)
            .with_context(|| format!("{}: checkpoint lacks {name}", ck.display()))?;
        var.set(t)?;
    }
    opt.load_state(&ck.join("optimizer.safetensors"), state.step)?;
    Ok(Resumed {
        step: state.step,
        cursor: state.cursor,
        rng: restore_rng(state.rng_seed, state.rng_stream, state.rng_word_pos),
        skipped: state.counters["skipped_steps"].as_u64().unwrap_or(0) as usize,
        sample_seeds: serde_json::from_value(state.config["rollout"]["seeds"].clone()).ok(),
        dir: ck,
    })
}

/// The data order of a supervised loop (SFT, distillation, offline DPO): a seeded
/// permutation reshuffled at each epoch and a cursor into it. It is what such a loop's
/// checkpoint stores beside the optimizer, so a resumed run draws the same batches.
pub struct DataOrder {
    order: Vec<usize>,
    cursor: usize,
    rng: rand_chacha::ChaCha8Rng,
}

impl DataOrder {
    /// `n` items, the first epoch shuffled from `seed` when the first batch is drawn.
    pub fn new(n: usize, seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            order: (0..n).collect(),
            cursor: n,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `size` item indices, a new epoch's shuffle when one runs out.
    pub fn next_batch(&mut self, size: usize) -> Vec<usize> {
        use rand::seq::SliceRandom;
        let mut idx = Vec::with_capacity(size);
        while idx.len() < size {
            if self.cursor == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.cursor = 0;
            }
            idx.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        idx
    }

    /// Writes a checkpoint at `step`: `opt`'s variables and moments, this order, its
    /// cursor and RNG. Rank 0 of `ranks` writes; every rank returns once it is written.
    pub fn save(
        &self,
        out: &Path,
        step: usize,
        opt: &crate::adamw::AdamW,
        config: serde_json::Value,
        ranks: &dyn crate::collective::Collective,
    ) -> Result<PathBuf> {
        if !ranks.is_main() {
            ranks.barrier()?;
            return Ok(step_dir(out, step));
        }
        let (rng_seed, rng_stream, rng_word_pos) = rng_state(&self.rng);
        let state = TrainState {
            step,
            cursor: self.cursor,
            rng_seed,
            rng_stream,
            rng_word_pos,
            config,
            counters: serde_json::json!({ "order": self.order }),
        };
        let weights: cal_model::Params = opt.tensors().into_iter().collect();
        let dir = save(out, &state, &weights, &opt.state())?;
        ranks.barrier()?;
        Ok(dir)
    }

    /// Loads the latest checkpoint of `out` into `opt` and returns its directory, its
    /// step and its data order, which must cover this run's `self.order.len()` items
    /// (`items` names them and `same` the flags that fix them, for the error).
    pub fn resume(
        &self,
        out: &Path,
        opt: &mut crate::adamw::AdamW,
        items: &str,
        same: &str,
    ) -> Result<(PathBuf, usize, DataOrder)> {
        let r = resume(out, opt)?;
        let state = read_state(&r.dir)?;
        let order: Vec<usize> = serde_json::from_value(state.counters["order"].clone())
            .with_context(|| format!("{}: no data order of {items}", r.dir.display()))?;
        if order.len() != self.order.len() {
            anyhow::bail!(
                "{}: the checkpoint's data has {} {items}, this run's {}: resume with the \
                 same {same}",
                r.dir.display(),
                order.len(),
                self.order.len()
            );
        }
        let data = DataOrder {
            order,
            cursor: r.cursor,
            rng: r.rng,
        };
        Ok((r.dir, r.step, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn state(step: usize) -> TrainState {
        let (rng_seed, rng_stream, rng_word_pos) =
            rng_state(&rand::SeedableRng::seed_from_u64(step as u64));
        TrainState {
            step,
            cursor: step * 8,
            rng_seed,
            rng_stream,
            rng_word_pos,
            config: serde_json::json!({}),
            counters: serde_json::json!({"skipped_steps": 0}),
        }
    }

    fn weights(x: f32) -> cal_model::Params {
        let t = Tensor::new(&[x, x + 1.0], &Device::Cpu).unwrap();
        cal_model::Params::from([("w".to_string(), t)])
    }

    /// A save that fails half-way (an injected fault at each of its two commit points)
    /// leaves the previous checkpoint as the one `--resume` finds.
    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        save(out, &state(2), &weights(2.0), &weights(0.0)).unwrap();
        let root = checkpoints_dir(out);
        // fault 1: the step's folder cannot be staged (something sits where it goes)
        std::fs::write(root.join(".step-000004.tmp"), b"in the way").unwrap();
        assert!(save(out, &state(4), &weights(4.0), &weights(0.0)).is_err());
        // fault 2: the data is written but the `latest` pointer cannot be replaced
        std::fs::create_dir_all(root.join(".latest.tmp")).unwrap();
        assert!(save(out, &state(6), &weights(6.0), &weights(0.0)).is_err());
        let ck = latest(out).expect("a checkpoint");
        assert_eq!(read_state(&ck).unwrap().step, 2);
        let w = cal_model::load::load_safetensors(
            &ck.join("weights.safetensors"),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(w["w"].to_vec1::<f32>().unwrap(), vec![2.0, 3.0]);
        // once the way is clear, saving works again
        std::fs::remove_dir_all(root.join(".latest.tmp")).unwrap();
        save(out, &state(8), &weights(8.0), &weights(0.0)).unwrap();
        assert_eq!(read_state(&latest(out).unwrap()).unwrap().step, 8);
    }
}
