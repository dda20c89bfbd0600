//! Per-key submit limits, checked before anything is reserved: a token bucket for
//! submits per second, and a count of tasks in flight (submitted, not yet ended).
//!
//! State is per gate process, in `DashMap`s keyed by key id: the shard lock is held
//! only for the few arithmetic steps of one check, never across an `.await`. With a
//! shared store (replicas), a key's tasks in flight and its submit rate are counted
//! and checked in the store instead (the reservation), and the global count is set
//! every second to the fleet's (`Limits::set_total`).

use crate::ledger::SubmitRate;
use crate::points::KeyId;
use dashmap::DashMap;
use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(cap: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: cap,
            at: now,
        }
    }

    /// Refills for the time since the last take, then takes one token if there is one.
    fn take(&mut self, now: Instant, rate: f64, cap: f64) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Store lookups of secrets the key cache does not hold, per second, per gate
/// (with a shared store only; see [`Limits::store_lookup`]).
pub const STORE_LOOKUPS_PER_SEC: u32 = 50;

/// Why a submit was refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many submits per second.
    #[error("rate limit reached: at most {rps} submits per second for this key")]
    Rate {
        /// The key's limit.
        rps: u32,
    },
    /// Too many tasks in flight.
    #[error("concurrent-task limit reached: {limit} tasks of this key are still running")]
    Concurrency {
        /// The key's limit.
        limit: u32,
    },
    /// The operator-wide cap on tasks in flight.
    #[error("the gate's concurrent-task limit is reached; try again shortly")]
    Global,
}

/// The limiters of one gate.
pub struct Limits {
    /// Whether this gate counts each key's tasks in flight (the embedded
    /// ledger). With a shared store the reservation counts them for the
    /// fleet, and only the global count is kept here.
    per_key: bool,
    buckets: DashMap<KeyId, Bucket>,
    in_flight: DashMap<KeyId, u32>,
    total: std::sync::atomic::AtomicU32,
    lookups: std::sync::Mutex<Bucket>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(true)
    }
}

impl Limits {
    /// Limiters that count each key's tasks in flight here (`per_key`), or
    /// only the global count (a shared store counts the keys').
    pub fn new(per_key: bool) -> Limits {
        Limits {
            per_key,
            buckets: DashMap::new(),
            in_flight: DashMap::new(),
            total: Default::default(),
            lookups: std::sync::Mutex::new(Bucket::full(
                f64::from(STORE_LOOKUPS_PER_SEC),
                Instant::now(),
            )),
        }
    }
}

/// A held concurrency slot; give it back with [`Limits::release`] when the task ends,
/// or drop it with [`Slot::cancel`] when the submit did not create a task.
#[derive(Debug)]
#[must_use]
pub struct Slot {
    key: KeyId,
    counted: bool,
}

impl Limits {
    /// Take one token from the key's bucket, or refuse.
    pub fn check_rate(
        &self,
        key: &KeyId,
        rps: Option<u32>,
        burst: Option<u32>,
    ) -> Result<(), LimitError> {
        let Some(SubmitRate {
            per_sec: rps,
            burst,
        }) = SubmitRate::of(rps, burst)
        else {
            return Ok(());
        };
        let cap = f64::from(burst);
        let now = Instant::now();
        let mut b = self
            .buckets
            .entry(key.clone())
            .or_insert(Bucket::full(cap, now));
        if b.take(now, f64::from(rps), cap) {
            Ok(())
        } else {
            Err(LimitError::Rate { rps })
        }
    }

