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

/// Where jemalloc learns whether the kernel overcommits memory.
const OVERCOMMIT_FILE: &str = "/proc/sys/vm/overcommit_memory";

/// A warning for the log when the allocator cannot read [`OVERCOMMIT_FILE`].
///
/// jemalloc reads the file once, before `main`. Where it cannot (a systemd unit
/// with `ProcSubset=pid`, a sandbox hiding `/proc/sys`), it assumes that the
/// kernel does not overcommit, and then gives freed memory back by mapping it
/// `PROT_NONE` instead of `madvise`: every such range splits a mapping in two.
/// Measured under draw bursts: 75 mappings with the file readable, 2,000 and
/// growing without (jemalloc issue #1328); at `vm.max_map_count` (65,530 by
/// default) allocations fail and the gate aborts. `deploy/chuzhan-gate.service`
/// leaves `/proc/sys` visible for this reason; the warning is for units
/// written elsewhere.
pub fn overcommit_warning() -> Option<String> {
    overcommit_warning_for(std::path::Path::new(OVERCOMMIT_FILE))
}

fn overcommit_warning_for(path: &std::path::Path) -> Option<String> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().parse::<u8>().is_ok() => None,
        Ok(s) => Some(format!(
            "{} reads {:?}, not a number: the allocator will split its memory mappings \
             as it frees memory and may reach vm.max_map_count under long load",
            path.display(),
            s.trim()
        )),
        Err(e) => Some(format!(
            "cannot read {} ({e}; a systemd ProcSubset=pid?): the allocator will split \
             its memory mappings as it frees memory and may reach vm.max_map_count \
             under long load; leave /proc/sys readable to the gate",
            path.display()
        )),
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
    fn an_unreadable_overcommit_setting_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("overcommit_memory");
        std::fs::write(&f, "0\n").unwrap();
        assert_eq!(overcommit_warning_for(&f), None);
        std::fs::write(&f, "").unwrap();
        assert!(overcommit_warning_for(&f).unwrap().contains("not a number"));
        let gone = dir.path().join("absent");
        let w = overcommit_warning_for(&gone).unwrap();
        assert!(w.contains("cannot read") && w.contains("ProcSubset"), "{w}");
        // On this machine the real file is readable.
        assert_eq!(overcommit_warning(), None);
    }

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
