//! Client keys: the record the ledger's store keeps for each key. Budgets are not
//! here; they are ledger accounts, moved only by transfers.

use crate::points::KeyId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What the gate knows about one client key. The secret itself is never stored:
/// `secret_hash` is the hex SHA-256 of the whole secret (`czg_...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id, `key_` + 16 hex digits.
    pub id: KeyId,
    /// Human name (shown to the client as `companyName`).
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// The first characters of the secret (`czg_ab12`), to recognise it in lists.
    pub secret_prefix: String,
    /// What the client pays per upstream point, in thousandths (1000 = 1.0).
    pub rate_milli: u64,
    /// Tasks in flight at most; `None` = no limit.
    pub concurrency: Option<u32>,
    /// Submits per second; `None` = no limit.
    pub rps: Option<u32>,
    /// Token-bucket burst for `rps`; `None` = same as `rps`.
    pub burst: Option<u32>,
    /// A disabled key is refused with 1001; its history stays.
    pub disabled: bool,
    /// After this time the key is refused with 1001.
    pub expires_at: Option<DateTime<Utc>>,
    /// Free text for operators.
    pub note: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl KeyRecord {
    /// Whether the key may be used at `now`.
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        !self.disabled && self.expires_at.is_none_or(|t| now < t)
    }

    /// Points the client pays for `upstream` points at this key's rate, rounded
    /// half-up (integer arithmetic: the rate is in thousandths).
    pub fn charge_for(&self, upstream: u64) -> u64 {
        let p = u128::from(upstream) * u128::from(self.rate_milli);
        u64::try_from((p + 500) / 1000).unwrap_or(u64::MAX)
    }
}

/// Prefix of every client key secret.
pub const SECRET_PREFIX: &str = "czg_";

/// A new random key secret: `czg_` + 192 random bits in hex.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("{SECRET_PREFIX}{}", hex::encode(b))
}

/// A new public key id: `key_` + 64 random bits in hex.
pub fn new_key_id() -> KeyId {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    KeyId(format!("key_{}", hex::encode(b)))
}

/// The stored form of a secret: hex SHA-256.
pub fn hash_secret(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The part of a secret that may be shown in lists (`czg_` and 4 more characters).
pub fn secret_prefix(secret: &str) -> String {
    secret.chars().take(SECRET_PREFIX.len() + 4).collect()
}

/// The hot in-memory index of keys by secret hash, in front of the ledger's store.
///
/// `DashMap`s because every request reads them and only admin actions and reloads
/// write them; their shard locks are never held across an `.await`. Hashes are kept
/// as raw 32-byte digests (not hex) to halve what 100,000 keys cost in memory.
#[derive(Default)]
pub struct KeyCache {
    by_hash: dashmap::DashMap<[u8; 32], std::sync::Arc<KeyRecord>>,
    /// Each key's current hash, so a rotation drops the old one in O(1).
    hash_of: dashmap::DashMap<KeyId, [u8; 32]>,
}

fn digest(secret: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes()).into()
}

fn stored_digest(hex_hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut out).ok()?;
    Some(out)
}

impl KeyCache {
    /// Find a key by its presented secret. The map is keyed by the secret's hash;
    /// the final comparison of hashes is constant-time so that timing says nothing
    /// about how much of a guess was right.
    pub fn lookup(&self, secret: &str) -> Option<std::sync::Arc<KeyRecord>> {
        use subtle::ConstantTimeEq;
        let h = digest(secret);
        let rec = self.by_hash.get(&h)?.clone();
        let stored = stored_digest(&rec.secret_hash)?;
        bool::from(stored.ct_eq(&h)).then_some(rec)
    }

    /// Put (or replace) a key; a rotated key's old hash is dropped.
    pub fn put(&self, rec: KeyRecord) {
        let Some(h) = stored_digest(&rec.secret_hash) else {
            tracing::error!(key = %rec.id, "key record with a malformed hash ignored");
            return;
        };
        if let Some(old) = self.hash_of.insert(rec.id.clone(), h) {
            if old != h {
                self.by_hash.remove(&old);
            }
        }
        self.by_hash.insert(h, std::sync::Arc::new(rec));
    }

    /// Put changed keys (incremental reload from a shared store).
    pub fn put_all(&self, recs: Vec<KeyRecord>) {
        for r in recs {
            self.put(r);
        }
    }

    /// Replace the whole index (periodic reload from a shared store).
    pub fn replace_all(&self, recs: Vec<KeyRecord>) {
        let keep: std::collections::HashSet<KeyId> = recs.iter().map(|r| r.id.clone()).collect();
        for r in recs {
            self.put(r);
        }
        let gone: Vec<(KeyId, [u8; 32])> = self
            .hash_of
            .iter()
            .filter(|e| !keep.contains(e.key()))
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        for (id, h) in gone {
            self.hash_of.remove(&id);
            self.by_hash.remove(&h);
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, secret: &str) -> KeyRecord {
        let now = Utc::now();
        KeyRecord {
            id: KeyId(id.into()),
            name: id.into(),
            secret_hash: hash_secret(secret),
            secret_prefix: secret_prefix(secret),
            rate_milli: 1000,
            concurrency: None,
            rps: None,
            burst: None,
            disabled: false,
            expires_at: None,
            note: String::new(),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn a_rotated_key_stops_matching_its_old_secret() {
        let c = KeyCache::default();
        c.put(rec("k1", "czg_old"));
        assert!(c.lookup("czg_old").is_some());
        c.put(rec("k1", "czg_new"));
        assert!(c.lookup("czg_old").is_none());
        assert_eq!(c.lookup("czg_new").unwrap().id.as_str(), "k1");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn replace_all_drops_keys_no_longer_in_the_store() {
        let c = KeyCache::default();
        c.put(rec("k1", "czg_a"));
        c.put(rec("k2", "czg_b"));
        c.replace_all(vec![rec("k2", "czg_b")]);
        assert!(c.lookup("czg_a").is_none());
        assert!(c.lookup("czg_b").is_some());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn charge_rounds_half_up_in_thousandths() {
        let mut r = rec("k", "s");
        r.rate_milli = 1500;
        assert_eq!(r.charge_for(12), 18);
        r.rate_milli = 1250;
        assert_eq!(r.charge_for(2), 3); // 2.5 → 3
        r.rate_milli = 1200;
        assert_eq!(r.charge_for(12), 14); // 14.4 → 14
    }
}