    /// Whether a presented secret the key cache does not hold may be looked up
    /// in the shared store (a key made or rotated on another replica in the
    /// last second). At most [`STORE_LOOKUPS_PER_SEC`] a second, so that
    /// clients presenting made-up secrets cannot load the store; beyond that
    /// the secret is refused as unknown, as it would be without the lookup.
    pub fn store_lookup(&self) -> bool {
        let cap = f64::from(STORE_LOOKUPS_PER_SEC);
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now(), cap, cap)
    }

    /// Count one more task in flight for the key, within its limit and the global cap.
    pub fn acquire(
        &self,
        key: &KeyId,
        limit: Option<u32>,
        global: Option<u32>,
    ) -> Result<Slot, LimitError> {
        use std::sync::atomic::Ordering;
        if let Some(g) = global {
            let prev = self.total.fetch_add(1, Ordering::SeqCst);
            if prev >= g {
                self.total.fetch_sub(1, Ordering::SeqCst);
                return Err(LimitError::Global);
            }
        } else {
            self.total.fetch_add(1, Ordering::SeqCst);
        }
        if !self.per_key {
            return Ok(Slot {
                key: key.clone(),
                counted: true,
            });
        }
        let mut n = self.in_flight.entry(key.clone()).or_insert(0);
        if let Some(l) = limit {
            if *n >= l {
                drop(n);
                self.total.fetch_sub(1, Ordering::SeqCst);
                return Err(LimitError::Concurrency { limit: l });
            }
        }
        *n += 1;
        Ok(Slot {
            key: key.clone(),
            counted: true,
        })
    }

    /// The submit ended without creating a task: give the slot back.
    pub fn cancel(&self, mut slot: Slot) {
        if slot.counted {
            self.release(&slot.key);
            slot.counted = false;
        }
    }

    /// A task of `key` ended (or the slot was not used).
    pub fn release(&self, key: &KeyId) {
        use std::sync::atomic::Ordering;
        let counted = !self.per_key
            || self.in_flight.get_mut(key).is_some_and(|mut n| {
                let had = *n > 0;
                *n = n.saturating_sub(1);
                had
            });
        if counted {
            let _ = self
                .total
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1));
        }
    }

    /// Set a key's count of tasks in flight (at start, from the task registry).
    pub fn restore(&self, key: &KeyId, n: u32) {
        use std::sync::atomic::Ordering;
        if !self.per_key {
            self.total.fetch_add(n, Ordering::SeqCst);
            return;
        }
        let prev = self.in_flight.insert(key.clone(), n).unwrap_or(0);
        self.total.fetch_add(n, Ordering::SeqCst);
        self.total.fetch_sub(
            prev.min(self.total.load(Ordering::SeqCst)),
            Ordering::SeqCst,
        );
    }

    /// Set the count the global cap is checked against (with a shared store:
    /// the tasks in flight of all replicas, read from the store every second).
    pub fn set_total(&self, n: u32) {
        self.total.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The count the global cap is checked against.
    pub fn total(&self) -> u32 {
        self.total.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tasks in flight for a key.
    pub fn in_flight(&self, key: &KeyId) -> u32 {
        self.in_flight.get(key).map(|n| *n).unwrap_or(0)
    }

    /// The slot became a task: keep it counted until [`Limits::release`].
    pub fn keep(&self, mut slot: Slot) {
        slot.counted = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> KeyId {
        KeyId(s.into())
    }

    #[test]
    fn no_limits_means_no_refusals() {
        let l = Limits::default();
        for _ in 0..1000 {
            l.check_rate(&k("a"), None, None).unwrap();
            let s = l.acquire(&k("a"), None, None).unwrap();
            l.keep(s);
        }
        assert_eq!(l.in_flight(&k("a")), 1000);
    }

    #[test]
    fn rate_limit_allows_the_burst_then_refuses() {
        let l = Limits::default();
        for _ in 0..3 {
            l.check_rate(&k("a"), Some(1), Some(3)).unwrap();
        }
        assert_eq!(
            l.check_rate(&k("a"), Some(1), Some(3)),
            Err(LimitError::Rate { rps: 1 })
        );
        // Another key has its own bucket.
        l.check_rate(&k("b"), Some(1), Some(3)).unwrap();
    }

    #[test]
    fn store_lookups_are_capped_per_second() {
        let l = Limits::default();
        let allowed = (0..STORE_LOOKUPS_PER_SEC * 3)
            .filter(|_| l.store_lookup())
            .count();
        // A burst of one second's worth, plus what refills while counting
        // (nothing, unless the thread is held off the CPU for a while).
        let cap = STORE_LOOKUPS_PER_SEC as usize;
        assert!((cap..cap + cap / 2).contains(&allowed), "{allowed}");
    }

    #[test]
    fn concurrency_limit_counts_tasks_until_released() {
        let l = Limits::default();
        let a = l.acquire(&k("a"), Some(2), None).unwrap();
        l.keep(a);
        let b = l.acquire(&k("a"), Some(2), None).unwrap();
        assert!(matches!(
            l.acquire(&k("a"), Some(2), None),
            Err(LimitError::Concurrency { limit: 2 })
        ));
        l.cancel(b);
        let c = l.acquire(&k("a"), Some(2), None).unwrap();
        l.keep(c);
        l.release(&k("a"));
        assert_eq!(l.in_flight(&k("a")), 1);
    }

    #[test]
    fn with_a_shared_store_only_the_global_count_is_kept() {
        let l = Limits::new(false);
        let a = l.acquire(&k("a"), Some(1), Some(2)).unwrap();
        l.keep(a);
        // The key's limit is the store's to check; the global cap holds here.
        let b = l.acquire(&k("a"), Some(1), Some(2)).unwrap();
        assert_eq!(
            l.acquire(&k("b"), None, Some(2)).unwrap_err(),
            LimitError::Global
        );
        assert_eq!((l.in_flight(&k("a")), l.total()), (0, 2));
        l.cancel(b);
        l.release(&k("a"));
        assert_eq!(l.total(), 0);
        l.release(&k("a"));
        assert_eq!(l.total(), 0, "a release too many went below zero");
        l.restore(&k("c"), 3);
        assert_eq!((l.in_flight(&k("c")), l.total()), (0, 3));
    }

    #[test]
    fn global_cap_holds_across_keys() {
        let l = Limits::default();
        let a = l.acquire(&k("a"), None, Some(2)).unwrap();
        let b = l.acquire(&k("b"), None, Some(2)).unwrap();
        assert_eq!(
            l.acquire(&k("c"), None, Some(2)).unwrap_err(),
            LimitError::Global
        );
        l.cancel(a);
        l.keep(b);
        l.acquire(&k("c"), None, Some(2))
            .map(|s| l.keep(s))
            .unwrap();
    }
}
