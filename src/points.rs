//! Domain types shared by every module: points, key ids, transfer ids.
//!
//! `Points` is a whole, non-negative number of the provider's points. Prices are
//! computed in fixed point inside `pricing` and rounded to `Points` once, at the end.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A whole, non-negative number of points.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Points(pub u64);

impl Points {
    /// Zero points.
    pub const ZERO: Points = Points(0);

    /// The raw count.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Points) -> Option<Points> {
        self.0.checked_add(other.0).map(Points)
    }

    /// `self - other`, floored at zero.
    pub fn saturating_sub(self, other: Points) -> Points {
        Points(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Points {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The public id of a client key (`key_...`), never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl KeyId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The time prefix of an id in the gate's format, or `None` for any other id:
/// 32 lowercase hex digits starting with `0`, the first 12 of them milliseconds.
pub fn created_ms(id: &str) -> Option<u64> {
    let b = id.as_bytes();
    if b.len() != 32 || b[0] != b'0' || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(&id[..12], 16).ok()
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a ledger transfer chain: one reservation and whatever settles it.
/// The gate uses its request id; replays with the same id are no-ops.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TransferId(pub String);

impl TransferId {
    /// A fresh id that sorts by creation time: 12 hex digits of milliseconds
    /// since the epoch, then 20 random hex digits (80 bits, unique across
    /// replicas). Ids that grow with time keep the ledger's id-keyed B-trees
    /// appending at their right edge, so a batch of new chains dirties a few
    /// pages instead of one page per chain (random ids cost the embedded ledger
    /// more than half its throughput; see docs/benchmarks.md, Ledger). The
    /// embedded ledger recognises this exact shape (`ledger::idfilter`), so
    /// keep the two in step.
    pub fn fresh() -> TransferId {
        use rand::RngCore;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut b = [0u8; 16];
        // 48 bits of milliseconds last until the year 10889.
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        rand::thread_rng().fill_bytes(&mut b[6..]);
        TransferId(hex::encode(b))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When an id in the gate's format ([`TransferId::fresh`]) was made, in ms
    /// since the epoch; `None` for any other id.
    pub fn created_ms(&self) -> Option<u64> {
        created_ms(&self.0)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::TransferId;

    #[test]
    fn fresh_ids_are_hex_unique_and_grow_with_time() {
        let first = TransferId::fresh();
        assert_eq!(first.as_str().len(), 32);
        assert!(first.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| TransferId::fresh().0).collect();
        assert_eq!(ids.len(), 10_000, "80 random bits never collide here");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = TransferId::fresh();
        // The time prefix orders ids made in different milliseconds.
        assert!(later > first, "{later} should sort after {first}");
        assert!(later.as_str()[..12] > first.as_str()[..12]);
    }
}
