//! A linear layer whose weight stays quantized (QLoRA's frozen base): the forward and
//! the backward with respect to the input, `dx = dy · W`, are computed from the blocks
//! so that `W` is never held whole in f32. The weight itself takes no gradient (it is
//! frozen; LoRA adapters on top train).
//!
//! The weight `[out, in]` is kept as row tiles of `tile_rows` rows, each its own
//! quantized tensor. Over whole sequences the forward dequantizes one tile at a time
//! into an f32 GEMM and concatenates the products; the backward dequantizes them again
//! and accumulates `dy[:, tile] · W_tile`. A decoding step, a few rows, takes a row
//! kernel instead: each weight row dequantized into a buffer and dotted with every
//! input row. All three are exact for the dequantized weight. candle's own quantized
//! matmul is not used: on this CPU it ran at 4–22% of the f32 rate (it rounds the
//! activations to 8 bits, and its Q4_1 product has no SIMD path).
//!
//! The vocabulary matrices use it too: the LM head is a product like any other, and the
//! embedding looks its rows up with [`QLinear::rows`], which dequantizes only the tiles
//! the ids fall in.

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};
use std::sync::Arc;

/// A frozen quantized weight `[out, in]` in row tiles.
#[derive(Clone)]
pub struct QLinear {
    tiles: Arc<Vec<Arc<QTensor>>>,
    out: usize,
    inp: usize,
}

