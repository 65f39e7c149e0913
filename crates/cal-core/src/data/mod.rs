//! GSM8K data: loading the published files and generating GSM8K-format problems.

pub mod generator;
pub mod gsm8k;
pub mod misconception;
pub mod planted;
pub mod preference;
pub mod sets;

pub use generator::{generate, generate_disjoint, normalize_question, GenConfig, Style};
pub use gsm8k::{load, select, DataError, Example};
pub use sets::{load_set, LoadedSet, SetKind};
