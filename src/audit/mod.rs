//! The audit log: an append-only, hash-chained JSON-lines trail of every decision,
//! ledger transition and admin action, that operators can `tail -f | jq` and
//! `verify`.
//!
//! # On disk
//!
//! A directory of files named `audit-YYYYMMDD-NNNNNN.jsonl` plus a small
//! `head.json`. `YYYYMMDD` is the UTC day of the file's first record; `NNNNNN` is
//! the file number, counting from 1 across the whole log and never reused, so the
//! files of a chain are exactly the numbers 1, 2, 3, ... The active file is the one
//! with the highest number: nothing is ever renamed. Readers order files by their
//! number (which equals name order while the clock runs forward and below a
//! million files).
//!
//! Each line is one compact JSON object, written whole:
//!
//! ```text
//! {"ts":"2026-11-23T20:40:00.123Z","seq":7,"prev":"<64 hex>",<record fields>,"hash":"<64 hex>"}
//! ```
//!
//! - `ts` is the writer's clock when it wrote the record, RFC 3339 with
//!   milliseconds, UTC.
//! - `seq` counts records from 1, across files, without gaps.
//! - `prev` is the `hash` of the previous record (64 zeros for the first record of
//!   the log); the first record of a new file links to the last one of the file
//!   before it.
//! - the record's own fields follow in the order `serde_json::Map` iterates them
//!   (sorted by key, as this crate does not enable serde_json's `preserve_order`);
//!   a record built with [`Fields`] has its fields in the same order.
//! - `hash` is always the last field. It is the hex SHA-256 of the **canonical
//!   bytes**: the line exactly as written, up to but excluding `,"hash":"`, followed
//!   by a single `}`. `verify` recomputes it from the written bytes, so no
//!   re-serialisation (and no ambiguity about key order or number formatting) is
//!   involved.
//!
//! `head.json` (`{"seq":N,"hash":"..","file":".."}`) names a synced record: it is
//! rewritten after a synced batch, at most every 100 ms, as a new file synced
//! before it is renamed over the old one, and the directory synced after the
//! rename, so a power cut leaves the old head or the new one, never a torn one
//! or none. It lets `verify` notice a tail cut at a line
//! boundary. It is advisory: a head that cannot be written fails no flush and is
//! tried again 100 ms later.
//!
//! `current.jsonl` is a symlink to the active file (Unix), so
//! `tail -n0 -F audit/current.jsonl | jq .` follows the log across rotations
//! (plain `tail -f` on one file stops at its rotation). [`Follower`] does the same
//! for the admin API.
//!
//! One writer per directory: two gates sharing an audit directory would fork the
//! chain (nothing locks the directory).
//!
//! # What tamper evidence covers
//!
//! `verify` reports the first break in chain order and classifies it: a hash that
//! does not match the bytes (edited), a `seq` gap (deleted), a `seq` going back or
//! two records swapped (reordered; a swap across a file boundary shows as deleted),
//! a correct `seq` whose `prev` names another hash (broken link: a record replaced
//! together with its hash, or one inserted), a missing file number, a line that is
//! not a record, a partial last line or a chain shorter than `head.json`
//! (truncated).
//!
//! The chain is keyless, so it proves *consistency*, not authorship: editing,
//! deleting, inserting or reordering a record anywhere before the end breaks a hash
//! or a link, and `verify` reports the first such break. Removing whole files from
//! the middle or the start shows as a missing file number. A partial last line shows
//! as a truncation (on a live log, also a line caught while being written: run
//! `verify` again). Cutting the tail at a line boundary is only caught while
//! `head.json` still describes the longer chain; someone who can rewrite the files
//! can also rewrite `head.json` (or regenerate the whole chain). To catch that, copy
//! the last `seq` and `hash` that `verify` prints to somewhere the writer of the log
//! cannot change: any later chain must still contain that record, which
//! [`verify_from`] (`audit verify --anchor SEQ:HASH`) checks, also on the files left
//! after older ones were archived.
//!
//! # Writing
//!
//! [`Audit`] is a cheap handle that sends records through a bounded queue to one
//! writer thread (a thread, not a task, because `fdatasync` blocks). A full queue
//! makes [`Audit::record`] wait: records are never dropped. The writer gathers what
//! is queued into one batch, at most one batch every 2 ms, and appends it with
//! whole-line writes. It `fdatasync`s at most `sync_every_ms` after the previous sync
//! (10 ms by default): under load one sync covers many batches and leaves the disk
//! to the ledger, whose writes the requests wait for. A flush, a rotation and a
//! shutdown sync at once, and [`Audit::flush`] is answered after its sync. So a
//! crash of the gate loses at most the records still queued (about the last 2 ms;
//! the ledger holds the money either way), and a crash of the machine at most the
//! last `sync_every_ms` more. `sync_every_ms = 0` restores a sync per batch and no
//! pause between batches. `ts` is the time the writer encoded the record, so `ts`
//! follows `seq` as long as the clock does.
//!
//! When a write or sync fails (disk full, directory gone) the writer keeps the
//! batch and retries with backoff (50 ms doubling to 5 s), logging each failure; a
//! `flush` in the failing batch gets [`AuditError::Write`], later records wait in
//! the queue and then in `record()`: the gate slows down rather than loses records.
//! Only after a shutdown was asked does it give up (after three more failures),
//! logging what is lost. The writer keeps what it wrote since the last good sync
//! (at most about 1 MiB: past that it syncs mid-batch). After a failed `fdatasync`
//! it cuts the file back to the last good sync and writes those bytes again: Linux
//! reports a failed writeback only once and marks the pages clean, so syncing
//! again alone would succeed with the records never on the disk.
//!
//! Days are UTC days. A record goes to a new file when its UTC day differs from the
//! day of the active file (with `rotate_daily`) or when it would push the file past
//! `max_file_bytes` (a single record larger than that gets a file of its own).
//!
//! On restart the writer continues the chain from the last complete line of the
//! newest file. If that file ends in a partial line (a crash mid-write), the partial
//! bytes are left untouched, the chain continues in a new file and its first record
//! is `{"event":"recovered_partial_line","file":..,"bytes":..}`; `verify` accepts
//! a partial line exactly when such a record follows it. If `head.json` describes a
//! longer chain than the files hold (someone cut the tail while the gate was down)
//! the writer records `{"event":"head_mismatch",...}` before anything else, so that
//! the evidence is not lost when the head moves on.

