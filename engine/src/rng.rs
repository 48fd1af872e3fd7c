//! The crate's one source of pseudo-randomness and bit mixing: splitmix64 (Steele, Lea and Flood,
//! 2014).
//!
//! Everything here is deterministic from a seed, so a simulation that seeds it reproduces the same
//! run. It is not a cryptographic generator: outputs can be predicted from a few earlier ones.

/// The splitmix64 output function: a bijective mixer of 64-bit words in which every input bit
/// affects every output bit. Used to spread low-entropy values (counters, short hashes).
pub const fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The 128-bit product of `a` and `b` with its two halves xored together (the "folded multiply"
/// of foldhash and wyhash): every bit of the result depends on every bit of both inputs, for one
/// multiplication.
#[inline(always)]
pub const fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The splitmix64 generator: a counter stepped by the golden-ratio increment and passed through
/// [`mix64`]. Its period is 2^64 and no output repeats within it.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The golden-ratio increment of the counter.
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        mix64(self.state)
    }

    /// A value in `0..n` (`n >= 1`), by multiply-shift: no division, bias below 2^-32 for the
    /// small `n` tests use.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference outputs of splitmix64 seeded with 0 (from the published C implementation).
    #[test]
    fn matches_reference_sequence() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[r.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }
}
