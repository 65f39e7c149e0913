//! The learner's view of the other processes of a data-parallel run: who it is, how
//! many there are, and the few operations a data-parallel step needs.
//!
//! A step is the same on every rank: each takes its share of whole groups, generates,
//! scores and computes gradients; the gradients are summed across ranks between the
//! accumulation and the optimizer step (so the gradient norm and its clipping see the
//! global gradient); every rank then takes the same AdamW step. Rank 0 alone writes the
//! run folder, logs, TensorBoard and checkpoints ([`Collective::is_main`], nanoGPT's
//! `master_process`). [`SingleProcess`] is the default: rank 0 of 1, every operation a
//! no-op, so a one-process run is bit for bit what it was before ranks existed.

use anyhow::Result;
use candle_core::Tensor;

/// Ranks of one run and the collective operations between them.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;

    /// How many ranks the run has.
    fn world(&self) -> usize;

    /// Whether this rank writes the run folder, logs and checkpoints.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Replaces `data` on every rank by its element-wise sum over the ranks.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;

    /// Replaces `data` on every rank by rank `root`'s.
    fn broadcast(&self, data: &mut [u8], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// One process: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _data: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The reduce point of a step: accumulated gradients summed over the ranks, in place
/// (one flat f32 buffer, so one collective call per step). Each rank's gradient is
/// already weighted by its share of the global batch, so the sum is the global
/// gradient. With one rank nothing is touched.
pub fn reduce_gradients(c: &dyn Collective, grads: &mut [Option<Tensor>]) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mut flat: Vec<f32> = Vec::new();
    for g in grads.iter().flatten() {
        flat.extend(
            g.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?,
        );
    }
    c.all_reduce_sum(&mut flat)?;
    let mut at = 0;
    for g in grads.iter_mut().flatten() {
        let n = g.elem_count();
        let summed = Tensor::from_slice(&flat[at..at + n], g.shape(), g.device())?;
        *g = summed.to_dtype(g.dtype())?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::{Arc, Barrier, Mutex};

    /// Ranks as threads of one process: a real collective over shared memory, to check
    /// the reduce point against the sum it must give.
    struct Threads {
        rank: usize,
        world: usize,
        sum: Arc<Mutex<Vec<f32>>>,
        gate: Arc<Barrier>,
    }

    impl Collective for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
            {
                let mut s = self.sum.lock().unwrap();
                if s.is_empty() {
                    s.resize(data.len(), 0.0);
                }
                s.iter_mut().zip(data.iter()).for_each(|(a, b)| *a += b);
            }
            self.gate.wait();
            data.copy_from_slice(&self.sum.lock().unwrap());
            self.gate.wait();
            Ok(())
        }
        fn broadcast(&self, _data: &mut [u8], _root: usize) -> Result<()> {
            unimplemented!("not used by the reduce point")
        }
        fn barrier(&self) -> Result<()> {
            self.gate.wait();
            Ok(())
        }
    }

    #[test]
    fn one_rank_leaves_the_gradients_untouched() {
        let g = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
        let mut grads = vec![Some(g.clone()), None];
        reduce_gradients(&SingleProcess, &mut grads).unwrap();
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            [1.5, -2.0]
        );
        assert!(grads[1].is_none() && SingleProcess.is_main());
    }

    #[test]
    fn two_ranks_sum_every_gradient() {
        let (sum, gate) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Barrier::new(2)));
        let out: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let c = Threads {
                        rank,
                        world: 2,
                        sum: sum.clone(),
                        gate: gate.clone(),
                    };
                    s.spawn(move || {
                        let k = rank as f32 + 1.0;
                        let dev = Device::Cpu;
                        let mut grads = vec![
                            Some(Tensor::new(&[[k, 2.0 * k], [0.0, -k]], &dev).unwrap()),
                            None,
                            Some(Tensor::new(&[10.0 * k], &dev).unwrap()),
                        ];
                        reduce_gradients(&c, &mut grads).unwrap();
                        grads
                            .iter()
                            .flatten()
                            .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // ranks hold k = 1 and k = 2: every entry is 3× the k = 1 value
        for grads in &out {
            assert_eq!(grads[0], [3.0, 6.0, 0.0, -3.0]);
            assert_eq!(grads[1], [30.0]);
        }
    }
}
