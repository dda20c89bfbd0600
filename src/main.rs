/// The gate's allocator: jemalloc (see Cargo.toml for why, docs/operations.md
/// for the settings).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation (`_RJEM_MALLOC_CONF` in the
/// environment is read after them and wins):
/// - `background_thread`, `dirty_decay_ms:1000`, `muzzy_decay_ms:0`: a thread of
///   jemalloc's own gives freed pages back to the system about a second after
///   they are freed, busy or quiet, instead of keeping them for reuse;
/// - `narenas:2`: one arena per core (the default is four per core; more arenas
///   hold more memory and did not serve more draws on 2 cores);
/// - `oversize_threshold:262144`: blocks above 256 KiB (the key cache's and the
///   ledger's tables, which start-up grows by doubling) come from an arena that
///   gives them back as soon as they are freed, so start-up's peak stays low.
///
/// Measured with 100,000 keys (bench/load.py --only memory): 41.4 MiB idle,
/// 56.8 MiB after 5 s of draws, 58.3 MiB at the peak.
#[cfg(not(target_env = "msvc"))]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; CONF.len()] = &CONF;
const CONF: [u8; 96] =
    *b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:2,oversize_threshold:262144\0";
// jemalloc reads a C string.
const _: () = assert!(CONF[CONF.len() - 1] == 0);

fn main() {
    tune_malloc();
    std::process::exit(chuzhan_gate::cli::main())
}

/// Two settings of glibc's allocator, for a gate that must stay under 64 MB
/// resident with 100,000 keys (issue #7; bench/load.py --only memory). Since
/// the gate moved to jemalloc only SQLite allocates here, but the reasons hold
/// for it too:
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
