//! How the gate's own background threads are scheduled.
//!
//! The ledger writer, the WAL flusher and the audit writer are woken by the
//! runtime workers (a job on their queue) and work in batches: the more that is
//! queued when they run, the less each item costs. Under Linux's default policy
//! a woken thread may preempt the one that woke it, so on a single core (a
//! 1-vCPU machine, a container pinned to one CPU) a job handed over often stopped
//! the worker at once: the writer ran for one or two jobs, the worker came back,
//! and so on, some 1.8 context switches per draw and a fifth of the gate's CPU
//! in the scheduler (measured, `docs/benchmarks.md`, "One core").
//!
//! On one CPU, [`batch_thread_started`] puts such a thread under
//! `SCHED_BATCH`: the same share of the CPU as any other thread (it is not a
//! priority), but its wake-ups do not preempt the running thread. The worker
//! then goes on to the next ready request, or parks, and the writer finds a
//! fuller batch: ×1.27 the draws per second at ×0.78 the CPU per draw, and a
//! lower p50 and p99 at a fixed rate (0.32 context switches per draw). With two cores shared with the load
//! generator the same change measured ×0.87–0.93 (a writer woken while both
//! cores are busy waits for a time slice to end, and each draw waits for two
//! of its commits), so with more than one CPU the threads keep the default
//! policy. "One CPU" is what `available_parallelism` reports: the CPUs the
//! process may run on (affinity, a cpuset), and a cgroup's CPU quota.
//!
//! A process may always lower its own threads' policy, so this needs no
//! privilege; where it fails anyway (a seccomp filter, another OS) the thread
//! runs under the default policy, as before, and the log says so.

/// Whether the gate has one CPU to run on, where its batch threads run under
/// `SCHED_BATCH`.
pub fn one_cpu() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() == 1)
}

/// Called first by each batch thread: on one CPU ([`one_cpu`]), puts the
/// calling thread under `SCHED_BATCH` (see the module doc); threads it starts
/// inherit the policy. `what` names the thread for the log.
pub fn batch_thread_started(what: &str) {
    if one_cpu() {
        batch_this_thread(what);
    }
}

/// Puts the calling thread under `SCHED_BATCH`, whatever the CPUs.
fn batch_this_thread(what: &str) {
    if let Err(e) = set_batch() {
        tracing::warn!(thread = what, error = %e, "cannot schedule the thread as SCHED_BATCH");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 is, on Linux,
    // the calling thread (not the whole process).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_batch() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SCHED_BATCH is Linux's",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy as the kernel reports it in its
    /// `stat` file (field 41: 0 normal, 3 batch).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn my_policy() -> u32 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The name, in brackets, may hold spaces: count the fields after it,
        // which start at field 3.
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        rest.split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_thread_put_under_sched_batch_reports_it_and_a_new_thread_does_not() {
        let plain = std::thread::spawn(my_policy).join().unwrap();
        assert_eq!(
            plain,
            libc::SCHED_OTHER as u32,
            "a new thread starts under SCHED_OTHER"
        );
        let batch = std::thread::spawn(|| {
            batch_this_thread("test");
            my_policy()
        })
        .join()
        .unwrap();
        assert_eq!(batch, libc::SCHED_BATCH as u32);
    }
}
