//! Batched sampling with a KV cache over prompts of different lengths.
//!
//! Prompts are left-padded; each row's positions count only its real tokens, and the
//! attention mask hides the padding, so a row decodes exactly as it would alone.
//! Returns token ids, text, and the byte offsets of every generated token in that text
//! (the span mapper needs them).

use crate::model::{positions_from_mask, Forward, KvCache, Transformer};
use crate::tokenizer::TokenizerBundle;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 or `greedy` = argmax.
    pub temperature: f64,
    pub greedy: bool,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    /// Extra stop token ids (the tokenizer's EOS ids always stop).
    pub stop_tokens: Vec<u32>,
    /// Stop once the completion text contains one of these.
    pub stop_strings: Vec<String>,
    /// Prefill each distinct prompt once and copy its keys and values to the rows that
    /// repeat it (a GRPO group's `G` rows), instead of prefilling every row.
    #[serde(default)]
    pub share_prompts: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 1.0,
            greedy: false,
            top_k: 0,
            top_p: 1.0,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            share_prompts: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Completion token ids, the stop token included when one was produced.
    pub ids: Vec<u32>,
    /// Decoded completion (special tokens skipped).
    pub text: String,
    /// Byte range of each completion token in `text`.
    pub offsets: Vec<(usize, usize)>,
    pub finish: FinishReason,
}

fn is_greedy(cfg: &SamplingConfig) -> bool {
    cfg.greedy || cfg.temperature <= 0.0
}

/// Picks the next token from one row of logits with a uniform `u ∈ [0, 1)` drawn
/// beforehand (ignored when greedy), so that rows can be sampled in parallel while the
/// RNG stream stays sequential and reproducible.
pub fn sample_row_at(logits: &[f32], cfg: &SamplingConfig, u: f64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if is_greedy(cfg) {
        return argmax();
    }
    let t = cfg.temperature as f32;
    let scaled = |v: f32| v / t;
    // Plain temperature sampling needs no ordering at all: one pass for the max, one
    // for the weights (f32 exponentials, summed in f64), one to invert the CDF in
    // index order.
    if cfg.top_k == 0 && cfg.top_p >= 1.0 {
        let max = logits
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(scaled(v)));
        let weights: Vec<f32> = logits.iter().map(|&v| (scaled(v) - max).exp()).collect();
        let total: f64 = weights.iter().map(|&p| f64::from(p)).sum();
        let mut u = u * total;
        let mut last = 0u32;
        for (i, &p) in weights.iter().enumerate() {
            if p > 0.0 {
                last = i as u32;
            }
            u -= f64::from(p);
            if u <= 0.0 {
                return i as u32;
            }
        }
        return last;
    }
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, scaled(v)))
        .collect();
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        // O(V) selection of the k largest, then a sort of those k only.
        idx.select_nth_unstable_by(cfg.top_k - 1, desc);
        idx.truncate(cfg.top_k);
    }
    idx.sort_unstable_by(desc);
    let max = idx[0].1;
    let mut probs: Vec<f64> = idx.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= cfg.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = u;
    for (k, p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return idx[k].0;
        }
    }
    idx[probs.len() - 1].0
}

/// Picks one token per row of `logits: [B, V]` (f32) without leaving the device:
/// argmax when greedy, else the Gumbel-max trick, `argmax(x/T − log(−log U))` with `U`
/// uniform (from the device's generator), which samples exactly from `softmax(x/T)`.
/// Only the `B` ids are copied back. `None` for top-k / top-p, which need a sort over
/// the vocabulary (the caller then samples on the host).
pub fn sample_on_device(
    logits: &Tensor,
    cfg: &SamplingConfig,
    rng: &mut impl Rng,
) -> Result<Option<Vec<u32>>> {
    use candle_core::D;
    if is_greedy(cfg) {
        return Ok(Some(logits.argmax(D::Minus1)?.to_vec1::<u32>()?));
    }
    if cfg.top_k > 0 || cfg.top_p < 1.0 {
        return Ok(None);
    }
    // U ∈ [tiny, 1): log(−log U) stays finite. The CPU (which takes this path only to
    // test it) draws from `rng`, so that a seeded run repeats there too; a GPU draws
    // from its own generator, which `generate` seeds from `rng`.
    let dev = logits.device();
    let u = if dev.is_cpu() {
        let n = logits.elem_count();
        let u: Vec<f32> = (0..n)
            .map(|_| rng.random::<f32>().max(f32::MIN_POSITIVE))
            .collect();
        Tensor::from_vec(u, logits.shape(), dev)?
    } else {
        Tensor::rand(f32::MIN_POSITIVE, 1.0f32, logits.shape(), dev)?
    };
    let gumbel = u.log()?.neg()?.log()?.neg()?;
    let ids = ((logits / cfg.temperature)? + gumbel)?.argmax(D::Minus1)?;
    Ok(Some(ids.to_vec1::<u32>()?))
}

