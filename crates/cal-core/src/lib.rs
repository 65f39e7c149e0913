//! Pure, model-free core of cal-grpo.
//!
//! Each pipeline stage that does not need a model lives here as a small module
//! with plain data in and plain data out, so it can be tested in milliseconds:
//!
//! - [`grade`]: extract the final answer from a response and compare numerically.
//! - [`locate`]: find the oracle's first-error segment inside the response text.
//! - [`map`]: turn that byte range into a range of completion tokens.
//! - [`credit`]: turn outcome rewards and spans into a `[B, T]` advantage matrix.
//! - [`advantage`]: token rewards and the estimators that read them (GAE, REINFORCE++).
//! - [`data`]: GSM8K loading and the seeded GSM8K-format problem generator.

pub mod advantage;
pub mod assets;
pub mod credit;
pub mod data;
pub mod evaluate;
pub mod grade;
pub mod locate;
pub mod map;
pub mod reward;
