fn main() {
    tune_malloc();
    std::process::exit(chuzhan_gate::cli::main())
}

/// Two settings of glibc's allocator, for a gate that must stay under 64 MB
/// resident with 100,000 keys (issue #7; bench/load.py --only memory):
///
/// - At most two arenas. glibc gives every thread that allocates under
///   contention an arena of its own, up to 8 per core, and memory freed in an
///   arena stays with it: under load each runtime worker's arena kept the
///   high-water mark of the requests it had served, about 9 MB in all.
/// - A fixed mmap threshold (128 KiB, glibc's starting value). Left dynamic,
///   glibc raises it to the size of each large block freed (up to 32 MiB), so
///   after start-up's large tables are freed, later large blocks come from the
///   heap and leave holes there: 3-4 MB more when idle.
///
/// Neither cost measurable throughput on the 2-core benchmark machine (draws/s
/// within the run-to-run spread). `GLIBC_TUNABLES` in the environment wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; it is called before any
    // thread is started, and a refusal (return 0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
