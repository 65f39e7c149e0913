//! Oracles (issue 4).
