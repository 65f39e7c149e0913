//! A linear layer whose weight stays quantized (QLoRA's frozen base): the forward is
//! candle's quantized matmul, and the backward gives the gradient with respect to the
//! input, `dx = dy · W`, computed tile by tile from the blocks so that `W` is never held
//! whole in f32. The weight itself takes no gradient (it is frozen; LoRA adapters on
//! top train).
//!
//! The weight `[out, in]` is kept as row tiles of `tile_rows` rows, each its own
//! quantized tensor: the forward concatenates the tiles' products, the backward
//! dequantizes one tile at a time (`[tile_rows, in]` in f32) and accumulates
//! `dy[:, tile] · W_tile`. candle's CPU quantized matmul rounds the activations to 8
//! bits (Q8 blocks) in the forward; the backward is exact for the dequantized weight.
//! Not yet wired into the model's linear layers (`--quantize-base` is to come).

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

    /// `x: [..., in]` → `[..., out]`, differentiable in `x`. Off the CPU, each tile is
    /// dequantized for its product (the graph then holds the tiles until the backward).
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
        let dtype = x.dtype();
        let xf = x.detach().to_dtype(DType::F32)?.contiguous()?;
        let parts = self
            .tiles
            .iter()
            .map(|(m, _)| m.forward(&xf))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let y = Tensor::cat(&parts, D::Minus1)?
            .to_dtype(dtype)?
            .contiguous()?;
        if !x.track_op() {
            return Ok(y);
        }
        // the value computed above, with a backward pass to `x`
        x.apply_op1(InputGrad { w: self.clone(), y })
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
    /// (the backward reads the same blocks), the forward is within the 8-bit rounding
    /// of the activations.
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
            let rel = ((y - &f32y)
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
            .unwrap();
            assert!(rel < 0.02, "{dtype:?} forward off by {rel} (relative)");
        }
        let err = QLinear::quantize(&weight(4, 20, 1), GgmlDType::Q4_0, 8)
            .err()
            .unwrap();
        assert!(err.to_string().contains("twice its block size 32"), "{err}");
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
