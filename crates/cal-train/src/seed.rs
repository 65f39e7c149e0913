//! Seeds derived from the run's seed, so that every random draw of a step (LoRA dropout
//! masks, SFT batches) is a pure function of the run seed and the step: a resumed run
//! draws exactly what the uninterrupted one drew without saving any extra RNG state.

/// SplitMix64-style mixing of several integers into one seed.
pub fn mix_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &p| {
        let mut z = h ^ p.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(h << 6);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}