mod fields;
mod read;
mod verify;
mod writer;

pub use fields::Fields;
pub use read::{has_ledger_record, query, tail, Filter, Follower};
pub use verify::{verify, verify_cmd, verify_from, Anchor, Break, BreakKind, VerifyReport};

use crate::clock::SharedClock;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Fields the writer sets on every record; a record may not carry them itself.
pub const RESERVED_FIELDS: [&str; 4] = ["ts", "seq", "prev", "hash"];

/// Fields that carry prompts or images: dropped unless `log_prompts` is on.
/// Names follow the upstream API (`upstream-api.md`); matched case-insensitively at
/// any depth.
pub const PROMPT_FIELDS: [&str; 14] = [
    "prompt",
    "negativeprompt",
    "negative_prompt",
    "img",
    "maskimg",
    "mask",
    "image",
    "images",
    "imageurl",
    "imgurl",
    "current_image",
    "init_image",
    "controlnet",
    "prompts",
];

/// Fields that carry secrets: always dropped, at any depth, case-insensitively.
/// `key` is here because the admin API names a freshly created key secret `key`;
/// records identify keys by `key_id`.
pub const SECRET_FIELDS: [&str; 11] = [
    "key",
    "secret",
    "key_secret",
    "token",
    "auth-token",
    "auth_token",
    "authorization",
    "api_key",
    "apikey",
    "password",
    "admin_token",
];

