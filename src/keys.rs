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
/// A `DashMap` because every request reads it and only admin actions write it; its
/// shard locks are never held across an `.await`.
#[derive(Default)]
pub struct KeyCache {
    by_hash: dashmap::DashMap<String, std::sync::Arc<KeyRecord>>,
}

impl KeyCache {
    /// Find a key by its presented secret. The map is keyed by the secret's hash;
    /// the final comparison of hashes is constant-time so that timing says nothing
    /// about how much of a guess was right.
    pub fn lookup(&self, secret: &str) -> Option<std::sync::Arc<KeyRecord>> {
        use subtle::ConstantTimeEq;
        let h = hash_secret(secret);
        let rec = self.by_hash.get(&h)?.clone();
        bool::from(rec.secret_hash.as_bytes().ct_eq(h.as_bytes())).then_some(rec)
    }

    /// Put (or replace) a key; a rotated key's old hash is dropped.
    pub fn put(&self, rec: KeyRecord) {
        self.by_hash
            .retain(|h, r| r.id != rec.id || *h == rec.secret_hash);
        self.by_hash
            .insert(rec.secret_hash.clone(), std::sync::Arc::new(rec));
    }

    /// Replace the whole index (periodic reload from a shared store).
    pub fn replace_all(&self, recs: Vec<KeyRecord>) {
        let keep: std::collections::HashSet<String> =
            recs.iter().map(|r| r.secret_hash.clone()).collect();
        for r in recs {
            self.by_hash
                .insert(r.secret_hash.clone(), std::sync::Arc::new(r));
        }
        self.by_hash.retain(|h, _| keep.contains(h));
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