/// Incremental detokenisation with byte offsets. Tokens that end inside a multi-byte
/// character get the range of the whole character once it is complete.
pub fn decode_with_offsets(
    tok: &TokenizerBundle,
    ids: &[u32],
) -> Result<(String, Vec<(usize, usize)>)> {
    let mut offsets = Vec::with_capacity(ids.len());
    let mut prev_len = 0;
    let mut pending = 0usize;
    let mut text = String::new();
    for i in 0..ids.len() {
        let cur = tok.decode(&ids[..=i])?;
        if cur.ends_with('\u{FFFD}') && i + 1 < ids.len() {
            pending += 1;
            continue;
        }
        // The decoded prefix can differ from the previous one only at its tail.
        let start = prev_len.min(cur.len());
        let start = (0..=start)
            .rev()
            .find(|&s| cur.is_char_boundary(s))
            .unwrap_or(0);
        for _ in 0..=pending {
            offsets.push((start, cur.len()));
        }
        pending = 0;
        prev_len = cur.len();
        text = cur;
    }
    Ok((text, offsets))
}

/// The distinct prompts in order of first appearance, and for each row the index of
/// its prompt among them.
pub fn distinct_prompts(prompts: &[Vec<u32>]) -> (Vec<&Vec<u32>>, Vec<u32>) {
    let mut seen: std::collections::HashMap<&[u32], u32> = std::collections::HashMap::new();
    let mut distinct = Vec::new();
    let rows = prompts
        .iter()
        .map(|p| {
            *seen.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(p);
                distinct.len() as u32 - 1
            })
        })
        .collect();
    (distinct, rows)
}

/// `CAL_GRPO_KEEP_STOPPED_ROWS` set: rows that stop stay in the decoding batch to its
/// end, as before they left it (for A/B runs; the tokens are the same either way).
fn keep_stopped_rows() -> bool {
    static KEEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEP.get_or_init(|| std::env::var_os("CAL_GRPO_KEEP_STOPPED_ROWS").is_some())
}

/// Where a batch's sampling randomness comes from.
enum Draws<'a, R: Rng> {
    /// One stream for the batch, drawn in row order: a seeded run repeats with the
    /// same batches.
    Stream(&'a mut R),
    /// One stream per row: a row's tokens depend on its own stream alone, whatever
    /// batch (or process) it is sampled in.
    Rows(&'a mut [R]),
}

impl<R: Rng> Draws<'_, R> {
    fn uniform(&mut self, row: usize) -> f64 {
        match self {
            Draws::Stream(rng) => rng.random(),
            Draws::Rows(rngs) => rngs[row].random(),
        }
    }
}

/// Generates completions for `prompts` (token ids) in one batch.
pub fn generate(
    model: &Transformer,
    tok: &TokenizerBundle,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    rng: &mut impl Rng,
) -> Result<Vec<Generation>> {
    generate_with(model, tok, prompts, cfg, Draws::Stream(rng))
}

/// [`generate`] with one random stream per prompt (`rngs[i]` samples row `i`), so a
/// row's completion does not depend on the rows batched with it: a data-parallel
/// run that splits a step's rows over processes samples what one process would.
/// Tokens are picked on the host, where the per-row uniforms are.
pub fn generate_per_row<R: Rng>(
    model: &Transformer,
    tok: &TokenizerBundle,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    rngs: &mut [R],
) -> Result<Vec<Generation>> {
    if rngs.len() != prompts.len() {
        bail!(
            "{} random streams for {} prompts",
            rngs.len(),
            prompts.len()
        );
    }
    generate_with(model, tok, prompts, cfg, Draws::Rows(rngs))
}

