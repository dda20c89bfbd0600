//! A Bloom filter of transfer ids that are in the embedded ledger's file but
//! not in its memory, so that a reservation with a fresh id (nearly all of
//! them) needs no disk read to prove the id was never used.
//!
//! A "maybe" answer sends the caller to the file; a "no" is certain. Bits are
//! atomics so lookups never take a lock; insertions happen under the ledger's
//! load lock, before the id leaves memory.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Hash functions per id: about 1% false positives at 10 bits per id, far
/// fewer at the 16+ bits per id the ledger keeps.
const K: u64 = 7;
/// The smallest filter: 2^24 bits = 2 MiB.
const MIN_BITS: u64 = 1 << 24;
/// Bits per id to aim for when sizing.
pub(super) const BITS_PER_ID: u64 = 16;

pub(super) struct IdFilter {
    words: Vec<AtomicU64>,
    mask: u64,
    count: AtomicU64,
}

fn hashes(id: &str) -> (u64, u64) {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut a);
    let h1 = a.finish();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (0x9e37_79b9_7f4a_7c15u64, id).hash(&mut b);
    // Odd, so that the K probes are distinct modulo a power of two.
    (h1, b.finish() | 1)
}

impl IdFilter {
    /// An empty filter sized for `expected` ids.
    pub(super) fn with_capacity(expected: u64) -> IdFilter {
        let bits = expected
            .saturating_mul(BITS_PER_ID)
            .max(MIN_BITS)
            .checked_next_power_of_two()
            .unwrap_or(1 << 40);
        let words = (bits / 64) as usize;
        IdFilter {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            mask: bits - 1,
            count: AtomicU64::new(0),
        }
    }

    pub(super) fn insert(&self, id: &str) {
        let (h1, h2) = hashes(id);
        for i in 0..K {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & self.mask;
            self.words[(bit >> 6) as usize].fetch_or(1 << (bit & 63), Ordering::Release);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// False only if `id` was never inserted.
    pub(super) fn may_contain(&self, id: &str) -> bool {
        let (h1, h2) = hashes(id);
        (0..K).all(|i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & self.mask;
            self.words[(bit >> 6) as usize].load(Ordering::Acquire) & (1 << (bit & 63)) != 0
        })
    }

    /// True when the filter holds so many ids that false positives climb.
    pub(super) fn is_crowded(&self) -> bool {
        self.count
            .load(Ordering::Relaxed)
            .saturating_mul(BITS_PER_ID * 3 / 4)
            > self.mask
    }

    pub(super) fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_forgets_an_inserted_id_and_rarely_invents_one() {
        let f = IdFilter::with_capacity(100_000);
        for i in 0..100_000 {
            f.insert(&format!("req-{i}"));
        }
        assert!((0..100_000).all(|i| f.may_contain(&format!("req-{i}"))));
        let false_positives = (0..100_000)
            .filter(|i| f.may_contain(&format!("other-{i}")))
            .count();
        assert!(false_positives < 100, "{false_positives} false positives");
        assert!(!f.is_crowded());
    }
}
