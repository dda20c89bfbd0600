fn main() {
    cap_malloc_arenas();
    std::process::exit(chuzhan_gate::cli::main())
}

/// glibc gives every thread that allocates under contention an arena of its
/// own, up to 8 per core, and memory freed in an arena stays with it. Under
/// load each runtime worker's arena kept the high-water mark of the requests it
/// had served: about 9 MB of a gate that must stay under 64 MB with 100,000
/// keys (issue #7). Two arenas cost no measurable throughput on the 2-core
/// benchmark machine (bench/load.py's memory step: 9,500-9,700 draws/s against
/// 9,900-10,200 with the default, within the run-to-run spread).
/// `GLIBC_TUNABLES=glibc.malloc.arena_max=N` in the environment still wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    if std::env::var_os("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("arena_max"))
    {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter; it is called before any
    // thread is started, and a refusal (return 0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}