fn generate_with<R: Rng>(
    model: &Transformer,
    tok: &TokenizerBundle,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    mut draws: Draws<'_, R>,
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    // With shared prompts the prefill runs over the distinct prompts only; `rows[i]` is
    // the prefilled row that row i copies.
    let (distinct, rows) = if cfg.share_prompts {
        distinct_prompts(prompts)
    } else {
        (prompts.iter().collect(), (0..b as u32).collect())
    };
    let shared = distinct.len() < b;
    let lp = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(distinct.len() * lp);
    let mut mask = Vec::with_capacity(distinct.len());
    for p in &distinct {
        let pad = lp - p.len();
        ids.extend(std::iter::repeat_n(tok.pad_id, pad).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat_n(0u8, pad)
                .chain(std::iter::repeat_n(1u8, p.len()))
                .collect::<Vec<_>>(),
        );
    }
    // Sampling never backpropagates: a detached view of a trainable policy's weights
    // records no autograd graph, and may run the fused inference kernels.
    let mut view = model.detached()?;
    view.fast_inference = true;
    let model = &view;
    let dev = &model.device;
    // Off the CPU, tokens are picked where the logits are (only the ids come back);
    // the CPU samples on the host, reproducibly from `rng`.
    let on_device = !crate::device::cpu_kernels(dev) && matches!(draws, Draws::Stream(_));
    if on_device && !is_greedy(cfg) && !dev.is_cpu() {
        // The device's generator, seeded from the run's RNG: a seeded run repeats.
        // (The CPU takes this path only in tests of the device path; its generator
        // cannot be seeded.)
        if let Draws::Stream(rng) = &mut draws {
            dev.set_seed(rng.random())?;
        }
    }
    let input = Tensor::from_vec(ids, (distinct.len(), lp), dev)?;
    let positions = positions_from_mask(&mask, dev)?;
    let mut cache = KvCache::with_capacity(model.cfg.num_hidden_layers, lp + cfg.max_new_tokens);
    let mut hidden = model.forward_hidden(
        &input,
        &positions,
        &mask,
        Some(&mut cache),
        Forward::INFERENCE,
    )?;
    if shared {
        let idx = Tensor::new(rows.as_slice(), dev)?;
        cache.select_rows(&rows)?;
        hidden = hidden
            .narrow(1, lp - 1, 1)?
            .contiguous()?
            .index_select(&idx, 0)?;
    }
    let stops: Vec<u32> = tok
        .eos_ids
        .iter()
        .chain(&cfg.stop_tokens)
        .copied()
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<FinishReason>> = vec![None; b];
    // `live[i]`: the prompt that row i of the cache (and of `hidden`) continues. Rows
    // that have stopped are dropped from the batch once a quarter of it has: a decoding
    // step then costs what its live rows need, and the cache is copied a bounded number
    // of times. Every row's arithmetic is its own, so the tokens do not change.
    let mut live: Vec<usize> = (0..b).collect();
    for step in 0..cfg.max_new_tokens {
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        let logits = model
            .decode_logits(&last)?
            .to_dtype(candle_core::DType::F32)?;
        let picked = match on_device
            .then(|| match &mut draws {
                Draws::Stream(rng) => sample_on_device(&logits, cfg, rng),
                Draws::Rows(_) => Ok(None),
            })
            .transpose()?
        {
            Some(Some(ids)) => ids,
            _ => {
                let logits = logits.to_vec2::<f32>()?;
                // Uniforms drawn in row order (one per live row, none when greedy),
                // then the rows sampled in parallel: the same tokens as a sequential
                // loop.
                let u: Vec<Option<f64>> = live
                    .iter()
                    .map(|&r| {
                        finish[r].is_none().then(|| {
                            if is_greedy(cfg) {
                                0.0
                            } else {
                                draws.uniform(r)
                            }
                        })
                    })
                    .collect();
                logits
                    .par_iter()
                    .zip(&u)
                    .map(|(row, u)| u.map_or(tok.pad_id, |u| sample_row_at(row, cfg, u)))
                    .collect()
            }
        };
        let mut next = Vec::with_capacity(live.len());
        for (&r, &t) in live.iter().zip(&picked) {
            if finish[r].is_some() {
                next.push(tok.pad_id);
                continue;
            }
            out[r].push(t);
            if stops.contains(&t) {
                finish[r] = Some(FinishReason::Stop);
            } else if !cfg.stop_strings.is_empty() {
                let text = tok.decode(&out[r])?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    finish[r] = Some(FinishReason::Stop);
                }
            }
            next.push(t);
        }
        let going: Vec<u32> = (0..live.len() as u32)
            .filter(|&i| finish[live[i as usize]].is_none())
            .collect();
        if going.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if 4 * going.len() <= 3 * live.len() && !keep_stopped_rows() {
            cache.select_rows(&going)?;
            live = going.iter().map(|&i| live[i as usize]).collect();
            next = going.iter().map(|&i| next[i as usize]).collect();
        }
        let n = live.len();
        let pos: Vec<u32> = cache.last_pos.iter().map(|p| (*p + 1) as u32).collect();
        let input = Tensor::from_vec(next, (n, 1), dev)?;
        let positions = Tensor::from_vec(pos, (n, 1), dev)?;
        hidden = model.forward_hidden(
            &input,
            &positions,
            &vec![vec![1u8]; n],
            Some(&mut cache),
            Forward::INFERENCE,
        )?;
    }
    out.into_iter()
        .zip(finish)
        .map(|(ids, f)| {
            let (text, offsets) = decode_with_offsets(tok, &ids)?;
            Ok(Generation {
                ids,
                text,
                offsets,
                finish: f.unwrap_or(FinishReason::Length),
            })
        })
        .collect()
}

