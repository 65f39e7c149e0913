//! Training, evaluation and experiments of cal-grpo.
//!
//! The training loop in [`trainer`] reads like the method: [`rollout`] (generate) →
//! [`score`] (grade, locate, map) → the [`algorithm`]'s advantages (GRPO's groups, or
//! PPO's critic from [`value`]) → [`optimize`] (micro-batches, [`loss`], accumulate,
//! [`adamw`]) → [`metrics`] and [`log`]. [`config`] is the one run configuration. The
//! experiment tools (baseline against CAL, comparisons, tables over seeds) live apart,
//! in [`study`].

pub mod adamw;
pub mod algorithm;
pub mod bench;
pub mod cache;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod distill;
pub mod dpo;
pub mod engine;
pub mod evaluate;
pub mod log;
pub mod loss;
pub mod metrics;
pub mod optimize;
pub mod policy;
pub mod preference;
pub mod prompt;
pub mod rollout;
pub mod rundir;
pub mod score;
pub mod seed;
pub mod sft;
pub mod study;
pub mod tiny;
pub mod trainer;
pub mod value;
