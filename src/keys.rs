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

/// What the request path needs of a client key: who it is, whether it may be
/// used, and its limits. The rest of its record (secret prefix, note, times)
/// stays in the ledger's store and is read from there when an operator asks.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveKey {
    /// Public id.
    pub id: KeyId,
    name: Text,
    /// What the client pays per upstream point, in thousandths (1000 = 1.0).
    pub rate_milli: u64,
    /// Tasks in flight at most; `None` = no limit.
    pub concurrency: Option<u32>,
    /// Submits per second; `None` = no limit.
    pub rps: Option<u32>,
    /// Token-bucket burst for `rps`; `None` = same as `rps`.
    pub burst: Option<u32>,
    /// A disabled key is refused with 1001.
    pub disabled: bool,
    /// After this time the key is refused with 1001.
    pub expires_at: Option<DateTime<Utc>>,
    /// SHA-256 of the secret the request presented (the key's, when it matched).
    digest: [u8; 32],
}

impl ActiveKey {
    /// Hex SHA-256 of the secret this key was found by: what a shared store
    /// checks a reservation against (see `Ledger::reserve_as`).
    pub fn secret_hash(&self) -> String {
        hex::encode(self.digest)
    }

    /// Human name (shown to the client as `companyName`, written to the audit log).
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

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

impl From<&KeyRecord> for ActiveKey {
    fn from(r: &KeyRecord) -> ActiveKey {
        Entry::new(r, stored_digest(&r.secret_hash).unwrap_or_default(), 0, 0).active()
    }
}

/// A string kept inside its owner when it is short, as key ids (20 bytes) and
/// most names are: a heap allocation per string would cost as much again as
/// the string.
#[derive(Clone, PartialEq)]
enum Text {
    Inline { len: u8, bytes: [u8; Text::INLINE] },
    Heap(Box<str>),
}

impl Text {
    const INLINE: usize = 22;