/// The `[audit]` section of the configuration.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory of the log; `None` means `<data_dir>/audit`, filled in by the config
    /// loader. [`Audit::open`] refuses `None` when enabled.
    pub dir: Option<PathBuf>,
    /// A file is rotated before it would grow past this many bytes (default 64 MiB).
    pub max_file_bytes: u64,
    /// Start a new file when the UTC day changes (default true).
    pub rotate_daily: bool,
    /// Records the queue holds before `record()` waits (default 8192).
    pub queue: usize,
    /// Keep prompt and image fields in records (default false: they are dropped).
    pub log_prompts: bool,
    /// Write the log at all (default true).
    pub enabled: bool,
    /// Longest time a written record may wait for its `fdatasync`, in ms
    /// (default 10): only a crash of the machine can lose this window. 0 syncs
    /// after every batch (and takes batches without pausing). A flush, a rotation
    /// and a shutdown always sync.
    pub sync_every_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: None,
            max_file_bytes: 64 * 1024 * 1024,
            rotate_daily: true,
            queue: 8192,
            log_prompts: false,
            enabled: true,
            sync_every_ms: 10,
        }
    }
}

/// Everything that can go wrong in the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing a file of the log failed.
    #[error("audit log I/O on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The configuration cannot work (no directory, zero queue).
    #[error("audit config: {0}")]
    Config(String),
    /// The writer thread has stopped (after shutdown, or it gave up on I/O errors).
    #[error("the audit writer has stopped")]
    Closed,
    /// The writer could not write or sync a batch; it keeps retrying.
    #[error("audit writer: {0}")]
    Write(String),
    /// A record carried a field that only the writer may set.
    #[error("audit record field {0:?} is set by the writer and cannot be recorded")]
    ReservedField(String),
    /// The newest complete line of the log cannot be read as a record, so the chain
    /// cannot be continued. Run `audit verify` and move the damaged file aside.
    #[error("audit log {path} line {line} cannot continue the chain: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        detail: String,
    },
}

impl AuditError {
    fn io(path: &Path, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What travels from the handles to the writer thread.
enum Msg {
    /// A record's own fields, scrubbed and serialized (see [`writer::encode_fields`]).
    Record(Vec<u8>),
    /// Answered once everything before it is written and synced.
    Flush(oneshot::Sender<Result<(), AuditError>>),
    /// Sent by [`AuditWriter`] to wake the thread so it notices the stop flag.
    Wake,
}

/// A cheap, cloneable handle for writing audit records.
#[derive(Clone)]
pub struct Audit {
    /// `None` for a handle that discards (audit disabled).
    tx: Option<mpsc::Sender<Msg>>,
    /// The log's directory (`None` when disabled).
    dir: Option<PathBuf>,
    log_prompts: bool,
    health: Arc<Health>,
}

/// How the writer's I/O is going, for `/readyz` and `/metrics`: while its last
/// attempt failed (disk full, directory gone), records wait in memory and the
/// gate slows down rather than loses them, and the operator should know.
#[derive(Debug, Default)]
pub struct Health {
    failing: AtomicBool,
    failures: std::sync::atomic::AtomicU64,
    last_error: std::sync::Mutex<String>,
}

impl Health {
    /// The last error, while the writer's last write or sync failed.
    pub fn failing(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_else(|e| e.into_inner().clone()),
        )
    }

    /// Failed writes and syncs since the start (each one is retried).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn failed(&self, e: &std::io::Error) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = e.to_string();
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Release);
    }

    fn succeeded(&self) {
        if self.failing.load(Ordering::Relaxed) {
            self.failing.store(false, Ordering::Release);
        }
    }
}

/// Owns the writer thread's lifetime. [`AuditWriter::shutdown`] stops accepting
/// records, writes and syncs everything already queued, and waits for the thread.
/// Dropping it does the same in the background without waiting: the thread drains
/// the queue, syncs and exits on its own (if the process exits first, what was
/// queued but not yet written is lost, so prefer `shutdown().await`).
pub struct AuditWriter {
    stop: Arc<AtomicBool>,
    wake: Option<mpsc::Sender<Msg>>,
    done: Option<oneshot::Receiver<()>>,
}

