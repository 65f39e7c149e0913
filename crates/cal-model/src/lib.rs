//! The policy, the reference policy and the generator of cal-grpo: a trainable
//! Llama-family decoder on candle with loading, generation, log-probs and LoRA.

pub mod attention;
pub mod bench;
pub mod blas;
pub mod compose;
pub mod config;
pub mod device;
pub mod gemv;
mod layer;
pub mod model;
pub mod ops;
pub mod peft;
pub mod probe;
pub mod qlinear;
pub mod rowwise;
pub mod tokenizer;
pub mod vocab;

pub use config::ModelConfig;
pub use device::{DTypeSpec, DeviceSpec, Placement};
pub use model::{Forward, KvCache, LoraConfig, Params, Transformer};
pub mod generate;
pub mod load;