impl QLinear {
    /// Quantizes `w: [out, in]` (any float dtype) to `dtype` in tiles of `tile_rows` rows.
    /// `in` must be a multiple of twice the format's block size.
    pub fn quantize(w: &Tensor, dtype: GgmlDType, tile_rows: usize) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        // candle's CPU dot products take the blocks of a row in pairs
        if inp % (2 * dtype.block_size()) != 0 {
            bail!(
                "cannot quantize a [{out}, {inp}] weight to {dtype:?}: {inp} columns are not a \
                 multiple of twice its block size {}",
                dtype.block_size()
            );
        }
        let w = w.to_dtype(DType::F32)?;
        let mut tiles = Vec::new();
        let tile_rows = tile_rows.max(1);
        for start in (0..out).step_by(tile_rows) {
            let rows = tile_rows.min(out - start);
            // a tensor of its own: candle quantizes the whole storage under a view
            let tile = w.narrow(0, start, rows)?.flatten_all()?.to_vec1::<f32>()?;
            let tile = Tensor::from_vec(tile, (rows, inp), w.device())?;
            let q = Arc::new(QTensor::quantize(&tile, dtype)?);
            tiles.push(q);
        }
        Ok(Self {
            tiles: Arc::new(tiles),
            out,
            inp,
        })
    }

    /// The rows `rows` of an already quantized weight `q: [out, in]`, in that order (a
    /// GGUF file's blocks as they load, a row permutation applied), in tiles of
    /// `tile_rows` rows: the blocks are copied, never dequantized.
    pub fn from_rows(q: &QTensor, rows: &[usize], tile_rows: usize) -> Result<Self> {
        let (out, inp) = q.shape().dims2()?;
        let dtype = q.dtype();
        if inp % (2 * dtype.block_size()) != 0 {
            bail!(
                "cannot hold a [{out}, {inp}] {dtype:?} weight as it is: {inp} columns are not a \
                 multiple of twice its block size {}",
                dtype.block_size()
            );
        }
        if rows.len() != out || rows.iter().any(|&r| r >= out) {
            bail!("a row order of {} rows for a weight of {out}", rows.len());
        }
        let row_bytes = inp / dtype.block_size() * dtype.type_size();
        let data = q.data()?;
        let mut tiles = Vec::new();
        for tile in rows.chunks(tile_rows.max(1)) {
            let mut bytes = Vec::with_capacity(tile.len() * row_bytes);
            for &r in tile {
                bytes.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &q.device(), dtype)?;
            let t = Arc::new(QTensor::new(storage, (tile.len(), inp))?);
            tiles.push(t);
        }
        Ok(Self {
            tiles: Arc::new(tiles),
            out,
            inp,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The weight dequantized to f32 `[out, in]` (export, tests).
    pub fn dequantize(&self) -> Result<Tensor> {
        let parts = self
            .tiles
            .iter()
            .map(|q| q.dequantize(&q.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Bytes the quantized weight holds.
    pub fn storage_bytes(&self) -> usize {
        self.tiles.iter().map(|q| q.storage_size_in_bytes()).sum()
    }

    /// `x: [..., in]` → `[..., out]` over whole sequences (training, log-probs, the
    /// prefill), differentiable in `x`: each tile is dequantized for an f32 GEMM, which
    /// on this CPU runs 2–20× the rate of candle's quantized matmul at these row counts
    /// (`cal-grpo bench qmatmul`). The graph keeps no tile: the backward dequantizes
    /// them again.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            let parts = self
                .tiles
                .iter()
                .map(|q| {
                    let w = q.dequantize(x.device())?.to_dtype(x.dtype())?;
                    x.broadcast_matmul(&w.t()?)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Tensor::cat(&parts, D::Minus1);
        }
        let xf = x.detach().to_dtype(DType::F32)?.contiguous()?;
        let parts = self
            .tiles
            .iter()
            .map(|q| crate::ops::linear(&xf, &q.dequantize(x.device())?, None))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.with_grad(x, Tensor::cat(&parts, D::Minus1)?)
    }

    /// [`QLinear::forward`] for one decoding step (a row per sequence, no gradient):
    /// each weight row is dequantized once into a small buffer and dotted with every
    /// input row, the rows shared over threads. It reads the blocks once and never
    /// widens a tile: candle's quantized matmul runs at 4–15% of the f32 decoding rate
    /// here (its Q4_1 product has no SIMD path, and each of a tiled weight's calls
    /// quantizes the activations again), dequantized tiles at 13–60%
    /// (`cal-grpo bench qmatmul --only decode`). Exact for the dequantized weight, as
    /// `forward` is. Off the CPU, or with a gradient to record, the same as `forward`.
    pub fn forward_decode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() || x.track_op() {
            return self.forward(x);
        }
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let xf = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let dots = row_dots(&self.tiles, &xf, m, self.inp)?; // [out, m]
        let mut y = vec![0f32; m * self.out];
        for (r, d) in dots.chunks_exact(m).enumerate() {
            for (i, v) in d.iter().enumerate() {
                y[i * self.out + r] = *v;
            }
        }
        let mut out = dims;
        *out.last_mut().unwrap() = self.out;
        Tensor::from_vec(y, out, x.device())?.to_dtype(x.dtype())
    }

    /// `y`, the product computed from `x` detached, in `x`'s dtype, with the backward
    /// pass to `x` when `x` records a gradient.
    fn with_grad(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let y = y.to_dtype(x.dtype())?.contiguous()?;
        if !x.track_op() {
            return Ok(y);
        }
        x.apply_op1(InputGrad { w: self.clone(), y })
    }

    /// Rows `ids` of the weight, dequantized: `[ids.len(), in]` in f32 (an embedding
    /// lookup). Only the tiles the ids fall in are dequantized, each once.
    pub fn rows(&self, ids: &[u32], device: &candle_core::Device) -> candle_core::Result<Tensor> {
        if ids.is_empty() {
            return Tensor::zeros((0, self.inp), DType::F32, device);
        }
        let tile_rows = self.tiles[0].shape().dims()[0];
        // tile → its place in the compact matrix of the tiles needed
        let mut place = std::collections::BTreeMap::new();
        for &id in ids {
            if id as usize >= self.out {
                candle_core::bail!("token id {id} is out of range for {} rows", self.out);
            }
            place.entry(id as usize / tile_rows).or_insert(0usize);
        }
        let mut parts = Vec::with_capacity(place.len());
        let mut start = 0;
        for (&tile, at) in place.iter_mut() {
            *at = start;
            let q = &self.tiles[tile];
            start += q.shape().dims()[0];
            parts.push(q.dequantize(device)?);
        }
        let index: Vec<u32> = ids
            .iter()
            .map(|&id| (place[&(id as usize / tile_rows)] + id as usize % tile_rows) as u32)
            .collect();
        let n = index.len();
        Tensor::cat(&parts, 0)?.index_select(&Tensor::from_vec(index, n, device)?, 0)
    }

    /// `dy: [..., out]` → `dy · W: [..., in]`, one dequantized tile at a time.
    fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        let dims = dy.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let dy2 = dy.reshape((n, self.out))?.to_dtype(DType::F32)?;
        let mut dx = Tensor::zeros((n, self.inp), DType::F32, dy.device())?;
        let mut start = 0;
        for q in self.tiles.iter() {
            let rows = q.shape().dims()[0];
            let w = q.dequantize(dy.device())?;
            dx = (dx + dy2.narrow(1, start, rows)?.contiguous()?.matmul(&w)?)?;
            start += rows;
        }
        let mut out = dims;
        *out.last_mut().unwrap() = self.inp;
        dx.reshape(out)?.to_dtype(dy.dtype())
    }
}

/// Every row of the tiles (`[out, inp]` in all) dotted with each of the `m` rows of
/// `x` (`[m, inp]`): `[out, m]`. Each weight row is dequantized into a buffer of `inp`
/// floats and used `m` times; chunks of 32 rows from all tiles share the threads.
fn row_dots(
    tiles: &[Arc<QTensor>],
    x: &[f32],
    m: usize,
    inp: usize,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlType};
    use rayon::prelude::*;
    use std::borrow::Cow;
    const CHUNK: usize = 32;
    /// The blocks as stored; a misaligned buffer is copied into blocks first.
    fn blocks<T: GgmlType + Clone>(bytes: &[u8]) -> Cow<'_, [T]> {
        let n = bytes.len() / std::mem::size_of::<T>();
        if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            // SAFETY: GGML blocks are plain data (integers and halves), `n` whole blocks
            // fit in `bytes`, and the pointer is aligned for `T`.
            Cow::Borrowed(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) })
        } else {
            let copied = bytes
                .chunks_exact(std::mem::size_of::<T>())
                // SAFETY: as above; `read_unaligned` copies each block out.
                .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const T) })
                .collect();
            Cow::Owned(copied)
        }
    }
    fn dots<T: GgmlType + Clone + Sync>(
        datas: &[Cow<'_, [u8]>],
        x: &[f32],
        m: usize,
        inp: usize,
    ) -> Vec<f32> {
        let per_row = inp / T::BLCK_SIZE;
        let tiles: Vec<Cow<'_, [T]>> = datas.iter().map(|d| blocks::<T>(d)).collect();
        // (tile, first row, rows) for every chunk, in row order
        let chunks: Vec<(usize, usize, usize)> = tiles
            .iter()
            .enumerate()
            .flat_map(|(t, b)| {
                let rows = b.len() / per_row;
                (0..rows)
                    .step_by(CHUNK)
                    .map(move |r| (t, r, CHUNK.min(rows - r)))
            })
            .collect();
        chunks
            .par_iter()
            .map_init(
                || vec![0f32; inp],
                |buf, &(t, r0, n)| {
                    let mut out = Vec::with_capacity(n * m);
                    for r in r0..r0 + n {
                        T::to_float(&tiles[t][r * per_row..(r + 1) * per_row], buf);
                        out.extend((0..m).map(|i| dot(&x[i * inp..(i + 1) * inp], buf)));
                    }
                    out
                },
            )
            .flatten_iter()
            .collect()
    }
    let datas = tiles
        .iter()
        .map(|q| q.data())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(match tiles[0].dtype() {
        GgmlDType::Q4_0 => dots::<BlockQ4_0>(&datas, x, m, inp),
        GgmlDType::Q4_1 => dots::<BlockQ4_1>(&datas, x, m, inp),
        GgmlDType::Q8_0 => dots::<BlockQ8_0>(&datas, x, m, inp),
        _ => {
            // other formats: each dequantized tile's product
            let dev = candle_core::Device::Cpu;
            let xt = Tensor::from_slice(x, (m, inp), &dev)?;
            let mut out = Vec::new();
            for q in tiles {
                let p = q.dequantize(&dev)?.matmul(&xt.t()?)?;
                out.extend(p.flatten_all()?.to_vec1::<f32>()?);
            }
            out
        }
    })
}

