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

#[cfg(feature = "mpi")]
pub mod mpi;

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

    /// [`Collective::all_reduce_sum`] in f64: batch statistics and metrics.
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;

    /// Every rank's `data`, in rank order, on rank 0 (the others get nothing back).
    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Replaces `data` on every rank by rank `root`'s.
    fn broadcast(&self, data: &mut [u8], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Ends the whole run now, every rank, with exit status `code`: what a rank that
    /// failed calls, so that none is left waiting for it.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
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

    fn all_reduce_sum_f64(&self, _data: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![data.to_vec()])
    }

    fn broadcast(&self, _data: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// How many ranks the launcher (`mpirun`, `srun`) started, from its environment (1
/// without one).
pub fn launched_ranks() -> usize {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MV2_COMM_WORLD_SIZE",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
    .unwrap_or(1)
}

/// The ranks of this process's run: MPI's world when a launcher started several (with
/// the `mpi` feature), else [`SingleProcess`].
pub fn from_launch() -> Result<std::sync::Arc<dyn Collective>> {
    let n = launched_ranks();
    if n <= 1 {
        return Ok(std::sync::Arc::new(SingleProcess));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(std::sync::Arc::new(mpi::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        anyhow::bail!(
            "started as one of {n} MPI ranks, but this binary was built without data \
             parallel: cargo build --release -p cal-cli --features mpi"
        )
    }
}

/// Elements of f32 gradient per all-reduce call (16 MB): the flat copy a reduce needs
/// stays this size, not the model's, and a large model's gradient goes in several calls.
pub const BUCKET: usize = 1 << 22;

/// The reduce point of a step: accumulated gradients summed over the ranks, in place,
/// in buckets of about [`BUCKET`] elements (whole tensors; one larger than a bucket
/// goes alone). Each rank's gradient is already weighted by its share of the global
/// batch, so the sum is the global gradient. With one rank nothing is touched.
pub fn reduce_gradients(c: &dyn Collective, grads: &mut [Option<Tensor>]) -> Result<()> {
    reduce_gradients_in(c, grads, BUCKET)
}

/// [`reduce_gradients`] with buckets of `bucket` elements. Every rank must hold the
/// same gradients (see `AdamW::all_reduce`), so the buckets agree.
pub fn reduce_gradients_in(
    c: &dyn Collective,
    grads: &mut [Option<Tensor>],
    bucket: usize,
) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let present: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
    let mut start = 0;
    while start < present.len() {
        // the next tensors up to a bucket's worth (at least one)
        let (mut end, mut n) = (start, 0);
        while end < present.len() {
            let len = grads[present[end]].as_ref().map_or(0, Tensor::elem_count);
            if end > start && n + len > bucket {
                break;
            }
            n += len;
            end += 1;
        }
        let mut flat: Vec<f32> = Vec::with_capacity(n);
        for &i in &present[start..end] {
            let g = grads[i].as_ref().expect("present");
            flat.extend(
                g.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        c.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for &i in &present[start..end] {
            let g = grads[i].as_mut().expect("present");
            let len = g.elem_count();
            let summed = Tensor::from_slice(&flat[at..at + len], g.shape(), g.device())?;
            *g = summed.to_dtype(g.dtype())?;
            at += len;
        }
        start = end;
    }
    Ok(())
}

/// The range of `n` items (a step's groups, a batch's pairs) that `rank` of `world`
/// takes: equal consecutive shares, so the ranks' shares in rank order are the batch.
pub fn share(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let per = n / world.max(1);
    rank * per..(rank + 1) * per
}

/// An error naming both when `n` items (`flag`'s) do not split into equal shares over
/// `world` ranks.
pub fn divides_over(flag: &str, n: usize, world: usize) -> Result<()> {
    if !n.is_multiple_of(world.max(1)) {
        anyhow::bail!(
            "{flag} {n} does not divide over the {world} ranks: each rank takes an equal share"
        );
    }
    Ok(())
}

/// `f` on rank 0 first, then on the others once it has returned: what rank 0 makes on
/// the way (a `tiny` warm start, a downloaded asset) is in the cache when they look.
pub fn main_first<T>(c: &dyn Collective, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if c.is_main() {
        let out = f()?;
        c.barrier()?;
        Ok(out)
    } else {
        c.barrier()?;
        f()
    }
}

/// Whether any rank says yes (a non-finite loss on one rank skips the step on all, so
/// that none waits in a reduce the others never reach).
pub fn any_rank(c: &dyn Collective, yes: bool) -> Result<bool> {
    if c.world() == 1 {
        return Ok(yes);
    }
    let mut v = [f64::from(u8::from(yes))];
    c.all_reduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// A checksum of `params` (names and bytes, in order).
pub fn weights_checksum(params: &[(String, Tensor)]) -> Result<u64> {
    use std::hash::Hasher;
    // FNV-1a: the same on every rank and build, unlike std's randomly keyed hashers
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for (name, t) in params {
        h.write(name.as_bytes());
        let v = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        for x in v {
            h.write(&x.to_bits().to_le_bytes());
        }
    }
    Ok(h.finish())
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Every rank's weights against rank 0's: an error on every rank, naming the ranks
/// that differ, when they do (the ranks took different steps: the run is not one run).
pub fn check_weights(c: &dyn Collective, params: &[(String, Tensor)], step: usize) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mine = weights_checksum(params)?;
    let mut root = mine.to_le_bytes();
    c.broadcast(&mut root, 0)?;
    let mut differs = vec![0.0f64; c.world()];
    differs[c.rank()] = f64::from(u8::from(u64::from_le_bytes(root) != mine));
    c.all_reduce_sum_f64(&mut differs)?;
    let bad: Vec<String> = (0..c.world())
        .filter(|&r| differs[r] > 0.0)
        .map(|r| r.to_string())
        .collect();
    if !bad.is_empty() {
        anyhow::bail!(
            "after step {step} the weights of rank(s) {} differ from rank 0's: the ranks \
             no longer train one model (run.weight-check-every)",
            bad.join(", ")
        );
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
            // emptied for the next call once every rank has read it
            if self.rank == 0 {
                self.sum.lock().unwrap().clear();
            }
            self.gate.wait();
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _data: &mut [f64]) -> Result<()> {
            unimplemented!("not used by the reduce point")
        }
        fn gather_bytes(&self, _data: &[u8]) -> Result<Vec<Vec<u8>>> {
            unimplemented!("not used by the reduce point")
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
                        // buckets of 4 elements: the first tensor alone, then the rest
                        let mut twice = grads.clone();
                        reduce_gradients(&c, &mut grads).unwrap();
                        reduce_gradients_in(&c, &mut twice, 4).unwrap();
                        for (a, b) in grads.iter().zip(&twice) {
                            let v = |t: &Option<Tensor>| {
                                t.as_ref()
                                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                            };
                            assert_eq!(v(a), v(b));
                        }
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

    #[test]
    fn shares_cover_the_batch_in_rank_order() {
        let parts: Vec<_> = (0..4).map(|r| share(8, r, 4)).collect();
        assert_eq!(parts, [0..2, 2..4, 4..6, 6..8]);
        assert_eq!(share(8, 0, 1), 0..8);
    }

    #[test]
    fn the_checksum_sees_one_changed_bit() {
        let dev = Device::Cpu;
        let a = vec![("w".to_string(), Tensor::new(&[1.0f32, 2.0], &dev).unwrap())];
        let b = vec![(
            "w".to_string(),
            Tensor::new(&[1.0f32, f32::from_bits(2.0f32.to_bits() + 1)], &dev).unwrap(),
        )];
        assert_ne!(weights_checksum(&a).unwrap(), weights_checksum(&b).unwrap());
        assert_eq!(
            weights_checksum(&a).unwrap(),
            weights_checksum(&a.clone()).unwrap()
        );
    }
}