/// A prompt + completion batch laid out for one forward pass: prompts left-padded to a
/// common length `prompt_len`, completions right-padded to `completion_len`.
#[derive(Debug, Clone)]
pub struct SequenceBatch {
    pub ids: Tensor,
    pub mask: Vec<Vec<u8>>,
    pub prompt_len: usize,
    pub completion_len: usize,
    /// `[B, Tc]` completion ids (padding = pad id).
    pub completion_ids: Tensor,
    /// `[B, Tc]` 1 for real completion tokens.
    pub completion_mask: Vec<Vec<u8>>,
    /// Rows that share a prompt, laid out for [`Transformer::forward_shared`] (the
    /// passes over this batch then compute each prompt once); `None`: every row
    /// carries its own prompt.
    pub shared: Option<SharedPrompts>,
}

/// The distinct prompts of a [`SequenceBatch`] and which one each row continues.
#[derive(Debug, Clone)]
pub struct SharedPrompts {
    /// `[n, Lp]` distinct prompts, left-padded.
    pub ids: Tensor,
    pub mask: Vec<Vec<u8>>,
    /// Row → prompt index.
    pub group: Vec<u32>,
}

impl SequenceBatch {
    /// Token positions the forward passes over this batch compute, padding included:
    /// `B·(Lp + Tc)`, or `n·Lp + B·Tc` with shared prompts.
    pub fn computed_tokens(&self) -> usize {
        let b = self.mask.len();
        match &self.shared {
            Some(s) => s.mask.len() * s.ids.dims()[1] + b * self.completion_len,
            None => b * (self.prompt_len + self.completion_len),
        }
    }

    /// Real (unpadded) token positions those passes compute.
    pub fn real_tokens(&self) -> usize {
        let ones = |m: &[Vec<u8>]| m.iter().flatten().filter(|&&x| x == 1).count();
        match &self.shared {
            Some(s) => ones(&s.mask) + ones(&self.completion_mask),
            None => ones(&self.mask),
        }
    }

    /// The completion mask as `[B * Tc]` f32 (1 = real token), row-major.
    pub fn completion_mask_f32(&self) -> Vec<f32> {
        self.completion_mask
            .iter()
            .flatten()
            .map(|&m| f32::from(m))
            .collect()
    }
}

pub fn build_batch(
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    pad: u32,
    dev: &candle_core::Device,
) -> Result<SequenceBatch> {
    let b = prompts.len();
    let lp = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let tc = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (mut ids, mut cids) = (
        Vec::with_capacity(b * (lp + tc)),
        Vec::with_capacity(b * tc),
    );
    let (mut mask, mut cmask) = (Vec::with_capacity(b), Vec::with_capacity(b));
    for (p, c) in prompts.iter().zip(completions) {
        let (pp, cp) = (lp - p.len(), tc - c.len());
        let row_c: Vec<u32> = c
            .iter()
            .copied()
            .chain(std::iter::repeat_n(pad, cp))
            .collect();
        ids.extend(
            std::iter::repeat_n(pad, pp)
                .chain(p.iter().copied())
                .chain(row_c.iter().copied()),
        );
        cids.extend(row_c);
        let cm: Vec<u8> = std::iter::repeat_n(1u8, c.len())
            .chain(std::iter::repeat_n(0, cp))
            .collect();
        mask.push(
            std::iter::repeat_n(0u8, pp)
                .chain(std::iter::repeat_n(1u8, p.len()))
                .chain(cm.iter().copied())
                .collect(),
        );
        cmask.push(cm);
    }
    Ok(SequenceBatch {
        ids: Tensor::from_vec(ids, (b, lp + tc), dev)?,
        mask,
        prompt_len: lp,
        completion_len: tc,
        completion_ids: Tensor::from_vec(cids, (b, tc), dev)?,
        completion_mask: cmask,
        shared: None,
    })
}