/// An f32 dot product in eight lanes, so that it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The custom op that carries a precomputed quantized product `y` and its backward.
struct InputGrad {
    w: QLinear,
    y: Tensor,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "qlinear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, _) = self.y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.clone(), self.y.shape().clone())),
            _ => candle_core::bail!("qlinear: the product is not on the CPU"),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.w.input_grad(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn weight(out: usize, inp: usize, seed: u64) -> Tensor {
        use rand::Rng;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let v: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
    }

    /// Against the dequantized weight in f32: the input gradient equals `dy · W_deq`
    /// (the backward reads the same blocks), and both forwards (over sequences, and the
    /// decoding step's row kernel) equal the f32 product.
    #[test]
    fn the_input_gradient_is_the_dequantized_weights_and_the_forward_is_close() {
        for (dtype, tile) in [
            (GgmlDType::Q4_0, 16),
            (GgmlDType::Q4_1, 64),
            (GgmlDType::Q8_0, 7),
        ] {
            let w = weight(40, 64, 1);
            let q = QLinear::quantize(&w, dtype, tile).unwrap();
            let wd = q.dequantize().unwrap();
            let x = Var::from_tensor(&weight(6, 64, 2).reshape((2, 3, 64)).unwrap()).unwrap();
            let c = weight(6, 40, 3).reshape((2, 3, 40)).unwrap();
            let y = q.forward(x.as_tensor()).unwrap();
            let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            let want = c
                .reshape((6, 40))
                .unwrap()
                .matmul(&wd)
                .unwrap()
                .reshape((2, 3, 64))
                .unwrap();
            let err = (dx - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(
                err.to_scalar::<f32>().unwrap() < 1e-5,
                "{dtype:?} input gradient"
            );
            let f32y = x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap();
            let rel = |y: &Tensor| {
                ((y - &f32y)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    / f32y.sqr().unwrap().sum_all().unwrap().sqrt().unwrap())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
            };
            // whole sequences: the dequantized tiles' f32 product
            let r = rel(&y);
            assert!(r < 1e-6, "{dtype:?} forward off by {r} (relative)");
            // a decoding step: the row kernel, also the dequantized weight's product
            let r = rel(&q.forward_decode(&x.as_tensor().detach()).unwrap());
            assert!(r < 1e-6, "{dtype:?} decoding forward off by {r} (relative)");
        }
        let err = QLinear::quantize(&weight(4, 20, 1), GgmlDType::Q4_0, 8)
            .err()
            .unwrap();
        assert!(err.to_string().contains("twice its block size 32"), "{err}");
    }

    /// An embedding lookup from the blocks gives the dequantized weight's rows, in the
    /// ids' order, repeats included, across tiles (the last one short).
    #[test]
    fn rows_are_the_dequantized_rows() {
        let q = QLinear::quantize(&weight(45, 64, 7), GgmlDType::Q8_0, 8).unwrap();
        let wd = q.dequantize().unwrap();
        let ids = [44u32, 0, 9, 9, 17, 40, 3];
        let got = q.rows(&ids, &Device::Cpu).unwrap();
        let want = wd
            .index_select(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), 0)
            .unwrap();
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        assert_eq!(q.rows(&[], &Device::Cpu).unwrap().dims(), &[0, 64]);
        let err = q.rows(&[45], &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("token id 45 is out of range"), "{err}");
    }

    /// A LoRA-style adapter on the frozen quantized base: its gradient through the
    /// quantized layer equals the one through the dequantized f32 layer to the forward's
    /// rounding.
    #[test]
    fn gradients_reach_parameters_below_the_quantized_layer() {
        let w = weight(32, 64, 4);
        let q = QLinear::quantize(&w, GgmlDType::Q8_0, 32).unwrap();
        let wd = q.dequantize().unwrap();
        let a = Var::from_tensor(&weight(64, 64, 5)).unwrap();
        let x = weight(5, 64, 6);
        let h = x.matmul(a.as_tensor()).unwrap();
        let loss_q = q.forward(&h).unwrap().sqr().unwrap().sum_all().unwrap();
        let loss_f = h
            .matmul(&wd.t().unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let gq = loss_q
            .backward()
            .unwrap()
            .get(a.as_tensor())
            .unwrap()
            .clone();
        let gf = loss_f
            .backward()
            .unwrap()
            .get(a.as_tensor())
            .unwrap()
            .clone();
        let rel = ((gq - &gf)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            / gf.sqr().unwrap().sum_all().unwrap().sqrt().unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(rel < 0.01, "adapter gradient off by {rel} (relative)");
    }
}