impl Audit {
    /// Open (or create) the log in `cfg.dir`, continue its chain, and start the
    /// writer thread. With `cfg.enabled == false` this returns a discarding handle
    /// and an inert writer guard.
    pub async fn open(
        cfg: &AuditConfig,
        clock: SharedClock,
    ) -> Result<(Audit, AuditWriter), AuditError> {
        if !cfg.enabled {
            return Ok((
                Audit::disabled(),
                AuditWriter {
                    stop: Arc::new(AtomicBool::new(true)),
                    wake: None,
                    done: None,
                },
            ));
        }
        let dir = cfg
            .dir
            .clone()
            .ok_or_else(|| AuditError::Config("audit.dir is not set".into()))?;
        if cfg.queue == 0 {
            return Err(AuditError::Config("audit.queue must be at least 1".into()));
        }
        let settings = writer::Settings {
            dir: dir.clone(),
            max_file_bytes: cfg.max_file_bytes.max(1),
            rotate_daily: cfg.rotate_daily,
            sync_every: std::time::Duration::from_millis(cfg.sync_every_ms),
        };
        // Recovery reads and may write files: keep it off the async workers.
        let state = tokio::task::spawn_blocking(move || writer::Writer::recover(settings, clock))
            .await
            .map_err(|e| AuditError::Write(format!("recovery task failed: {e}")))??;

        let health = Arc::new(Health::default());
        let state = state.with_health(Arc::clone(&health));
        let (tx, rx) = mpsc::channel(cfg.queue);
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = oneshot::channel();
        let thread_stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                crate::sched::batch_thread_started("audit-writer");
                state.run(rx, &thread_stop);
                // The guard may be gone already; nobody to tell then.
                let _ = done_tx.send(());
            })
            .map_err(|e| AuditError::Write(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Audit {
                tx: Some(tx.clone()),
                dir: Some(dir),
                log_prompts: cfg.log_prompts,
                health,
            },
            AuditWriter {
                stop,
                wake: Some(tx),
                done: Some(done_rx),
            },
        ))
    }

    /// A handle that accepts and discards everything (audit disabled, and unit tests
    /// of other modules).
    pub fn disabled() -> Audit {
        Audit {
            tx: None,
            dir: None,
            log_prompts: false,
            health: Arc::default(),
        }
    }

    /// How the writer's I/O is going.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Whether prompt and image fields are kept (`audit.log_prompts`): the gate can
    /// skip copying them into records when they would be dropped anyway.
    pub fn log_prompts(&self) -> bool {
        self.log_prompts
    }

    /// The log's directory, `None` when the log is disabled.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Whether records sent to this handle are written anywhere.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queue one record. Secret fields (and prompt/image fields unless
    /// `log_prompts`) are dropped, see [`scrub`]; the writer adds `ts`, `seq`,
    /// `prev` and `hash`. Waits while the queue is full. Refuses records that carry
    /// a reserved field.
    ///
    /// The fields are scrubbed and serialized here, on the caller's thread, and
    /// travel as one buffer: a map freed on the writer's thread would hand each of
    /// its ~30 nodes back to the allocator across threads (with glibc's malloc,
    /// into the caller's arena under its lock: 62% of the gate's futex calls).
    pub async fn record(&self, mut rec: Map<String, Value>) -> Result<(), AuditError> {
        if let Some(name) = RESERVED_FIELDS.iter().find(|f| rec.contains_key(**f)) {
            return Err(AuditError::ReservedField((*name).to_string()));
        }
        let Some(tx) = &self.tx else { return Ok(()) };
        scrub(&mut rec, self.log_prompts);
        let fields = writer::encode_fields(&rec).map_err(|e| AuditError::Write(e.to_string()))?;
        drop(rec); // here, before the task can move to another worker
        tx.send(Msg::Record(fields))
            .await
            .map_err(|_| AuditError::Closed)
    }

    /// An empty record to build field by field and send with
    /// [`record_fields`](Audit::record_fields): the same line as a `Map` with the
    /// same entries, without the map (see [`Fields`]).
    pub fn fields(&self) -> Fields {
        Fields::new(self.log_prompts)
    }

    /// Queue one record built with [`fields`](Audit::fields), as
    /// [`record`](Audit::record) queues a `Map`.
    pub async fn record_fields(&self, rec: Fields) -> Result<(), AuditError> {
        if let Some(name) = rec.reserved() {
            return Err(AuditError::ReservedField(name.to_string()));
        }
        let Some(tx) = &self.tx else { return Ok(()) };
        tx.send(Msg::Record(rec.encode()))
            .await
            .map_err(|_| AuditError::Closed)
    }

    /// Return once every record queued before this call is written and
    /// `fdatasync`ed.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let (reply, answer) = oneshot::channel();
        tx.send(Msg::Flush(reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }
}

