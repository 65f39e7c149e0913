//! Training, evaluation and experiments of cal-grpo.
//!
//! The GRPO step in [`grpo`] reads like the method: generate → grade → locate → map →
//! credit → loss → update → log. Each stage is a module with a pure core.

pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod evaluate;
pub mod experiment;
pub mod grpo;
pub mod log;
pub mod loss;
pub mod policy;
pub mod sft;
pub mod tiny;
pub mod update;