/// [`build_batch`] for rows that continue shared prompts: row `i` continues
/// `prompts[group[i]]`. The batch keeps the per-row layout too (for anything that reads
/// it), and the passes of [`completion_logprobs`] and [`completion_hidden`] take the
/// shared-prefix forward.
pub fn build_shared_batch(
    prompts: &[Vec<u32>],
    group: &[usize],
    completions: &[Vec<u32>],
    pad: u32,
    dev: &candle_core::Device,
) -> Result<SequenceBatch> {
    if group.len() != completions.len() || group.iter().any(|&g| g >= prompts.len()) {
        anyhow::bail!(
            "{} completions with {} prompt indices into {} prompts",
            completions.len(),
            group.len(),
            prompts.len()
        );
    }
    let rows: Vec<Vec<u32>> = group.iter().map(|&g| prompts[g].clone()).collect();
    let mut batch = build_batch(&rows, completions, pad, dev)?;
    let lp = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(prompts.len() * lp);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pp = lp - p.len();
        ids.extend(std::iter::repeat_n(pad, pp).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat_n(0u8, pp)
                .chain(std::iter::repeat_n(1u8, p.len()))
                .collect(),
        );
    }
    batch.shared = Some(SharedPrompts {
        ids: Tensor::from_vec(ids, (prompts.len(), lp), dev)?,
        mask,
        group: group.iter().map(|&g| g as u32).collect(),
    });
    Ok(batch)
}

/// Per-token log-probs `[B, Tc]` of the completion tokens (differentiable through the
/// model's parameters) and, detached, the per-token entropy `[B, Tc]`, of a forward
/// pass in mode `fwd` ([`Forward::training`] for the loss, [`Forward::BASE`] for the
/// reference of a LoRA run).
pub fn completion_logprobs(
    model: &Transformer,
    batch: &SequenceBatch,
    fwd: Forward,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (logp, entropy, _) = completion_logprobs_hidden(model, batch, fwd)?;
    Ok((logp, entropy))
}

/// [`completion_logprobs`] and the final hidden states `[B, Tc, H]` the log-probs come
/// from (row `t` is the state that predicts completion token `t`): what a value head
/// on the policy's trunk reads.
pub fn completion_logprobs_hidden(
    model: &Transformer,
    batch: &SequenceBatch,
    fwd: Forward,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let h = completion_hidden(model, batch, fwd)?;
    let logits = model.logits(&h)?;
    let logp = crate::vocab::token_logprobs(&logits, &batch.completion_ids)?;
    let entropy = crate::vocab::entropy(&logits)?;
    Ok((logp, entropy, h))
}

/// The final hidden states `[B, Tc, H]` that predict the completion tokens (no
/// vocabulary product: a separate critic needs only these).
pub fn completion_hidden(
    model: &Transformer,
    batch: &SequenceBatch,
    fwd: Forward,
) -> candle_core::Result<Tensor> {
    if let Some(s) = &batch.shared {
        let (prompts, completions) = model.forward_shared(
            &s.ids,
            &s.mask,
            &batch.completion_ids,
            &batch.completion_mask,
            &s.group,
            fwd,
        )?;
        // The prompt's last state predicts completion token 0, completion state t − 1
        // token t (the last completion token's own state predicts nothing).
        let lp = prompts.dim(1)?;
        let gidx = Tensor::new(s.group.as_slice(), &model.device)?;
        let first = prompts
            .narrow(1, lp - 1, 1)?
            .contiguous()?
            .index_select(&gidx, 0)?;
        let tc = batch.completion_len;
        return if tc == 1 {
            Ok(first)
        } else {
            Tensor::cat(&[&first, &completions.narrow(1, 0, tc - 1)?], 1)
        };
    }
    let positions = positions_from_mask(&batch.mask, &model.device)?;
    let hidden = model.forward_hidden(&batch.ids, &positions, &batch.mask, None, fwd)?;
    // Position prompt_len - 1 + t predicts completion token t.
    hidden.narrow(1, batch.prompt_len - 1, batch.completion_len)
}