impl AuditWriter {
    /// Stop the writer: everything queued before this call is written and synced,
    /// later `record()` calls fail with [`AuditError::Closed`]. Write errors during
    /// the final drain are logged (the writer retries a few times first).
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(wake) = self.wake.take() {
            // Waits for queue room, which the draining writer makes.
            let _ = wake.send(Msg::Wake).await;
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(wake) = &self.wake {
            // If the queue is full the writer is busy and checks the stop flag after
            // its batch, so a failed try_send loses nothing.
            let _ = wake.try_send(Msg::Wake);
        }
    }
}

/// Remove secret fields always, and prompt/image fields unless `log_prompts`, at any
/// depth (field names compared case-insensitively). The writer applies this to every
/// record; the gate may call it earlier to avoid copying large prompts around.
pub fn scrub(rec: &mut Map<String, Value>, log_prompts: bool) {
    rec.retain(|k, _| !is_dropped(k, log_prompts));
    for v in rec.values_mut() {
        scrub_value(v, log_prompts);
    }
}

fn scrub_value(v: &mut Value, log_prompts: bool) {
    match v {
        Value::Object(map) => scrub(map, log_prompts),
        Value::Array(items) => items.iter_mut().for_each(|i| scrub_value(i, log_prompts)),
        _ => {}
    }
}

fn is_dropped(name: &str, log_prompts: bool) -> bool {
    let hit = |list: &[&str]| list.iter().any(|f| f.eq_ignore_ascii_case(name));
    hit(&SECRET_FIELDS) || (!log_prompts && hit(&PROMPT_FIELDS))
}

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The fixed tail of every line: `,"hash":"` + 64 hex + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// Split a written line (without its newline) into its canonical bytes (minus the
/// closing `}` that the hash also covers) and the stored hash, if it has the shape.
fn split_hash(line: &[u8]) -> Option<(&[u8], &str)> {
    if line.len() < HASH_SUFFIX_LEN + 1 {
        return None;
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    let (body, suffix) = line.split_at(cut);
    let hash = suffix.strip_prefix(b",\"hash\":\"")?.strip_suffix(b"\"}")?;
    let hash = std::str::from_utf8(hash).ok()?;
    Some((body, hash))
}

/// Hex SHA-256 of `body` followed by `}`: the canonical bytes of a record.
fn canonical_hash(body: &[u8]) -> String {
    String::from_utf8_lossy(&canonical_hash_hex(body)).into_owned()
}

/// [`canonical_hash`] as bytes, without an allocation (the writer's path).
fn canonical_hash_hex(body: &[u8]) -> [u8; 64] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(body);
    h.update(b"}");
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(h.finalize(), &mut hex);
    hex
}

/// One log file, identified by its name.
#[derive(Debug, Clone)]
struct LogFile {
    path: PathBuf,
    name: String,
    day: chrono::NaiveDate,
    number: u64,
}

const HEAD_FILE: &str = "head.json";
/// A symlink to the active file, for `tail -F current.jsonl | jq`.
pub const CURRENT_LINK: &str = "current.jsonl";

fn file_name(day: chrono::NaiveDate, number: u64) -> String {
    format!("audit-{}-{number:06}.jsonl", day.format("%Y%m%d"))
}

