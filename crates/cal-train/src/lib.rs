//! Training, evaluation and experiments of cal-grpo.
//!
//! The GRPO step in [`grpo`] reads like the method: [`rollout`] (generate) → [`score`]
//! (grade, locate, map, credit) → [`optimize`] (micro-batches, [`loss`], accumulate,
//! [`update`]) → [`metrics`] and [`log`]. [`config`] is the one run configuration.

pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod evaluate;
pub mod experiment;
pub mod grpo;
pub mod log;
pub mod loss;
pub mod metrics;
pub mod optimize;
pub mod policy;
pub mod rollout;
pub mod rundir;
pub mod score;
pub mod sft;
pub mod study;
pub mod summarize;
pub mod tiny;
pub mod update;