    fn new(s: &str) -> Text {
        if s.len() <= Text::INLINE {
            let mut bytes = [0u8; Text::INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Text::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Text::Heap(s.into())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Always valid: the bytes were copied from a `str`.
            Text::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Text::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// One key in the cache: the digest it is found by and its `ActiveKey`, with
/// the id kept as `Text` (no allocation) until a request asks for it.
struct Entry {
    digest: [u8; 32],
    id: Text,
    name: Text,
    rate_milli: u64,
    concurrency: Option<u32>,
    rps: Option<u32>,
    burst: Option<u32>,
    expires_at: Option<DateTime<Utc>>,
    disabled: bool,
    /// The reload generation that last saw this key (see [`Reload`]).
    seen: u32,
    /// The store's version of this record (see [`KeyCache::put`]).
    version: u64,
}

impl Entry {
    fn new(rec: &KeyRecord, digest: [u8; 32], seen: u32, version: u64) -> Entry {
        Entry {
            digest,
            id: Text::new(rec.id.as_str()),
            name: Text::new(&rec.name),
            rate_milli: rec.rate_milli,
            concurrency: rec.concurrency,
            rps: rec.rps,
            burst: rec.burst,
            expires_at: rec.expires_at,
            disabled: rec.disabled,
            seen,
            version,
        }
    }

    fn active(&self) -> ActiveKey {
        ActiveKey {
            id: KeyId(self.id.as_str().to_owned()),
            name: self.name.clone(),
            rate_milli: self.rate_milli,
            concurrency: self.concurrency,
            rps: self.rps,
            burst: self.burst,
            disabled: self.disabled,
            expires_at: self.expires_at,
            digest: self.digest,
        }
    }
}

/// The hot in-memory index of keys by secret hash, in front of the ledger's store.
///
/// Every key is held, so authentication never waits for the store. To keep
/// 100,000 keys in a few megabytes, entries are stored by value in one vector
/// (no allocation per key; about 140 bytes each) and found through two tables
/// of positions in it, one by digest and one by id (5 bytes a slot each). A
/// lookup copies the entry out into an `Arc<ActiveKey>` for the request.
///
/// One `std::sync::RwLock`: every request takes it to read for the time of one
/// table probe, only admin actions and reloads write, and it is never held
/// across an `.await`.
#[derive(Default)]
pub struct KeyCache {
    index: std::sync::RwLock<Index>,
}

#[derive(Default)]
struct Index {
    entries: Vec<Entry>,
    by_digest: hashbrown::HashTable<u32>,
    by_id: hashbrown::HashTable<u32>,
    ids: std::hash::RandomState,
    generation: u32,
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

/// A SHA-256 digest is already uniformly distributed (and a client cannot
/// choose it), so its first eight bytes are the table hash.
fn digest_hash(d: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_le_bytes(first)
}

/// Points a table's slot for position `from` (found under `hash`) at `to`, or
/// drops it.
fn move_slot(table: &mut hashbrown::HashTable<u32>, hash: u64, from: usize, to: Option<usize>) {
    if let Ok(slot) = table.find_entry(hash, |&i| i as usize == from) {
        match to {
            Some(to) => *slot.into_mut() = to as u32,
            None => {
                slot.remove();
            }
        }
    }
}

impl Index {
    fn id_hash(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.ids.hash_one(id)
    }

    fn position_of_digest(&self, d: &[u8; 32]) -> Option<usize> {
        use subtle::ConstantTimeEq;
        let entries = &self.entries;
        self.by_digest
            .find(digest_hash(d), |&i| {
                bool::from(entries[i as usize].digest.ct_eq(d))
            })
            .map(|&i| i as usize)
    }

    fn position_of_id(&self, id: &str) -> Option<usize> {
        let entries = &self.entries;
        self.by_id
            .find(self.id_hash(id), |&i| entries[i as usize].id.as_str() == id)
            .map(|&i| i as usize)
    }

    /// Points the digest table's slot for position `from` at `to` (or drops it).
    fn move_digest_slot(&mut self, digest: &[u8; 32], from: usize, to: Option<usize>) {
        move_slot(&mut self.by_digest, digest_hash(digest), from, to);
    }

    fn move_id_slot(&mut self, id_hash: u64, from: usize, to: Option<usize>) {
        move_slot(&mut self.by_id, id_hash, from, to);
    }

    fn insert_digest_slot(&mut self, digest: &[u8; 32], at: usize) {
        let entries = &self.entries;
        self.by_digest
            .insert_unique(digest_hash(digest), at as u32, |&i| {
                digest_hash(&entries[i as usize].digest)
            });
    }

    fn insert_id_slot(&mut self, id_hash: u64, at: usize) {
        let (entries, ids) = (&self.entries, &self.ids);
        self.by_id.insert_unique(id_hash, at as u32, |&i| {
            use std::hash::BuildHasher;
            ids.hash_one(entries[i as usize].id.as_str())
        });
    }

    /// Removes the entry at `at`; the last entry moves into its place.
    fn remove(&mut self, at: usize) {
        let gone_digest = self.entries[at].digest;
        let gone_id = self.id_hash(self.entries[at].id.as_str());
        self.move_digest_slot(&gone_digest, at, None);
        self.move_id_slot(gone_id, at, None);
        let last = self.entries.len() - 1;
        if at != last {
            let moved_digest = self.entries[last].digest;
            let moved_id = self.id_hash(self.entries[last].id.as_str());
            self.move_digest_slot(&moved_digest, last, Some(at));
            self.move_id_slot(moved_id, last, Some(at));
        }
        self.entries.swap_remove(at);
    }

    /// Puts `rec` read at `version`, unless a later version of it is held (which
    /// only counts as seen by the running reload).
    fn put(&mut self, rec: &KeyRecord, version: u64) {
        let Some(d) = stored_digest(&rec.secret_hash) else {
            tracing::error!(key = %rec.id, "key record with a malformed hash ignored");
            return;
        };
        if let Some(at) = self.position_of_id(rec.id.as_str()) {
            if self.entries[at].version > version {
                self.entries[at].seen = self.generation;
                return;
            }
        }
        // A digest held by another id (the store refuses that; a stale copy
        // could still say so) now belongs to this key only, unless that
        // other key's copy is the later one.
        if let Some(other) = self.position_of_digest(&d) {
            if self.entries[other].id.as_str() != rec.id.as_str() {
                if self.entries[other].version > version {
                    return;
                }
                self.remove(other);
            }
        }
        let entry = Entry::new(rec, d, self.generation, version);
        // Looked up after any removal: `remove` moves the last entry.
        match self.position_of_id(rec.id.as_str()) {
            Some(at) => {
                let old = self.entries[at].digest;
                if old != d {
                    // A rotation: the old secret stops matching at once.
                    self.move_digest_slot(&old, at, None);
                    self.entries[at] = entry;
                    self.insert_digest_slot(&d, at);
                } else {
                    self.entries[at] = entry;
                }
            }
            None => {
                let at = self.entries.len();
                let id_hash = self.id_hash(rec.id.as_str());
                self.entries.push(entry);
                self.insert_digest_slot(&d, at);
                self.insert_id_slot(id_hash, at);
            }
        }
    }
}

impl KeyCache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // A panic while writing leaves the index consistent between calls
        // (each call is a few table operations), so a poisoned lock is used.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Find a key by its presented secret. The table is keyed by the secret's
    /// hash; the comparison of hashes is constant-time so that timing says
    /// nothing about how much of a guess was right.
    pub fn lookup(&self, secret: &str) -> Option<std::sync::Arc<ActiveKey>> {
        let h = digest(secret);
        let index = self.read();
        let at = index.position_of_digest(&h)?;
        Some(std::sync::Arc::new(index.entries[at].active()))
    }

    /// Put (or replace) a key read from the store at `version`; a rotated key's
    /// old hash stops matching. Reads of a shared store race (a miss lookup, the
    /// poll, the minute's reload, an admin action's own write), so a copy older
    /// than the one held is ignored: an earlier read must not undo a disable or
    /// rotation that a later one brought. Versions are the store's change
    /// sequence; the embedded store numbers its own writes.
    pub fn put(&self, rec: &KeyRecord, version: u64) {
        self.write().put(rec, version);
    }

    /// Put changed keys, each with its version.
    pub fn put_all(&self, recs: &[(KeyRecord, u64)]) {
        let mut index = self.write();
        for (r, v) in recs {
            index.put(r, *v);
        }
    }

    /// Drops keys whose rows were deleted from the store, each at the version
    /// of its deletion; a copy written later than that (a key made again
    /// under the same id) stays.
    pub fn forget_all(&self, gone: &[(KeyId, u64)]) {
        let mut index = self.write();
        for (id, version) in gone {
            if let Some(at) = index.position_of_id(id.as_str()) {
                if index.entries[at].version < *version {
                    index.remove(at);
                }
            }
        }
    }

    /// Starts replacing the whole index (a periodic reload from a shared store,
    /// or the load at start): put every key of the store into the returned
    /// [`Reload`], then [`Reload::finish`] drops the keys it did not see. Keys
    /// are fed in pages, so that the store's keys are never all in memory as
    /// records at once.
    pub fn reload(&self) -> Reload<'_> {
        let mut index = self.write();
        index.generation = index.generation.wrapping_add(1);
        Reload {
            cache: self,
            generation: index.generation,
        }
    }

    /// Makes room for `total` keys in all, at once: loading 100,000 keys into
    /// a vector that doubles as it goes would copy it several times over and,
    /// at its last doubling, hold 9 MB twice (the gate's peak memory at start).
    pub fn reserve(&self, total: usize) {
        let mut index = self.write();
        let Index {
            entries,
            by_digest,
            by_id,
            ids,
            ..
        } = &mut *index;
        let more = total.saturating_sub(entries.len());
        entries.reserve_exact(more);
        by_digest.reserve(more, |&i| digest_hash(&entries[i as usize].digest));
        by_id.reserve(more, |&i| {
            use std::hash::BuildHasher;
            ids.hash_one(entries[i as usize].id.as_str())
        });
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reload of the whole key cache in progress; see [`KeyCache::reload`].
/// Requests are served from the cache throughout: keys already held stay
/// until `finish`, and keys put meanwhile (by an admin action) are kept.
pub struct Reload<'a> {
    cache: &'a KeyCache,
    generation: u32,
}

impl Reload<'_> {
    /// Puts one page of the store's keys.
    pub fn put_page(&mut self, recs: &[(KeyRecord, u64)]) {
        self.cache.put_all(recs);
    }

    /// Drops the keys that are no longer in the store; returns how many remain.
    pub fn finish(self) -> usize {
        let mut index = self.cache.write();
        let mut at = 0;
        while at < index.entries.len() {
            if index.entries[at].seen == self.generation {
                at += 1;
            } else {
                // The last entry moves into `at`; look at `at` again.
                index.remove(at);
            }
        }
        index.entries.len()
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

    fn reload(c: &KeyCache, recs: &[KeyRecord]) -> usize {
        let mut r = c.reload();
        let page: Vec<(KeyRecord, u64)> = recs.iter().map(|k| (k.clone(), 0)).collect();
        r.put_page(&page);
        r.finish()
    }

    #[test]
    fn a_rotated_key_stops_matching_its_old_secret() {
        let c = KeyCache::default();
        c.put(&rec("k1", "czg_old"), 0);
        assert!(c.lookup("czg_old").is_some());
        c.put(&rec("k1", "czg_new"), 0);
        assert!(c.lookup("czg_old").is_none());
        assert_eq!(c.lookup("czg_new").unwrap().id.as_str(), "k1");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn an_older_copy_of_a_key_never_replaces_a_newer_one() {
        let c = KeyCache::default();
        c.put(&rec("k1", "czg_a"), 5);
        assert_eq!(c.lookup("czg_a").unwrap().id.as_str(), "k1");
        // Disabled at version 7 (a poll): a copy read earlier does not undo it.
        let mut disabled = rec("k1", "czg_a");
        disabled.disabled = true;
        c.put(&disabled, 7);
        c.put(&rec("k1", "czg_a"), 6);
        assert!(c.lookup("czg_a").unwrap().disabled);
        // Nor does an earlier copy under another secret.
        c.put(&rec("k1", "czg_b"), 6);
        assert!(c.lookup("czg_b").is_none());
        assert!(c.lookup("czg_a").is_some());
        // A later rotation (a miss lookup of the new secret) replaces it at once.
        c.put(&rec("k1", "czg_b"), 8);
        assert!(c.lookup("czg_a").is_none());
        assert!(!c.lookup("czg_b").unwrap().disabled);
        assert_eq!(c.len(), 1);
        // An older copy in a reload counts as seen: the key stays.
        assert_eq!(reload(&c, &[rec("k1", "czg_a")]), 1);
        assert!(c.lookup("czg_b").is_some());
        assert!(c.lookup("czg_a").is_none());
    }

    #[test]
    fn a_deleted_key_is_dropped_unless_held_at_a_later_version() {
        let c = KeyCache::default();
        c.put(&rec("k1", "czg_a"), 5);
        c.put(&rec("k2", "czg_b"), 5);
        c.put(&rec("k3", "czg_c"), 5);
        // k1 made again (version 9) after a deletion at 7: it stays. k2,
        // deleted at 6, goes; the entry moved into its place still matches.
        c.put(&rec("k1", "czg_d"), 9);
        c.forget_all(&[
            (KeyId("k1".into()), 7),
            (KeyId("k2".into()), 6),
            (KeyId("nobody".into()), 8),
        ]);
        assert_eq!(c.lookup("czg_d").unwrap().id.as_str(), "k1");
        assert!(c.lookup("czg_b").is_none());
        assert_eq!(c.lookup("czg_c").unwrap().id.as_str(), "k3");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn reload_drops_keys_no_longer_in_the_store() {
        let c = KeyCache::default();
        c.put(&rec("k1", "czg_a"), 0);
        c.put(&rec("k2", "czg_b"), 0);
        assert_eq!(reload(&c, &[rec("k2", "czg_b")]), 1);
        assert!(c.lookup("czg_a").is_none());
        assert!(c.lookup("czg_b").is_some());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_key_put_during_a_reload_is_kept() {
        let c = KeyCache::default();
        c.put(&rec("k1", "czg_a"), 0);
        let mut r = c.reload();
        r.put_page(&[(rec("k1", "czg_a"), 0)]);
        c.put(&rec("k2", "czg_b"), 0);
        assert_eq!(r.finish(), 2);
        assert!(c.lookup("czg_b").is_some());
    }

    #[test]
    fn a_secret_moved_to_another_key_matches_only_that_key() {
        let c = KeyCache::default();
        c.put(&rec("k1", "czg_a"), 0);
        c.put(&rec("k2", "czg_a"), 0);
        assert_eq!(c.lookup("czg_a").unwrap().id.as_str(), "k2");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn many_keys_survive_removals_in_any_order() {
        let c = KeyCache::default();
        let all: Vec<KeyRecord> = (0..500)
            .map(|i| rec(&format!("key_{i:016x}"), &format!("czg_{i}")))
            .collect();
        assert_eq!(reload(&c, &all), 500);
        // Keep every third key, rotate every fifth of those.
        let mut kept: Vec<KeyRecord> = all.iter().step_by(3).cloned().collect();
        for (n, r) in kept.iter_mut().enumerate().filter(|(n, _)| n % 5 == 0) {
            *r = rec(r.id.as_str(), &format!("czg_rotated_{n}"));
        }
        assert_eq!(reload(&c, &kept), kept.len());
        for (i, r) in all.iter().enumerate() {
            let found = c.lookup(&format!("czg_{i}")).map(|k| k.id.clone());
            let expect = (i % 3 == 0 && (i / 3) % 5 != 0).then(|| r.id.clone());
            assert_eq!(found, expect, "key {i}");
        }
        for (n, r) in kept.iter().enumerate().filter(|(n, _)| n % 5 == 0) {
            assert_eq!(
                c.lookup(&format!("czg_rotated_{n}")).map(|k| k.id.clone()),
                Some(r.id.clone())
            );
        }
    }

    #[test]
    fn the_active_key_carries_what_requests_need() {
        let c = KeyCache::default();
        let mut r = rec("key_0123456789abcdef", "czg_x");
        r.name = "a name longer than the twenty-two bytes kept inline".into();
        r.rps = Some(5);
        r.burst = Some(9);
        r.concurrency = Some(2);
        r.rate_milli = 1250;
        r.expires_at = Some(Utc::now() + chrono::Duration::hours(1));
        c.put(&r, 0);
        assert_eq!(*c.lookup("czg_x").unwrap(), ActiveKey::from(&r));
        assert_eq!(c.lookup("czg_x").unwrap().name(), r.name);
    }

    #[test]
    fn room_made_up_front_is_not_outgrown_by_that_many_keys() {
        let c = KeyCache::default();
        c.reserve(1000);
        let capacity = c.read().entries.capacity();
        assert!(capacity >= 1000);
        let all: Vec<(KeyRecord, u64)> = (0..1000)
            .map(|i| (rec(&format!("key_{i:016x}"), &format!("czg_{i}")), 1))
            .collect();
        c.put_all(&all);
        assert_eq!(c.len(), 1000);
        // Not reallocated (a doubling would copy every entry, and briefly
        // hold them twice).
        assert_eq!(c.read().entries.capacity(), capacity);
        assert!(c.lookup("czg_999").is_some());
    }

    #[test]
    fn an_entry_stays_small() {
        // 100,000 keys: about 14 MB of entries, plus two tables of positions.
        assert!(std::mem::size_of::<Entry>() <= 144);
        assert_eq!(std::mem::size_of::<Text>(), 24);
    }

    #[test]
    fn charge_rounds_half_up_in_thousandths() {
        let mut r = ActiveKey::from(&rec("k", "s"));
        r.rate_milli = 1500;
        assert_eq!(r.charge_for(12), 18);
        r.rate_milli = 1250;
        assert_eq!(r.charge_for(2), 3); // 2.5 → 3
        r.rate_milli = 1200;
        assert_eq!(r.charge_for(12), 14); // 14.4 → 14
    }
}
