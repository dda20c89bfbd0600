//! Giving freed heap memory back to the system.
//!
//! The gate's own allocations live in jemalloc (`src/main.rs`), whose
//! background thread gives freed pages back about a second after they are
//! freed. SQLite, being C, allocates from glibc's malloc, which keeps freed
//! memory for later and only gives back what sits at the top of a heap.
//! `malloc_trim(0)` returns every free page of every glibc arena, but it took
//! 3–7 ms under load (when glibc held all of the gate's memory) and holds the
//! arenas' locks meanwhile, which showed in the p99.9. So housekeeping calls it
//! only once a burst is over ([`QuietTrim`]).

/// Requests in one housekeeping tick (1 s) at or below which the gate counts as
/// quiet.
const QUIET_PER_TICK: u64 = 10;
/// Requests since the last release that make another one worth its cost.
const WORTH_IT: u64 = 1_000;

/// Decides, once per housekeeping tick, whether to release free memory now:
/// when the gate has just gone quiet after serving at least `WORTH_IT` requests.
#[derive(Debug, Default)]
pub struct QuietTrim {
    last_total: u64,
    since_release: u64,
}

impl QuietTrim {
    /// `total` is the count of requests served so far (it only grows).
    pub fn tick(&mut self, total: u64) -> bool {
        let served = total.saturating_sub(self.last_total);
        self.last_total = total;
        self.since_release = self.since_release.saturating_add(served);
        if served <= QUIET_PER_TICK && self.since_release >= WORTH_IT {
            self.since_release = 0;
            return true;
        }
        false
    }
}

/// Return free heap pages to the system. Returns whether any memory was
/// released (always `false` where the allocator offers no such call).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists under its
    // locks; it takes no pointers from us and may be called from any thread.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Return free heap pages to the system: nothing to call on this target.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_once_when_a_burst_ends_and_never_during_load() {
        let mut t = QuietTrim::default();
        let mut total = 0;
        // Under load: never.
        for _ in 0..30 {
            total += 5_000;
            assert!(!t.tick(total));
        }
        // The first quiet tick after the burst: once.
        total += 3;
        assert!(t.tick(total));
        // Still quiet, nothing new served: not again.
        for _ in 0..10 {
            total += 1;
            assert!(!t.tick(total));
        }
        // A trickle adds up to a burst's worth only slowly, then releases once.
        let mut released = 0;
        for _ in 0..200 {
            total += 10;
            released += usize::from(t.tick(total));
        }
        assert_eq!(
            released, 2,
            "1,000 requests at 10 a tick release every 100 ticks"
        );
    }
}
