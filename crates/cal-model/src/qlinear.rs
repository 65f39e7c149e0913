//! A linear layer whose weight stays quantized (QLoRA's frozen base): the forward is
//! candle's quantized matmul, and the backward gives the gradient with respect to the
//! input, `dx = dy · W`, computed tile by tile from the blocks so that `W` is never held
//! whole in f32. The weight itself takes no gradient (it is frozen; LoRA adapters on
//! top train).
//!
//! The weight `[out, in]` is kept as row tiles of `tile_rows` rows, each its own
//! quantized tensor: the forward concatenates the tiles' products, the backward
//! dequantizes one tile at a time (`[tile_rows, in]` in f32) and accumulates
//! `dy[:, tile] · W_tile`. Over whole sequences the forward does the same (a tile
//! dequantized for an f32 GEMM: exact for the dequantized weight, and far faster than
//! candle's CPU quantized matmul at hundreds of rows); a decoding step, a few rows,
//! takes candle's quantized matmul, which reads the blocks once and rounds the
//! activations to 8 bits (Q8 blocks).
//!
//! The vocabulary matrices use it too: the LM head is a product like any other, and the
//! embedding looks its rows up with [`QLinear::rows`], which dequantizes only the tiles
//! the ids fall in.

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor, D};
use std::sync::Arc;

/// A frozen quantized weight `[out, in]` in row tiles.
#[derive(Clone)]
pub struct QLinear {
    tiles: Arc<Vec<(QMatMul, Arc<QTensor>)>>,
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
            tiles.push((QMatMul::from_arc(q.clone())?, q));
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
            tiles.push((QMatMul::from_arc(t.clone())?, t));
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
            .map(|(_, q)| q.dequantize(&q.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Bytes the quantized weight holds.
    pub fn storage_bytes(&self) -> usize {
        self.tiles
            .iter()
            .map(|(_, q)| q.storage_size_in_bytes())
            .sum()
    }

    /// `x: [..., in]` → `[..., out]` over whole sequences (training, log-probs, the
    /// prefill), differentiable in `x`: each tile is dequantized for an f32 GEMM, which
    /// on this CPU runs 2–20× the rate of candle's quantized matmul at these row counts
    /// (`cal-grpo bench qmatmul`), and is exact for the dequantized weight. The graph
    /// keeps no tile: the backward dequantizes them again.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            let parts = self
                .tiles
                .iter()
                .map(|(_, q)| {
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
            .map(|(_, q)| crate::ops::linear(&xf, &q.dequantize(x.device())?, None))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.with_grad(x, Tensor::cat(&parts, D::Minus1)?)
    }

    /// [`QLinear::forward`] for one decoding step (a row per sequence): candle's
    /// quantized matmul, which reads the blocks once without widening them (it rounds
    /// the activations to 8 bits). Off the CPU, the same as `forward`.
    pub fn forward_decode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward(x);
        }
        let xf = x.detach().to_dtype(DType::F32)?.contiguous()?;
        let parts = self
            .tiles
            .iter()
            .map(|(m, _)| m.forward(&xf))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.with_grad(x, Tensor::cat(&parts, D::Minus1)?)
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
        let tile_rows = self.tiles[0].1.shape().dims()[0];
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
            let q = &self.tiles[tile].1;
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
        for (_, q) in self.tiles.iter() {
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
    /// (the backward reads the same blocks), the forward over sequences equals the f32
    /// product, the decoding forward is within the 8-bit rounding of the activations.
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
            // a decoding step: candle's quantized matmul, activations rounded to 8 bits
            let r = rel(&q.forward_decode(x.as_tensor()).unwrap());
            assert!(r < 0.02, "{dtype:?} decoding forward off by {r} (relative)");
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
