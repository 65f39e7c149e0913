//! The experiment tools, apart from the training step: running baseline and CAL arms
//! on the same seeds and data ([`experiment`]), comparing two evaluation reports
//! ([`compare`]), the table across experiment folders ([`summarize`]), CAL's gain against
//! oracle quality ([`noise_map`]) and the statistics they share ([`stats`]: intervals
//! over seeds, the sample-efficiency ratio).

pub mod compare;
pub mod experiment;
pub mod noise_map;
pub mod stats;
pub mod summarize;
