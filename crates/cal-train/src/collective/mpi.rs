//! [`Collective`] over MPI (the `mpi` crate on the system's MPI, Debian's OpenMPI
//! here): the CPU learner's data parallel, started by `mpirun` or Slurm's `srun`.
//!
//! MPI is initialised `Funneled`: the thread that initialised it (the main thread,
//! which runs the training loop) makes every call; rayon's and tokio's threads never
//! do. [`Mpi`] checks that on each call instead of trusting it.
//!
//! A rank that fails calls [`Collective::abort`] (`MPI_Abort`): the launcher then ends
//! every rank, where returning from `main` would leave the others waiting in a reduce.

use super::Collective;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::thread::ThreadId;

/// One rank of an MPI world (`MPI_COMM_WORLD`).
pub struct Mpi {
    world: SimpleCommunicator,
    thread: ThreadId,
    // dropped last: finalises MPI
    _universe: Universe,
}

// SAFETY: the handles are only used by the thread that initialised MPI; `on_thread`
// refuses every call from another one, which is what `Funneled` permits.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI for this process.
    pub fn init() -> Result<Self> {
        let Some((universe, level)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI was initialised already");
        };
        if level < Threading::Funneled {
            bail!("the MPI library gives threading level {level:?}; data parallel needs Funneled");
        }
        Ok(Self {
            world: universe.world(),
            thread: std::thread::current().id(),
            _universe: universe,
        })
    }

    fn on_thread(&self) -> Result<()> {
        if std::thread::current().id() != self.thread {
            bail!("an MPI call from a thread other than the one that initialised MPI");
        }
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.on_thread()?;
        let send = data.to_vec();
        self.world
            .all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.on_thread()?;
        let send = data.to_vec();
        self.world
            .all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }

    fn gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.on_thread()?;
        let root = self.world.process_at_rank(0);
        let n = data.len() as mpi::Count;
        if self.rank() != 0 {
            root.gather_into(&n);
            root.gather_varcount_into(data);
            return Ok(Vec::new());
        }
        let mut counts = vec![0 as mpi::Count; self.world()];
        root.gather_into_root(&n, &mut counts[..]);
        let displs: Vec<mpi::Count> = counts
            .iter()
            .scan(0, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let mut buf = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
        {
            let mut parts = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            root.gather_varcount_into_root(data, &mut parts);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn broadcast(&self, data: &mut [u8], root: usize) -> Result<()> {
        self.on_thread()?;
        self.world.process_at_rank(root as i32).broadcast_into(data);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.on_thread()?;
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
