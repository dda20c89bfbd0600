//! A Bloom filter of transfer ids that are in the embedded ledger's file but
//! not in its memory, so that a reservation with a fresh id (nearly all of
//! them) needs no disk read to prove the id was never used.
//!
//! A "maybe" answer sends the caller to the file; a "no" is certain. Bits are
//! atomics so lookups never take a lock; insertions happen under the ledger's
//! load lock, before the id leaves memory.
//!
//! Ids in the gate's own format (`TransferId::fresh`: 32 lowercase hex digits
//! starting with the time in ms) take no bits at all: the filter keeps only the
//! newest time prefix among them (`floor`). Such an id newer than the floor was
//! never written to the file by anything but a chain still in memory, so a
//! fresh reservation needs no disk read, and the filter stops growing with the
//! ledger's history (it took 16 bits per chain ever written). An older id in
//! that format, e.g. a replay after its chain left memory, is looked up on disk.
//!
//! Loading the filter reads only what it needs from the file's `chains` index:
//! the newest id in the gate's range (`GATE_RANGE`, read backwards from its
//! end) and the ids outside that range. Any other id inside the range (it
//! starts with '0' but is not in the gate's format) cannot be told apart from
//! the gate's ids without reading them all, so it always counts as "maybe on
//! disk": a disk read, never a wrong answer.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Hash functions per id: about 1% false positives at 10 bits per id, far
/// fewer at the 16+ bits per id the ledger keeps.
const K: u64 = 7;
/// The smallest filter: 2^20 bits = 128 KiB (it grows when crowded).
const MIN_BITS: u64 = 1 << 20;
/// Bits per id to aim for when sizing.
pub(super) const BITS_PER_ID: u64 = 16;

pub(super) struct IdFilter {
    words: Vec<AtomicU64>,
    mask: u64,
    count: AtomicU64,
    /// The newest time prefix of any id in the gate's format inserted so far.
    floor: AtomicU64,
}

/// Every id in the gate's format sorts in `GATE_RANGE.0 <= id < GATE_RANGE.1`.
pub(super) const GATE_RANGE: (&str, &str) = ("0", "1");

fn in_gate_range(id: &str) -> bool {
    (GATE_RANGE.0..GATE_RANGE.1).contains(&id)
}

/// The time prefix of an id in the gate's format, or `None` for any other id.
/// The format does not depend on the time of the call, so an id is always
/// handled the same way (bits or floor).
pub(super) fn time_prefix(id: &str) -> Option<u64> {
    crate::points::created_ms(id)
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
            floor: AtomicU64::new(0),
        }
    }

    pub(super) fn insert(&self, id: &str) {
        if let Some(t) = time_prefix(id) {
            self.floor.fetch_max(t, Ordering::AcqRel);
            return;
        }
        if in_gate_range(id) {
            // Always "maybe" (see the module comment): no bits needed.
            return;
        }
        let (h1, h2) = hashes(id);
        for i in 0..K {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & self.mask;
            self.words[(bit >> 6) as usize].fetch_or(1 << (bit & 63), Ordering::Release);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// False only if `id` was never inserted.
    pub(super) fn may_contain(&self, id: &str) -> bool {
        if let Some(t) = time_prefix(id) {
            return t <= self.floor.load(Ordering::Acquire);
        }
        if in_gate_range(id) {
            return true;
        }
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

    /// Ids that took bits (those outside the gate's range).
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

    #[test]
    fn gate_ids_take_no_bits_and_only_older_ones_may_be_on_disk() {
        let f = IdFilter::with_capacity(0);
        let id = |ms: u64, rest: &str| format!("{ms:012x}{rest}");
        let a = id(1_800_000_000_000, "0123456789abcdef0123");
        let b = id(1_800_000_000_500, "ffffffffffffffffffff");
        assert_eq!(time_prefix(&a), Some(1_800_000_000_000));
        assert!(!f.may_contain(&a));
        f.insert(&b);
        assert_eq!(f.len(), 0, "no bits for an id in the gate's format");
        // Everything up to the newest inserted time may be on disk ...
        assert!(f.may_contain(&a));
        assert!(f.may_contain(&b));
        // ... and nothing newer can be.
        assert!(!f.may_contain(&id(1_800_000_000_501, "00000000000000000000")));
        // Ids outside the gate's range use the bits.
        for other in [
            "req-1".to_string(),
            format!("1{}", &id(1_800_000_000_000, "0123456789abcdef0123")[1..]),
        ] {
            assert_eq!(time_prefix(&other), None, "{other}");
            assert!(!f.may_contain(&other));
            f.insert(&other);
            assert!(f.may_contain(&other));
        }
        assert_eq!(f.len(), 2);
        // Other shapes inside the range are always "maybe": they need no bits.
        for odd in [
            id(1_800_000_000_000, "0123456789ABCDEF0123"),
            format!("{}0", id(1_800_000_000_000, "0123456789abcdef0123")),
            "0-test".to_string(),
        ] {
            assert_eq!(time_prefix(&odd), None, "{odd}");
            assert!(odd.as_str() >= GATE_RANGE.0 && odd.as_str() < GATE_RANGE.1);
            assert!(f.may_contain(&odd));
            f.insert(&odd);
        }
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn fresh_transfer_ids_are_in_the_gate_format() {
        let id = crate::points::TransferId::fresh();
        assert!(time_prefix(id.as_str()).is_some(), "{id}");
    }
}