fn parse_file_name(name: &str) -> Option<(chrono::NaiveDate, u64)> {
    let stem = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let (day, number) = stem.split_once('-')?;
    if day.len() != 8 || number.len() < 6 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let day = chrono::NaiveDate::parse_from_str(day, "%Y%m%d").ok()?;
    Some((day, number.parse().ok()?))
}

/// The log files in `dir`, in chain order (by file number).
fn list_files(dir: &Path) -> Result<Vec<LogFile>, AuditError> {
    let entries = std::fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some((day, number)) = parse_file_name(&name) {
            files.push(LogFile {
                path: entry.path(),
                name,
                day,
                number,
            });
        }
    }
    files.sort_by(|a, b| a.number.cmp(&b.number).then_with(|| a.name.cmp(&b.name)));
    Ok(files)
}

/// The small side file with the last synced record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Head {
    seq: u64,
    hash: String,
    file: String,
}

fn read_head(dir: &Path) -> Option<Result<Head, String>> {
    let path = dir.join(HEAD_FILE);
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("cannot read {}: {e}", path.display()))),
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("cannot parse {}: {e}", path.display())),
        ),
    }
}

/// The chain fields of a complete line, checked for shape but not for links.
#[derive(Debug)]
struct Parsed {
    seq: u64,
    prev: String,
    hash: String,
    /// Whether the stored hash matches the canonical bytes.
    hash_ok: bool,
    value: Map<String, Value>,
}

fn parse_line(line: &[u8]) -> Result<Parsed, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let Value::Object(value) = value else {
        return Err("not a JSON object".into());
    };
    let (body, stored) =
        split_hash(line).ok_or("the line does not end with a \"hash\" field of 64 hex digits")?;
    let seq = value
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("no numeric \"seq\"")?;
    let prev = value
        .get("prev")
        .and_then(Value::as_str)
        .filter(|p| p.len() == 64)
        .ok_or("no 64-hex \"prev\"")?
        .to_string();
    if value.get("hash").and_then(Value::as_str) != Some(stored) {
        return Err("the \"hash\" field is not the last field".into());
    }
    Ok(Parsed {
        seq,
        prev,
        hash: stored.to_string(),
        hash_ok: canonical_hash(body) == stored,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_sort_by_number() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 23).unwrap_or_default();
        let name = file_name(day, 7);
        assert_eq!(name, "audit-20261123-000007.jsonl");
        assert_eq!(parse_file_name(&name), Some((day, 7)));
        assert_eq!(
            parse_file_name("audit-20261123-1234567.jsonl").map(|p| p.1),
            Some(1_234_567)
        );
        for bad in [
            "audit-20261123-7.jsonl",
            "audit-2026112-000001.jsonl",
            "audit-20261323-000001.jsonl",
            "audit-20261123-000001.jsonl.tmp",
            "head.json",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_hash_covers_the_line_up_to_the_hash_field() {
        let body = br#"{"ts":"t","seq":1,"prev":"p","a":1"#;
        let hash = canonical_hash(body);
        let line = format!("{},\"hash\":\"{hash}\"}}", String::from_utf8_lossy(body));
        assert_eq!(
            split_hash(line.as_bytes()),
            Some((&body[..], hash.as_str()))
        );
        assert_ne!(
            canonical_hash(br#"{"ts":"t","seq":1,"prev":"p","a":2"#),
            hash
        );
        assert_eq!(split_hash(b"{\"a\":1}"), None);
    }

    #[test]
    fn scrub_drops_secrets_always_and_prompts_by_default() {
        let mut rec = match serde_json::json!({
            "Prompt": "x", "AUTHORIZATION": "Bearer y", "nested": [{"token": "z", "n": 1}]
        }) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        scrub(&mut rec, true);
        assert!(rec.contains_key("Prompt"));
        assert!(!rec.contains_key("AUTHORIZATION"));
        assert_eq!(rec["nested"], serde_json::json!([{"n": 1}]));
        scrub(&mut rec, false);
        assert!(!rec.contains_key("Prompt"));
    }
}
