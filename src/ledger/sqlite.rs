//! The embedded ledger: one SQLite file (WAL, `synchronous=FULL`), admission
//! state in memory, and a single writer thread doing group commit.
//!
//! Why this shape: SQLite allows one writer at a time, and an fsync per
//! operation would cap throughput at a few hundred operations per second. So
//! every mutation is decided in memory first — under the dashmap shard lock of
//! the chain and then of the account (always in that order, so there is no
//! deadlock) — and queued, while still holding those locks, to the writer
//! thread. The queue order is therefore the order in which decisions were
//! made, and the transfer sequence in the file replays them exactly. The writer
//! drains whatever is queued into one transaction, commits (one fsync for the
//! whole batch), and only then answers each caller through its oneshot.
//!
//! The process owning the file is the only writer: a second process (for
//! example a CLI changing budgets while `serve` runs) would not see this
//! process's in-memory state. `verify` only reads, so it is safe alongside.

use super::idfilter::IdFilter;
use super::{
    now_ms, policy_note, replay_verify, settle_refusal, to_i64, to_u64, window_for, AccountRow,
    AccountState, AccountView, AdminOp, ChainRow, ChainState, Durability, GroupCommits, IdemBegin,
    KeyChanges, KeyCursor, KeyVersion, LedgerConfig, LedgerError, PendingPolicy, Period, Refusal,
    Reserved, Settle, SettleKind, Settled, StoredAnswer, TaskRow, TransferRow, VerifyReport,
    IDEM_RETENTION_MS,
};
use crate::clock::SharedClock;
use crate::keys::KeyRecord;
use crate::points::{KeyId, Points, TransferId};
use crate::tasks::{TaskRecord, TaskState};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rusqlite::{config::DbConfig, params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Jobs drained into one transaction at most; bounds the latency of a batch.
const MAX_BATCH: usize = 8192;
/// Read connections; enough that the two runtime workers plus a blocking scan
/// rarely wait for one.
const READERS: usize = 4;
/// Settled chains stay in memory this long (and until durable), so a replay
/// that follows at once needs no disk read; older ones are looked up in the
/// file (one read by id). Short, because a chain holds some 600 bytes and under
/// load thousands settle every second; the gate calls `forget_settled` 4 times
/// a second. Not zero: a chain `load_chain` brings back must outlive the settle
/// that asked for it.
const CHAIN_RETENTION_MS: i64 = 250;
/// The chain map's table is shrunk back once a burst has passed and it is at
/// least this large and mostly empty.
const CHAIN_SHRINK_ABOVE: usize = 16_384;
/// Page cache of the connection that pages through key records, in KiB: scans
/// pass through once, so a small cache does as well as a large one.
const KEY_READER_CACHE_KIB: i64 = 256;
/// How often the writer copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a replay waits for the first call's write to become durable.
const DURABLE_WAIT_MS: u64 = 30_000;

/// The schema. Write volume is what limits a durable SQLite ledger (every
/// dirtied B-tree page is a WAL frame), so random-keyed indexes are kept to one
/// per chain: `chains` is keyed by id (WITHOUT ROWID) and holds the results a
/// replay needs; `transfers` is append-only by sequence with no secondary index;
/// `pending` is small and stays hot.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    key TEXT PRIMARY KEY,
    budget INTEGER NOT NULL,
    spent INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    period TEXT NOT NULL,
    window_ms INTEGER NOT NULL
);
CREATE TABLE transfers (
    seq INTEGER PRIMARY KEY,
    id TEXT,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    points INTEGER NOT NULL,
    overage INTEGER NOT NULL DEFAULT 0,
    remaining INTEGER NOT NULL DEFAULT 0,
    period TEXT,
    window_ms INTEGER,
    reset_spent INTEGER,
    actor TEXT NOT NULL,
    note TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE chains (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    reserved INTEGER NOT NULL,
    state TEXT NOT NULL,
    settled INTEGER,
    overage INTEGER NOT NULL DEFAULT 0,
    reserve_remaining INTEGER NOT NULL,
    settle_remaining INTEGER,
    refund_remaining INTEGER,
    owner TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    settled_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE pending (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE idem (
    key TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    body_hash BLOB NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    body BLOB,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (key, idem_key)
);
CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL
);
CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"#,
    // v2: the task registry (one row per upstream task the gate charged).
    r#"
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    checked_ms INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX tasks_open ON tasks (checked_ms) WHERE state = 'open';
"#,
    // v3: a failed task's refund is recorded apart from its end, so that a refund
    // cut off after the end (a crash in between) is found and made. Tasks that
    // failed under earlier versions are looked at once more: refunds are
    // idempotent by id, so one already made is only confirmed.
    r#"
UPDATE tasks SET state = 'refund_due' WHERE state = 'fail';
CREATE INDEX tasks_refund_due ON tasks (checked_ms) WHERE state = 'refund_due';
"#,
];

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// A transfer chain as the embedded ledger tracks it in memory.
#[derive(Debug, Clone)]
struct Chain {
    key: KeyId,
    reserved: u64,
    created_ms: i64,
    reserve_remaining: u64,
    state: ChainState,
    /// The commit or void result, returned again on replay.
    settled: Option<Settled>,
    /// The refund result, returned again on replay.
    refund: Option<Settled>,
    settled_ms: i64,
    /// Bumped by every transition; `durable` catches up once it is on disk.
    version: u64,
    durable: u64,
}

/// The transfer row a mutation appends.
#[derive(Debug)]
struct NewTransfer {
    id: Option<TransferId>,
    key: KeyId,
    kind: &'static str,
    points: u64,
    overage: u64,
    remaining: u64,
    period: Option<Period>,
    window_ms: Option<i64>,
    reset_spent: Option<u64>,
    actor: String,
    note: String,
    at_ms: i64,
}

#[derive(Debug)]
enum ChainWrite {
    Insert {
        id: TransferId,
        key: KeyId,
        reserved: u64,
        remaining: u64,
        owner: Arc<str>,
        created_ms: i64,
    },
    /// A commit or void: the chain leaves `pending`.
    Settle {
        id: TransferId,
        state: ChainState,
        settled: Option<u64>,
        overage: u64,
        remaining: u64,
        at_ms: i64,
    },
    Refund {
        id: TransferId,
        remaining: u64,
        at_ms: i64,
    },
}

type Finisher = Box<dyn FnOnce(Result<(), String>) + Send>;
type CustomFn = Box<dyn FnOnce(&Connection) -> Finisher + Send>;

/// A ledger mutation for the writer: the transfer, the chain change, and the
/// account as it stands after this mutation (so the batch writes each touched
/// account once, with the state matching the last transfer in the batch).
struct WriteJob {
    transfer: NewTransfer,
    chain: Option<ChainWrite>,
    account: (KeyId, AccountState),
    /// Marks `(id, version)` durable in memory after the commit.
    durable: Option<(TransferId, u64)>,
    /// The task a commit registers with it (`Ledger::commit_task`).
    task: Option<TaskRow>,
    reply: oneshot::Sender<Result<(), String>>,
}

impl TaskRow {
    /// Registers the task in the embedded store (first write wins).
    fn insert(&self, conn: &Connection) -> rusqlite::Result<usize> {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO tasks (task_id, key, state, created_ms, checked_ms, record) \
             VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
        )?
        .execute(params![
            self.task_id,
            self.key,
            self.state,
            self.created_ms,
            self.record
        ])
    }
}

enum Job {
    Write(Box<WriteJob>),
    /// Anything else (idempotency records, keys, ping), run inside a savepoint so
    /// that its own failure is its caller's error, not the batch's.
    Custom(CustomFn),
}

/// Set when a batch failed to commit; the in-memory state is then ahead of the
/// file and the ledger refuses further work until reopened.
#[derive(Default)]
struct FailStop {
    failed: AtomicBool,
    why: Mutex<Option<String>>,
}

impl FailStop {
    /// Whether a write failed: the ledger takes no more writes, and nothing
    /// touches its files again (see `leave_files_alone`).
    fn stopped(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn check(&self) -> Result<(), LedgerError> {
        if self.stopped() {
            let why = self
                .why
                .lock()
                .map(|w| w.clone().unwrap_or_default())
                .unwrap_or_default();
            return Err(LedgerError::Storage(format!(
                "the embedded ledger stopped after a write failure ({why}); restart to recover"
            )));
        }
        Ok(())
    }

    fn trip(&self, why: &str) {
        if let Ok(mut w) = self.why.lock() {
            w.get_or_insert_with(|| why.to_string());
        }
        self.failed.store(true, Ordering::Release);
    }
}

/// Read-only connections. A plain `std::sync::Mutex` per connection: reads are
/// short point lookups done inline, never held across an `.await`.
struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, LedgerError> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(conn) = self.conns[(start + i) % n].try_lock() {
                return f(&conn).map_err(storage);
            }
        }
        let conn = self.conns[start % n]
            .lock()
            .map_err(|_| LedgerError::Storage("reader connection poisoned".into()))?;
        f(&conn).map_err(storage)
    }
}

/// The embedded backend.
pub(super) struct SqliteLedger {
    accounts: DashMap<KeyId, AccountState>,
    chains: Arc<DashMap<TransferId, Chain>>,
    /// Serialises loading an evicted chain from the file with evicting chains,
    /// so a chain is never re-loaded from a stale row.
    load_lock: Mutex<()>,
    /// Ids in the file but not in `chains` (see `idfilter`). Replaced, under
    /// `load_lock`, when it gets crowded.
    on_disk: std::sync::RwLock<IdFilter>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    /// Held for the ledger's life; see `take_writer_lock`.
    _writer_lock: Mutex<Connection>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    fail: Arc<FailStop>,
    commits: Arc<GroupCommits>,
    readers: Arc<Readers>,
    /// For `keys_page`; a plain mutex, as a page is one short query.
    key_reader: Mutex<Connection>,
    /// Numbers this process's key writes (see `KeyVersion`): one process owns
    /// the file, so its reads of keys are never newer than what it wrote.
    key_writes: AtomicU64,
    clock: SharedClock,
    tz: chrono_tz::Tz,
    policy: PendingPolicy,
    ttl_ms: i64,
    owner: Arc<str>,
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish its last batch and exit;
        // joining makes a reopen of the same file see everything.
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        if let Ok(mut w) = self.writer.lock() {
            if let Some(handle) = w.take() {
                let _ = handle.join();
            }
        }
    }
}

fn open_conn(path: &std::path::Path, durability: Durability) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path).map_err(storage)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(storage)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(storage)?;
    // In WAL mode NORMAL does not sync the WAL at commit (`wal_flusher` and the
    // checkpoints do), so a commit survives the process but not the machine.
    let synchronous = match durability {
        Durability::PowerLoss => "FULL",
        Durability::ProcessCrash => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(storage)?;
    // Page cache per connection (the default is 2 MiB): five connections with
    // full caches were a tenth of the gate's memory, while a miss costs only a
    // read from the OS page cache.
    conn.pragma_update(None, "cache_size", -1024)
        .map_err(storage)?;
    Ok(conn)
}

/// A connection that only reads. It never checkpoints either, not even when
/// it is the last to close: the writer checkpoints when it stops, unless the
/// ledger stopped on a write failure (see `leave_files_alone`).
fn open_reader(path: &std::path::Path, durability: Durability) -> Result<Connection, LedgerError> {
    let r = open_conn(path, durability)?;
    r.pragma_update(None, "query_only", "ON").map_err(storage)?;
    r.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(storage)?;
    Ok(r)
}

fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(storage)?;
    let version = usize::try_from(version).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction().map_err(storage)?;
        tx.execute_batch(sql).map_err(storage)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(storage)?;
        tx.commit().map_err(storage)?;
    }
    Ok(())
}

fn load_accounts(conn: &Connection) -> rusqlite::Result<Vec<AccountRow>> {
    let mut stmt = conn.prepare(
        "SELECT key, budget, spent, reserved, period, window_ms FROM accounts ORDER BY key",
    )?;
    let rows = stmt.query_map([], |r| {
        let period: String = r.get(4)?;
        Ok(AccountRow {
            key: r.get(0)?,
            state: AccountState {
                budget: to_u64(r.get(1)?),
                spent: to_u64(r.get(2)?),
                reserved: to_u64(r.get(3)?),
                period: period.parse().unwrap_or(Period::None),
                window_ms: r.get(5)?,
            },
        })
    })?;
    rows.collect()
}

/// A pending chain loaded at open: the row and its creation time and the
/// remaining reported by its reservation.
type PendingRow = (ChainRow, i64, i64);

fn load_pending(conn: &Connection) -> rusqlite::Result<Vec<PendingRow>> {
    let mut stmt = conn.prepare(
        "SELECT c.id, c.key, c.reserved, c.state, c.settled, c.created_ms, c.reserve_remaining \
         FROM pending p JOIN chains c ON c.id = p.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            ChainRow {
                id: r.get(0)?,
                key: r.get(1)?,
                reserved: r.get(2)?,
                state: r.get(3)?,
                settled: r.get(4)?,
            },
            r.get(5)?,
            r.get(6)?,
        ))
    })?;
    rows.collect()
}

/// A filter of every chain id in the file (pending ones are in memory too,
/// which does no harm), sized with room to grow. It reads two ranges of the
/// `chains` primary key, not the whole table: the gate's own ids only move the
/// filter's time floor, so one read backwards from the end of their range finds
/// it, and only the ids outside that range take bits (see `idfilter`). The
/// cost follows those other ids, not the ledger's history.
fn load_id_filter(conn: &Connection) -> rusqlite::Result<IdFilter> {
    let (lo, hi) = super::idfilter::GATE_RANGE;
    let mut floor = None;
    let mut newest =
        conn.prepare("SELECT id FROM chains WHERE id >= ?1 AND id < ?2 ORDER BY id DESC")?;
    let mut rows = newest.query([lo, hi])?;
    while let Some(row) = rows.next()? {
        let id = row.get_ref(0)?.as_str()?;
        if super::idfilter::time_prefix(id).is_some() {
            floor = Some(id.to_owned());
            break;
        }
    }
    let mut others = Vec::new();
    for (sql, bound) in [
        ("SELECT id FROM chains WHERE id < ?1", lo),
        ("SELECT id FROM chains WHERE id >= ?1", hi),
    ] {
        let mut stmt = conn.prepare(sql)?;
        let mut rows = stmt.query([bound])?;
        while let Some(row) = rows.next()? {
            others.push(row.get::<_, String>(0)?);
        }
    }
    let filter = IdFilter::with_capacity((others.len() as u64).saturating_mul(4));
    for id in others.iter().chain(floor.iter()) {
        filter.insert(id);
    }
    tracing::debug!(ids = filter.len(), "ledger id filter loaded");
    Ok(filter)
}

fn load_chains(conn: &Connection) -> rusqlite::Result<Vec<ChainRow>> {
    let mut stmt = conn.prepare("SELECT id, key, reserved, state, settled FROM chains")?;
    let rows = stmt.query_map([], |r| {
        Ok(ChainRow {
            id: r.get(0)?,
            key: r.get(1)?,
            reserved: r.get(2)?,
            state: r.get(3)?,
            settled: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Chains whose presence in `pending` disagrees with their state.
fn pending_mismatches(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT c.id, c.state, p.id IS NOT NULL FROM chains c LEFT JOIN pending p ON p.id = c.id \
         WHERE (c.state = 'pending') <> (p.id IS NOT NULL) \
         UNION ALL SELECT p.id, 'missing', 1 FROM pending p LEFT JOIN chains c ON c.id = p.id \
         WHERE c.id IS NULL",
    )?;
    let rows = stmt.query_map([], |r| {
        let (id, state, listed): (String, String, bool) = (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok(if listed {
            format!("chain {id} is listed as pending but is {state}")
        } else {
            format!("chain {id} is pending but not listed as pending")
        })
    })?;
    rows.collect()
}

fn load_transfers(conn: &Connection) -> rusqlite::Result<Vec<TransferRow>> {
    let mut stmt = conn.prepare(
        "SELECT seq, id, key, kind, points, period, window_ms, reset_spent FROM transfers ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TransferRow {
            seq: r.get(0)?,
            id: r.get(1)?,
            key: r.get(2)?,
            kind: r.get(3)?,
            points: r.get(4)?,
            period: r.get(5)?,
            window_ms: r.get(6)?,
            reset_spent: r.get(7)?,
        })
    })?;
    rows.collect()
}

/// The reservation's key, points and remaining for a chain in the file.
fn stored_reserve(conn: &Connection, id: &str) -> rusqlite::Result<Option<(String, i64, i64)>> {
    conn.prepare_cached("SELECT key, reserved, reserve_remaining FROM chains WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
}

/// A chain and the results of its transitions as stored in the file.
struct StoredChain {
    key: String,
    reserved: i64,
    state: ChainState,
    settled: Option<i64>,
    overage: i64,
    created_ms: i64,
    reserve_remaining: i64,
    settle_remaining: Option<i64>,
    refund_remaining: Option<i64>,
}

fn stored_chain(conn: &Connection, id: &str) -> rusqlite::Result<Option<StoredChain>> {
    conn.prepare_cached(
        "SELECT key, reserved, state, settled, overage, created_ms, reserve_remaining, \
         settle_remaining, refund_remaining FROM chains WHERE id = ?1",
    )?
    .query_row([id], |r| {
        let state: String = r.get(2)?;
        Ok(StoredChain {
            key: r.get(0)?,
            reserved: r.get(1)?,
            state: ChainState::parse(&state).unwrap_or(ChainState::Pending),
            settled: r.get(3)?,
            overage: r.get(4)?,
            created_ms: r.get(5)?,
            reserve_remaining: r.get(6)?,
            settle_remaining: r.get(7)?,
            refund_remaining: r.get(8)?,
        })
    })
    .optional()
}

impl StoredChain {
    /// The first result of the commit/void (`refund == false`) or the refund.
    fn result(&self, id: &TransferId, refund: bool) -> Option<Settled> {
        let (kind, points, overage, remaining) = match (self.state, refund) {
            (ChainState::Committed | ChainState::Refunded, false) => (
                SettleKind::Commit,
                self.settled?,
                self.overage,
                self.settle_remaining?,
            ),
            (ChainState::Voided, false) => {
                (SettleKind::Void, self.reserved, 0, self.settle_remaining?)
            }
            (ChainState::Refunded, true) => {
                (SettleKind::Refund, self.settled?, 0, self.refund_remaining?)
            }
            _ => return None,
        };
        Some(Settled {
            key: KeyId(self.key.clone()),
            id: id.clone(),
            kind,
            points: Points(to_u64(points)),
            overage: Points(to_u64(overage)),
            remaining: Points(to_u64(remaining)),
            replay: true,
        })
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    chains: Arc<DashMap<TransferId, Chain>>,
    fail: Arc<FailStop>,
    commits: &GroupCommits,
) {
    let mut last_checkpoint = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if fail.stopped() {
            finish_all(
                batch,
                Err("ledger stopped after an earlier write failure".into()),
            );
            continue;
        }
        match write_batch(&mut conn, batch) {
            Ok(done) => {
                commits.committed(done.len());
                for (durable, finish) in done {
                    if let Some((id, version)) = durable {
                        if let Some(mut c) = chains.get_mut(&id) {
                            c.durable = c.durable.max(version);
                        }
                    }
                    finish(Ok(()));
                }
            }
            Err((e, batch)) => {
                tracing::error!(error = %e, "ledger batch failed to commit; stopping the ledger");
                fail.trip(&e);
                commits.rolled_back();
                finish_all(batch, Err(e));
            }
        }
        // Checkpoint between batches, after the callers have their answers:
        // the WAL is copied into the database and, since no write is in
        // progress, the next batch starts the WAL over instead of growing it.
        // Not once the ledger has stopped (see `leave_files_alone`).
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY && !fail.stopped() {
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "ledger WAL checkpoint failed");
            }
            last_checkpoint = std::time::Instant::now();
        }
    }
    if fail.stopped() {
        leave_files_alone(&conn);
    } else {
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
}

/// After a write failure nothing writes to the ledger's files again, not even
/// SQLite's checkpoint as its last connection closes. A failed `fsync` means
/// the disk or the file system is failing, and a checkpoint rewrites pages of
/// the database in place: measured on ext4 whose writeback fails
/// (`tests/robustness.rs`, `FailingDisk`), a checkpoint after the failure
/// left pages that had been synced long before reading as zeros after a
/// power cut ("potential data loss" in the kernel log), and the ledger would
/// not open. The WAL holds every commit that was acknowledged; the next start
/// recovers from it.
fn leave_files_alone(conn: &Connection) {
    if let Err(e) = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true) {
        tracing::warn!(error = %e, "cannot turn off the ledger's checkpoint on close");
    }
}

/// How often the WAL is synced at `process-crash` durability.
const WAL_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// At `process-crash` durability (`synchronous=NORMAL`) a commit leaves its WAL
/// frames dirty in the page cache and the next checkpoint syncs them all at
/// once, stalling the writer for tens of milliseconds (250 ms of frames). This
/// thread syncs the WAL every `WAL_FLUSH_EVERY` instead, off the writer's path,
/// so the checkpoint finds little to write and a power cut loses about that
/// much rather than up to a checkpoint interval. Nobody waits for these syncs.
///
/// A failed sync stops the ledger, as a failed commit does: after one, Linux
/// may have dropped the dirty pages, so later commits cannot be proven kept.
fn wal_flusher(wal: &std::path::Path, stop: &AtomicBool, fail: &FailStop) {
    let mut file: Option<std::fs::File> = None;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(WAL_FLUSH_EVERY);
        if file.is_none() {
            // Absent only until the first commit creates it.
            file = std::fs::File::open(wal).ok();
        }
        if let Some(f) = &file {
            if let Err(e) = f.sync_data() {
                let why = format!("syncing the WAL failed: {e}");
                tracing::error!(error = %e, "ledger WAL sync failed; stopping the ledger");
                fail.trip(&why);
                return;
            }
        }
    }
}

fn finish_all(batch: Vec<Job>, res: Result<(), String>) {
    for job in batch {
        match job {
            Job::Write(w) => {
                let _ = w.reply.send(res.clone());
            }
            Job::Custom(f) => {
                // The closure was never run; there is no connection to give it.
                drop(f);
            }
        }
    }
}

type Done = Vec<(Option<(TransferId, u64)>, Finisher)>;

/// Writes one batch in one transaction. On failure the whole batch is handed
/// back so that every caller learns of it.
#[allow(clippy::type_complexity)]
fn write_batch(conn: &mut Connection, batch: Vec<Job>) -> Result<Done, (String, Vec<Job>)> {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return Err((e.to_string(), batch)),
    };
    let mut done: Done = Vec::with_capacity(batch.len());
    let mut touched: HashMap<KeyId, AccountState> = HashMap::new();
    let mut failed: Option<rusqlite::Error> = None;
    let mut rest = Vec::new();
    let mut iter = batch.into_iter();
    for job in iter.by_ref() {
        match job {
            Job::Write(w) => match apply_write(&tx, &w) {
                Ok(()) => {
                    let WriteJob {
                        account,
                        durable,
                        reply,
                        ..
                    } = *w;
                    touched.insert(account.0, account.1);
                    done.push((
                        durable,
                        Box::new(move |res| {
                            let _ = reply.send(res);
                        }),
                    ));
                }
                Err(e) => {
                    failed = Some(e);
                    rest.push(Job::Write(w));
                    break;
                }
            },
            Job::Custom(f) => {
                if let Err(e) = tx.execute_batch("SAVEPOINT job") {
                    failed = Some(e);
                    break;
                }
                let finish = f(&tx);
                done.push((None, finish));
                if let Err(e) = tx.execute_batch("RELEASE job") {
                    failed = Some(e);
                    break;
                }
                continue;
            }
        }
    }
    let outcome = match failed {
        Some(e) => Err(e),
        None => write_accounts(&tx, &touched),
    };
    let outcome = outcome.and_then(|()| tx.commit());
    match outcome {
        Ok(()) => Ok(done),
        Err(e) => {
            let msg = e.to_string();
            for (_, finish) in done {
                finish(Err(msg.clone()));
            }
            rest.extend(iter);
            Err((msg, rest))
        }
    }
}

/// Writes each account touched by the batch once, as it stands after the
/// batch's last transfer for it.
fn write_accounts(tx: &Connection, touched: &HashMap<KeyId, AccountState>) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO accounts (key, budget, spent, reserved, period, window_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (key) DO UPDATE SET \
                 budget = excluded.budget, spent = excluded.spent, reserved = excluded.reserved, \
                 period = excluded.period, window_ms = excluded.window_ms",
    )?;
    for (key, a) in touched {
        stmt.execute(params![
            key.as_str(),
            a.budget as i64,
            a.spent as i64,
            a.reserved as i64,
            a.period.as_str(),
            a.window_ms
        ])?;
    }
    Ok(())
}

fn apply_write(conn: &Connection, w: &WriteJob) -> rusqlite::Result<()> {
    match &w.chain {
        Some(ChainWrite::Insert {
            id,
            key,
            reserved,
            remaining,
            owner,
            created_ms,
        }) => {
            conn.prepare_cached(
                "INSERT INTO chains (id, key, reserved, state, reserve_remaining, owner, created_ms) \
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
            )?
            .execute(params![
                id.as_str(),
                key.as_str(),
                *reserved as i64,
                *remaining as i64,
                &**owner,
                created_ms
            ])?;
            conn.prepare_cached("INSERT INTO pending (id) VALUES (?1)")?
                .execute([id.as_str()])?;
        }
        Some(ChainWrite::Settle {
            id,
            state,
            settled,
            overage,
            remaining,
            at_ms,
        }) => {
            conn.prepare_cached(
                "UPDATE chains SET state = ?2, settled = ?3, overage = ?4, settle_remaining = ?5, \
                 settled_ms = ?6 WHERE id = ?1",
            )?
            .execute(params![
                id.as_str(),
                state.as_str(),
                settled.map(|s| s as i64),
                *overage as i64,
                *remaining as i64,
                at_ms
            ])?;
            conn.prepare_cached("DELETE FROM pending WHERE id = ?1")?
                .execute([id.as_str()])?;
        }
        Some(ChainWrite::Refund {
            id,
            remaining,
            at_ms,
        }) => {
            conn.prepare_cached(
                "UPDATE chains SET state = 'refunded', refund_remaining = ?2, settled_ms = ?3 \
                 WHERE id = ?1",
            )?
            .execute(params![id.as_str(), *remaining as i64, at_ms])?;
        }
        None => {}
    }
    if let Some(task) = &w.task {
        task.insert(conn)?;
    }
    let t = &w.transfer;
    conn.prepare_cached(
        "INSERT INTO transfers (id, key, kind, points, overage, remaining, period, window_ms, \
         reset_spent, actor, note, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        t.id.as_ref().map(|i| i.as_str()),
        t.key.as_str(),
        t.kind,
        t.points as i64,
        t.overage as i64,
        t.remaining as i64,
        t.period.map(|p| p.as_str()),
        t.window_ms,
        t.reset_spent.map(|s| s as i64),
        t.actor,
        t.note,
        t.at_ms
    ])?;
    Ok(())
}

/// What an administrative transfer records besides its kind.
#[derive(Debug, Clone, Copy)]
struct Change {
    points: u64,
    period: Option<Period>,
    window_ms: Option<i64>,
}

impl Change {
    fn points(points: u64) -> Change {
        Change {
            points,
            period: None,
            window_ms: None,
        }
    }
}

/// Points above `i64::MAX` cannot be stored; refuse them before deciding anything.
fn storable(points: Points) -> Result<u64, LedgerError> {
    to_i64(points.get()).map(|_| points.get())
}

impl SqliteLedger {
    pub(super) async fn open(
        cfg: &LedgerConfig,
        clock: SharedClock,
    ) -> Result<SqliteLedger, LedgerError> {
        let path = cfg
            .path
            .clone()
            .ok_or_else(|| LedgerError::Config("ledger.path is not set".into()))?;
        let tz = cfg.tz()?;
        let durability = cfg.durability;
        // At `process-crash` durability commits are not synced, so the WAL is
        // synced from another thread (see `wal_flusher`).
        let wal = (durability == Durability::ProcessCrash).then(|| {
            let mut p = path.clone().into_os_string();
            p.push("-wal");
            std::path::PathBuf::from(p)
        });
        let open = tokio::task::spawn_blocking(move || -> Result<_, LedgerError> {
            if let Some(dir) = path.parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir).map_err(storage)?;
                }
            }
            let writer_lock = take_writer_lock(&path)?;
            let mut writer = open_conn(&path, durability)?;
            migrate(&mut writer)?;
            // The writer checkpoints itself after answering a batch (see
            // `writer_loop`) rather than inside a commit its callers wait on.
            writer
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(storage)?;
            let accounts = load_accounts(&writer).map_err(storage)?;
            let pending_full = load_pending(&writer).map_err(storage)?;
            let on_disk = load_id_filter(&writer).map_err(storage)?;
            let mut readers = Vec::with_capacity(READERS);
            for _ in 0..READERS {
                readers.push(Mutex::new(open_reader(&path, durability)?));
            }
            // Key pages are read on a connection of their own with a small
            // cache: a scan of 100,000 records must neither fill the request
            // readers' caches nor hold one of them for long.
            let key_reader = open_reader(&path, durability)?;
            key_reader
                .pragma_update(None, "cache_size", -KEY_READER_CACHE_KIB)
                .map_err(storage)?;
            Ok((
                writer,
                accounts,
                pending_full,
                (readers, key_reader),
                on_disk,
                writer_lock,
            ))
        })
        .await
        .map_err(storage)??;
        let (writer_conn, accounts, pending, (readers, key_reader), on_disk, writer_lock) = open;

        let chains = Arc::new(DashMap::new());
        let fail = Arc::new(FailStop::default());
        let commits = Arc::new(GroupCommits::default());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let chains = Arc::clone(&chains);
            let fail = Arc::clone(&fail);
            let commits = Arc::clone(&commits);
            std::thread::Builder::new()
                .name("ledger-writer".into())
                .spawn(move || {
                    // Batches fill while the workers run (`crate::sched`);
                    // the flusher, started from here, inherits the policy.
                    crate::sched::batch_thread_started("ledger-writer");
                    let stop = AtomicBool::new(false);
                    std::thread::scope(|s| {
                        if let Some(wal) = &wal {
                            let (stop, fail) = (&stop, &*fail);
                            let spawned = std::thread::Builder::new()
                                .name("ledger-flusher".into())
                                .spawn_scoped(s, move || wal_flusher(wal, stop, fail));
                            if let Err(e) = spawned {
                                // Still correct: the checkpoints sync the WAL.
                                tracing::warn!(error = %e, "no ledger WAL flusher thread");
                            }
                        }
                        writer_loop(writer_conn, rx, chains, Arc::clone(&fail), &commits);
                        stop.store(true, Ordering::Release);
                    })
                })
                .map_err(storage)?
        };
        let ledger = SqliteLedger {
            accounts: accounts
                .into_iter()
                .map(|a| (KeyId(a.key), a.state))
                .collect(),
            chains,
            load_lock: Mutex::new(()),
            on_disk: std::sync::RwLock::new(on_disk),
            queue: Mutex::new(Some(tx)),
            _writer_lock: Mutex::new(writer_lock),
            writer: Mutex::new(Some(writer)),
            fail,
            commits,
            readers: Arc::new(Readers {
                conns: readers,
                next: AtomicUsize::new(0),
            }),
            key_reader: Mutex::new(key_reader),
            key_writes: AtomicU64::new(0),
            clock,
            tz,
            policy: cfg.pending_policy,
            ttl_ms: i64::try_from(cfg.pending_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            owner: Arc::from(cfg.instance_name()),
        };
        let mut orphans = Vec::with_capacity(pending.len());
        for (row, created_ms, remaining) in pending {
            let id = TransferId(row.id);
            orphans.push((id.clone(), to_u64(row.reserved)));
            ledger.chains.insert(
                id,
                Chain {
                    key: KeyId(row.key),
                    reserved: to_u64(row.reserved),
                    created_ms,
                    reserve_remaining: to_u64(remaining),
                    state: ChainState::Pending,
                    settled: None,
                    refund: None,
                    settled_ms: 0,
                    version: 1,
                    durable: 1,
                },
            );
        }
        // One process owns the file, so everything still pending was left by a
        // process that stopped without settling it.
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                policy = ?ledger.policy,
                "resolving reservations left pending by the previous run"
            );
        }
        let note = policy_note(
            ledger.policy,
            "pending at startup (the previous run stopped without settling it)",
        );
        for (id, reserved) in orphans {
            ledger.resolve(&id, reserved, "recovery", &note).await?;
        }
        // Idempotency records left in flight by the previous run would answer
        // "still in progress" to every retry until they expire. Their requests
        // were settled just above, so a retry gets a definite answer instead —
        // never a second upstream call (which could charge twice).
        let interrupted = interrupted_answer().body;
        ledger
            .custom(move |c| {
                c.prepare_cached(
                    "UPDATE idem SET state = 'done', status = 200, body = ?1 WHERE state = 'inflight'",
                )?
                .execute(params![interrupted])
            })
            .await?;
        Ok(ledger)
    }

    fn send(&self, job: Job) -> Result<(), LedgerError> {
        let q = self
            .queue
            .lock()
            .map_err(|_| LedgerError::Storage("ledger queue poisoned".into()))?;
        match q.as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| LedgerError::Storage("ledger writer has stopped".into())),
            None => Err(LedgerError::Storage("ledger is closed".into())),
        }
    }

    async fn wait(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), LedgerError> {
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LedgerError::Storage(e)),
            Err(_) => Err(LedgerError::Storage(
                "ledger writer dropped the request".into(),
            )),
        }
    }

    /// Runs `f` inside the writer's next transaction and returns its value after
    /// the transaction committed.
    async fn custom<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        self.fail.check()?;
        let (tx, rx) = oneshot::channel::<Result<T, LedgerError>>();
        let job = Job::Custom(Box::new(move |conn: &Connection| -> Finisher {
            match f(conn) {
                Ok(v) => Box::new(move |res: Result<(), String>| {
                    let _ = tx.send(res.map(|()| v).map_err(LedgerError::Storage));
                }),
                Err(e) => {
                    // Undo only this job's statements; the batch goes on.
                    let _ = conn.execute_batch("ROLLBACK TO job");
                    let msg = e.to_string();
                    Box::new(move |_res: Result<(), String>| {
                        let _ = tx.send(Err(LedgerError::Storage(msg)));
                    })
                }
            }
        }));
        self.send(job)?;
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(LedgerError::Storage(
                "ledger writer dropped the request".into(),
            )),
        }
    }

    /// Waits until the chain's latest transition is on disk, so a replay never
    /// reports something a crash could still undo.
    async fn wait_durable(&self, id: &TransferId) -> Result<(), LedgerError> {
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_millis(DURABLE_WAIT_MS);
        loop {
            self.fail.check()?;
            match self.chains.get(id) {
                Some(c) if c.durable < c.version => {}
                _ => return Ok(()),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(LedgerError::Storage(format!(
                    "transfer {id} is not durable yet"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    pub(super) async fn admin(
        &self,
        key: &KeyId,
        op: AdminOp,
        actor: &str,
        note: &str,
    ) -> Result<AccountView, LedgerError> {
        self.fail.check()?;
        let now = now_ms(&self.clock);
        let (tx, rx) = oneshot::channel();
        let state = match op {
            AdminOp::Open { budget, period } => {
                let budget = storable(budget)?;
                match self.accounts.entry(key.clone()) {
                    Entry::Occupied(_) => {
                        return Err(LedgerError::Conflict(format!(
                            "account {key} already exists"
                        )))
                    }
                    Entry::Vacant(v) => {
                        let window = window_for(period, self.tz, now);
                        let state = AccountState {
                            budget,
                            spent: 0,
                            reserved: 0,
                            period,
                            window_ms: window,
                        };
                        // Queued while the account's lock is held, so no other
                        // change to it can be written before its opening.
                        let guard = v.insert(state);
                        let change = Change {
                            points: budget,
                            period: Some(period),
                            window_ms: Some(window),
                        };
                        self.enqueue_admin(key, op, state, change, actor, note, now, tx)?;
                        drop(guard);
                        state
                    }
                }
            }
            _ => {
                let mut acc = self
                    .accounts
                    .get_mut(key)
                    .ok_or_else(|| LedgerError::UnknownAccount(key.clone()))?;
                let mut next = *acc;
                let change = match op {
                    AdminOp::Budget(b) => {
                        next.budget = storable(b)?;
                        Change::points(next.budget)
                    }
                    AdminOp::TopUp(p) => {
                        let p = storable(p)?;
                        next.budget = next
                            .budget
                            .checked_add(p)
                            .filter(|b| to_i64(*b).is_ok())
                            .ok_or_else(|| LedgerError::Conflict("budget overflow".into()))?;
                        Change::points(p)
                    }
                    AdminOp::Period(p) => {
                        next.period = p;
                        next.window_ms = window_for(p, self.tz, now);
                        Change {
                            points: 0,
                            period: Some(p),
                            window_ms: Some(next.window_ms),
                        }
                    }
                    AdminOp::Open { .. } => Change::points(0),
                };
                *acc = next;
                self.enqueue_admin(key, op, next, change, actor, note, now, tx)?;
                next
            }
        };
        Self::wait(rx).await?;
        Ok(state.view(key, now, self.tz))
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue_admin(
        &self,
        key: &KeyId,
        op: AdminOp,
        state: AccountState,
        change: Change,
        actor: &str,
        note: &str,
        now: i64,
        reply: oneshot::Sender<Result<(), String>>,
    ) -> Result<(), LedgerError> {
        self.send(Job::Write(Box::new(WriteJob {
            transfer: NewTransfer {
                id: None,
                key: key.clone(),
                kind: op.kind(),
                points: change.points,
                overage: 0,
                remaining: state.remaining(),
                period: change.period,
                window_ms: change.window_ms,
                reset_spent: None,
                actor: actor.to_string(),
                note: note.to_string(),
                at_ms: now,
            },
            chain: None,
            account: (key.clone(), state),
            durable: None,
            task: None,
            reply,
        })))
    }

    pub(super) async fn account(&self, key: &KeyId) -> Result<AccountView, LedgerError> {
        let now = now_ms(&self.clock);
        self.accounts
            .get(key)
            .map(|a| a.view(key, now, self.tz))
            .ok_or_else(|| LedgerError::UnknownAccount(key.clone()))
    }

    /// The accounts of `keys` that exist (from memory).
    pub(super) async fn accounts_of(
        &self,
        keys: &[KeyId],
    ) -> Result<Vec<AccountView>, LedgerError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match self.account(k).await {
                Ok(v) => out.push(v),
                Err(LedgerError::UnknownAccount(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub(super) async fn accounts(&self) -> Result<Vec<AccountView>, LedgerError> {
        let now = now_ms(&self.clock);
        let mut all: Vec<AccountView> = self
            .accounts
            .iter()
            .map(|a| a.value().view(a.key(), now, self.tz))
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    pub(super) async fn reserve(
        &self,
        key: &KeyId,
        points: Points,
        id: &TransferId,
    ) -> Result<Reserved, LedgerError> {
        self.fail.check()?;
        let points = storable(points)?;
        // A chain settled long ago is no longer in memory; its id is still taken.
        if !self.chains.contains_key(id) && self.maybe_on_disk(id) {
            let idc = id.clone();
            if let Some((k, p, rem)) = self
                .readers
                .read(move |c| stored_reserve(c, idc.as_str()))?
            {
                return reserve_replay(key, id, &k, to_u64(p), to_u64(rem));
            }
        }
        let now = now_ms(&self.clock);
        let (tx, rx) = oneshot::channel();
        let reserved = match self.chains.entry(id.clone()) {
            Entry::Occupied(e) => {
                let c = e.get();
                let (ck, cp, crem) = (c.key.clone(), c.reserved, c.reserve_remaining);
                drop(e);
                self.wait_durable(id).await?;
                return reserve_replay(key, id, ck.as_str(), cp, crem);
            }
            Entry::Vacant(v) => {
                let mut acc = self
                    .accounts
                    .get_mut(key)
                    .ok_or_else(|| LedgerError::UnknownAccount(key.clone()))?;
                let mut next = *acc;
                let reset = next.reset_if_due(now, self.tz);
                // The admission decision: one compare-and-update under the
                // account's lock.
                let fits = next
                    .spent
                    .checked_add(next.reserved)
                    .and_then(|u| u.checked_add(points))
                    .is_some_and(|total| total <= next.budget);
                if !fits {
                    return Err(LedgerError::Insufficient {
                        needed: Points(points),
                        remaining: Points(next.remaining()),
                    });
                }
                next.reserved += points;
                *acc = next;
                let remaining = next.remaining();
                v.insert(Chain {
                    key: key.clone(),
                    reserved: points,
                    created_ms: now,
                    reserve_remaining: remaining,
                    state: ChainState::Pending,
                    settled: None,
                    refund: None,
                    settled_ms: 0,
                    version: 1,
                    durable: 0,
                });
                self.send(Job::Write(Box::new(WriteJob {
                    transfer: NewTransfer {
                        id: Some(id.clone()),
                        key: key.clone(),
                        kind: "reserve",
                        points,
                        overage: 0,
                        remaining,
                        period: None,
                        window_ms: reset.map(|_| next.window_ms),
                        reset_spent: reset,
                        actor: "gate".into(),
                        note: String::new(),
                        at_ms: now,
                    },
                    chain: Some(ChainWrite::Insert {
                        id: id.clone(),
                        key: key.clone(),
                        reserved: points,
                        remaining,
                        owner: Arc::clone(&self.owner),
                        created_ms: now,
                    }),
                    account: (key.clone(), next),
                    durable: Some((id.clone(), 1)),
                    task: None,
                    reply: tx,
                })))?;
                Reserved {
                    key: key.clone(),
                    points: Points(points),
                    remaining: Points(remaining),
                }
            }
        };
        Self::wait(rx).await?;
        Ok(reserved)
    }

    /// Whether `id` may be a chain in the file that is not in memory.
    fn maybe_on_disk(&self, id: &TransferId) -> bool {
        self.on_disk
            .read()
            .map(|f| f.may_contain(id.as_str()))
            .unwrap_or(true)
    }

    /// Brings a chain that was evicted from memory back, for a refund.
    fn load_chain(&self, id: &TransferId) -> Result<bool, LedgerError> {
        let _guard = self
            .load_lock
            .lock()
            .map_err(|_| LedgerError::Storage("ledger load lock poisoned".into()))?;
        if self.chains.contains_key(id) {
            return Ok(true);
        }
        let idc = id.clone();
        let Some(sc) = self.readers.read(move |c| stored_chain(c, idc.as_str()))? else {
            return Ok(false);
        };
        let settled = sc.result(id, false);
        let refund = sc.result(id, true);
        self.chains.insert(
            id.clone(),
            Chain {
                key: KeyId(sc.key.clone()),
                reserved: to_u64(sc.reserved),
                created_ms: sc.created_ms,
                reserve_remaining: to_u64(sc.reserve_remaining),
                state: sc.state,
                settled,
                refund,
                // Kept for a full retention period from now, so the eviction
                // sweep does not take it away before the caller uses it.
                settled_ms: now_ms(&self.clock),
                version: 1,
                durable: 1,
            },
        );
        Ok(true)
    }

    pub(super) async fn settle(
        &self,
        id: &TransferId,
        how: Settle,
        actor: &str,
        note: &str,
        task: Option<&TaskRecord>,
    ) -> Result<Settled, LedgerError> {
        self.fail.check()?;
        if let Settle::Commit(p) = how {
            storable(p)?;
        }
        let task = match how {
            Settle::Commit(_) => task.map(TaskRow::of).transpose()?,
            _ => None,
        };
        if !self.chains.contains_key(id) && !self.load_chain(id)? {
            return Err(LedgerError::UnknownTransfer(id.clone()));
        }
        let now = now_ms(&self.clock);
        let (tx, rx) = oneshot::channel();
        let settled = {
            let Some(mut ch) = self.chains.get_mut(id) else {
                return Err(LedgerError::Conflict(format!(
                    "transfer {id} was evicted while being settled; retry"
                )));
            };
            let allowed = matches!(
                (how, ch.state),
                (Settle::Commit(_) | Settle::Void, ChainState::Pending)
                    | (Settle::Refund, ChainState::Committed)
            );
            if !allowed {
                let refusal = settle_refusal(id, how, ch.state);
                let first = match how {
                    Settle::Refund => ch.refund.clone(),
                    _ => ch.settled.clone(),
                };
                drop(ch);
                return match refusal {
                    Refusal::Conflict(msg) => Err(LedgerError::Conflict(msg)),
                    Refusal::Replay(_) => {
                        self.wait_durable(id).await?;
                        first
                            .map(|mut s| {
                                s.replay = true;
                                s
                            })
                            .ok_or_else(|| {
                                LedgerError::Storage(format!("transfer {id} lost its first result"))
                            })
                    }
                };
            }
            let mut acc = self
                .accounts
                .get_mut(&ch.key)
                .ok_or_else(|| LedgerError::UnknownAccount(ch.key.clone()))?;
            let mut next = *acc;
            let (points, overage, reset, state, settled_points) = match how {
                Settle::Commit(p) => {
                    let p = p.get();
                    let reset = next.reset_if_due(now, self.tz);
                    let others = next.reserved.saturating_sub(ch.reserved);
                    let available = next
                        .budget
                        .saturating_sub(next.spent)
                        .saturating_sub(others);
                    let overage = p.saturating_sub(available);
                    next.reserved = others;
                    next.spent = next
                        .spent
                        .checked_add(p)
                        .filter(|s| to_i64(*s).is_ok())
                        .ok_or_else(|| LedgerError::Conflict("spent overflow".into()))?;
                    (p, overage, reset, ChainState::Committed, Some(p))
                }
                Settle::Void => {
                    next.reserved = next.reserved.saturating_sub(ch.reserved);
                    (ch.reserved, 0, None, ChainState::Voided, None)
                }
                Settle::Refund => {
                    let p = ch.settled.as_ref().map_or(0, |s| s.points.get());
                    let reset = next.reset_if_due(now, self.tz);
                    next.spent = next.spent.saturating_sub(p);
                    (p, 0, reset, ChainState::Refunded, None)
                }
            };
            *acc = next;
            let key = ch.key.clone();
            let settled = Settled {
                key: key.clone(),
                id: id.clone(),
                kind: how.kind(),
                points: Points(points),
                overage: Points(overage),
                remaining: Points(next.remaining()),
                replay: false,
            };
            ch.version += 1;
            ch.state = state;
            ch.settled_ms = now;
            match how {
                Settle::Refund => ch.refund = Some(settled.clone()),
                _ => ch.settled = Some(settled.clone()),
            }
            let version = ch.version;
            self.send(Job::Write(Box::new(WriteJob {
                transfer: NewTransfer {
                    id: Some(id.clone()),
                    key: key.clone(),
                    kind: how.kind().as_str(),
                    points,
                    overage,
                    remaining: next.remaining(),
                    period: None,
                    window_ms: reset.map(|_| next.window_ms),
                    reset_spent: reset,
                    actor: actor.to_string(),
                    note: note.to_string(),
                    at_ms: now,
                },
                chain: Some(match how {
                    Settle::Refund => ChainWrite::Refund {
                        id: id.clone(),
                        remaining: next.remaining(),
                        at_ms: now,
                    },
                    _ => ChainWrite::Settle {
                        id: id.clone(),
                        state,
                        settled: settled_points,
                        overage,
                        remaining: next.remaining(),
                        at_ms: now,
                    },
                }),
                account: (key, next),
                durable: Some((id.clone(), version)),
                task,
                reply: tx,
            })))?;
            settled
        };
        Self::wait(rx).await?;
        Ok(settled)
    }

    /// Resolves one pending chain by the policy.
    async fn resolve(
        &self,
        id: &TransferId,
        reserved: u64,
        actor: &str,
        note: &str,
    ) -> Result<Settled, LedgerError> {
        let how = match self.policy {
            PendingPolicy::Charge => Settle::Commit(Points(reserved)),
            PendingPolicy::Void => Settle::Void,
        };
        self.settle(id, how, actor, note, None).await
    }

    pub(super) async fn expire_pending(
        &self,
        spare: &[TransferId],
    ) -> Result<Vec<Settled>, LedgerError> {
        self.fail.check()?;
        let now = now_ms(&self.clock);
        let cutoff = now.saturating_sub(self.ttl_ms);
        let due: Vec<(TransferId, u64)> = self
            .chains
            .iter()
            .filter(|c| c.state == ChainState::Pending && c.created_ms <= cutoff)
            .filter(|c| !spare.contains(c.key()))
            .map(|c| (c.key().clone(), c.reserved))
            .collect();
        let note = policy_note(self.policy, "pending longer than pending_ttl_secs");
        let mut out = Vec::with_capacity(due.len());
        for (id, reserved) in due {
            match self.resolve(&id, reserved, "expiry", &note).await {
                Ok(s) if !s.replay => out.push(s),
                Ok(_) => {}
                // The gate settled it meanwhile: nothing to expire.
                Err(LedgerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Housekeeping rides on the same periodic call: forget old settled
        // chains (they stay in the file) and old idempotency records.
        self.forget_settled()?;
        let idem_cutoff = now.saturating_sub(IDEM_RETENTION_MS);
        self.custom(move |c| {
            c.prepare_cached("DELETE FROM idem WHERE created_ms < ?1")?
                .execute([idem_cutoff])
        })
        .await?;
        Ok(out)
    }

    /// Forgets settled chains older than `CHAIN_RETENTION_MS` (they stay in the
    /// file), and gives back the table space a burst of requests left behind.
    pub(super) fn forget_settled(&self) -> Result<(), LedgerError> {
        let _guard = self
            .load_lock
            .lock()
            .map_err(|_| LedgerError::Storage("ledger load lock poisoned".into()))?;
        let old = now_ms(&self.clock).saturating_sub(CHAIN_RETENTION_MS);
        let filter = self
            .on_disk
            .read()
            .map_err(|_| LedgerError::Storage("ledger id filter poisoned".into()))?;
        // Into the filter first, then out of memory: a concurrent reserve
        // always finds the id in one of the two.
        self.chains.retain(|id, c| {
            let keep =
                c.state == ChainState::Pending || c.durable < c.version || c.settled_ms >= old;
            if !keep {
                filter.insert(id.as_str());
            }
            keep
        });
        let crowded = filter.is_crowded();
        drop(filter);
        if crowded {
            let bigger = self.readers.read(load_id_filter)?;
            if let Ok(mut f) = self.on_disk.write() {
                *f = bigger;
            }
        }
        let cap = self.chains.capacity();
        if cap > CHAIN_SHRINK_ABOVE && self.chains.len() < cap / 4 {
            self.chains.shrink_to_fit();
        }
        Ok(())
    }

    pub(super) fn group_commits(&self) -> &GroupCommits {
        &self.commits
    }

    pub(super) async fn pending_count(&self) -> Result<u64, LedgerError> {
        Ok(self
            .chains
            .iter()
            .filter(|c| c.state == ChainState::Pending)
            .count() as u64)
    }

    pub(super) async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        // Everything decided so far is written first, so the file is compared
        // with the latest records.
        self.close().await?;
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || readers.read(verify_conn))
            .await
            .map_err(storage)?
    }

    pub(super) async fn ping(&self) -> Result<(), LedgerError> {
        let now = now_ms(&self.clock);
        self.custom(move |c| {
            c.prepare_cached("INSERT OR REPLACE INTO meta (k, v) VALUES ('ping', ?1)")?
                .execute([now.to_string()])
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn close(&self) -> Result<(), LedgerError> {
        self.custom(|_| Ok(())).await
    }

    pub(super) async fn durability(&self) -> Result<Durability, LedgerError> {
        let level: i64 = self
            .custom(|c| c.pragma_query_value(None, "synchronous", |r| r.get(0)))
            .await?;
        match level {
            1 => Ok(Durability::ProcessCrash),
            2 | 3 => Ok(Durability::PowerLoss),
            n => Err(LedgerError::Storage(format!(
                "synchronous={n} on the writer"
            ))),
        }
    }

    pub(super) async fn idem_begin(
        &self,
        key: &KeyId,
        idem_key: &str,
        body_hash: &[u8; 32],
    ) -> Result<IdemBegin, LedgerError> {
        let (key, idem_key, hash) = (key.0.clone(), idem_key.to_string(), body_hash.to_vec());
        let now = now_ms(&self.clock);
        let stale_before = now.saturating_sub(self.ttl_ms);
        self.custom(move |c| {
            let existing = c
                .prepare_cached(
                    "SELECT body_hash, state, status, body, created_ms FROM idem \
                     WHERE key = ?1 AND idem_key = ?2",
                )?
                .query_row(params![key, idem_key], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .optional()?;
            Ok(match existing {
                None => {
                    c.prepare_cached(
                        "INSERT INTO idem (key, idem_key, body_hash, state, created_ms) \
                         VALUES (?1, ?2, ?3, 'inflight', ?4)",
                    )?
                    .execute(params![key, idem_key, hash, now])?;
                    IdemBegin::New
                }
                Some((stored, state, _, _, created))
                    if stored == hash && state == "inflight" && created < stale_before =>
                {
                    let answer = interrupted_answer();
                    c.prepare_cached(
                        "UPDATE idem SET state = 'done', status = ?3, body = ?4 \
                         WHERE key = ?1 AND idem_key = ?2 AND state = 'inflight'",
                    )?
                    .execute(params![
                        key,
                        idem_key,
                        i64::from(answer.status),
                        answer.body
                    ])?;
                    IdemBegin::Replay(answer)
                }
                Some(row) => idem_outcome(&hash, &row.0, &row.1, row.2, row.3),
            })
        })
        .await
    }

    pub(super) async fn idem_finish(
        &self,
        key: &KeyId,
        idem_key: &str,
        answer: &StoredAnswer,
    ) -> Result<(), LedgerError> {
        let (key, idem_key) = (key.0.clone(), idem_key.to_string());
        let (status, body) = (i64::from(answer.status), answer.body.clone());
        self.custom(move |c| {
            c.prepare_cached(
                "UPDATE idem SET state = 'done', status = ?3, body = ?4 WHERE key = ?1 AND idem_key = ?2",
            )?
            .execute(params![key, idem_key, status, body])
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn idem_abandon(
        &self,
        key: &KeyId,
        idem_key: &str,
    ) -> Result<(), LedgerError> {
        let (key, idem_key) = (key.0.clone(), idem_key.to_string());
        self.custom(move |c| {
            c.prepare_cached(
                "DELETE FROM idem WHERE key = ?1 AND idem_key = ?2 AND state = 'inflight'",
            )?
            .execute(params![key, idem_key])
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn put_key(&self, rec: &KeyRecord) -> Result<u64, LedgerError> {
        let json = serde_json::to_string(rec).map_err(storage)?;
        let (id, hash) = (rec.id.0.clone(), rec.secret_hash.clone());
        let taken = self
            .custom(move |c| {
                let other: Option<String> = c
                    .prepare_cached("SELECT id FROM keys WHERE secret_hash = ?1 AND id <> ?2")?
                    .query_row(params![hash, id], |r| r.get(0))
                    .optional()?;
                if other.is_none() {
                    c.prepare_cached(
                        "INSERT INTO keys (id, secret_hash, record) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (id) DO UPDATE SET secret_hash = excluded.secret_hash, \
                         record = excluded.record",
                    )?
                    .execute(params![id, hash, json])?;
                }
                Ok(other)
            })
            .await?;
        match taken {
            Some(other) => Err(LedgerError::Conflict(format!(
                "that secret already belongs to key {other}"
            ))),
            None => Ok(self.key_writes.fetch_add(1, Ordering::Relaxed) + 1),
        }
    }

    pub(super) async fn key_by_id(&self, id: &KeyId) -> Result<Option<KeyVersion>, LedgerError> {
        let id = id.0.clone();
        let json: Option<String> = self.readers.read(move |c| {
            c.prepare_cached("SELECT record FROM keys WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()
        })?;
        json.map(|j| Ok((parse_key(&j)?, 0))).transpose()
    }

    pub(super) async fn key_by_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<KeyVersion>, LedgerError> {
        let hash = secret_hash.to_string();
        let json: Option<String> = self.readers.read(move |c| {
            c.prepare_cached("SELECT record FROM keys WHERE secret_hash = ?1")?
                .query_row([hash], |r| r.get(0))
                .optional()
        })?;
        json.map(|j| Ok((parse_key(&j)?, 0))).transpose()
    }

    pub(super) async fn key_count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .readers
            .read(|c| c.query_row("SELECT count(*) FROM keys", [], |r| r.get(0)))?;
        Ok(to_u64(n))
    }

    pub(super) async fn keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        let all: Vec<String> = self.readers.read(|c| {
            let mut stmt = c.prepare_cached("SELECT record FROM keys ORDER BY id")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        all.iter().map(|j| parse_key(j)).collect()
    }

    /// At most `limit` key records in id order, after `after` (from the first
    /// when `None`): one short query, so loading or listing 100,000 keys never
    /// holds every record in memory at once.
    pub(super) async fn keys_page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyVersion>, LedgerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Every id sorts after '' (ids are never empty).
        let after = after.map_or("", |k| k.as_str());
        let page: Vec<String> = {
            let c = self
                .key_reader
                .lock()
                .map_err(|_| LedgerError::Storage("key reader connection poisoned".into()))?;
            let mut stmt = c
                .prepare_cached("SELECT record FROM keys WHERE id > ?1 ORDER BY id LIMIT ?2")
                .map_err(storage)?;
            let rows = stmt
                .query_map(params![after, limit], |r| r.get(0))
                .map_err(storage)?;
            rows.collect::<rusqlite::Result<_>>().map_err(storage)?
        };
        page.iter().map(|j| Ok((parse_key(j)?, 0))).collect()
    }
}

/// Replays the file's transfers and compares them with its accounts and chains,
/// from one read snapshot.
fn verify_conn(c: &Connection) -> rusqlite::Result<VerifyReport> {
    c.execute_batch("BEGIN")?;
    #[allow(clippy::type_complexity)]
    let res: rusqlite::Result<(
        Vec<TransferRow>,
        Vec<AccountRow>,
        Vec<ChainRow>,
        Vec<String>,
    )> = (|| {
        let t = load_transfers(c)?;
        let a = load_accounts(c)?;
        let ch = load_chains(c)?;
        let p = pending_mismatches(c)?;
        Ok((t, a, ch, p))
    })();
    let _ = c.execute_batch("COMMIT");
    let (t, a, ch, p) = res?;
    let mut report = replay_verify(&t, &a, &ch);
    report.mismatches.extend(p);
    Ok(report)
}

/// Verifies a ledger file without opening the ledger: read-only, no recovery,
/// safe while another process serves from the file.
pub(super) async fn verify_file(path: std::path::PathBuf) -> Result<VerifyReport, LedgerError> {
    tokio::task::spawn_blocking(move || {
        if !path.exists() {
            return Err(LedgerError::Storage(format!(
                "no ledger file at {}",
                path.display()
            )));
        }
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(storage)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(storage)?;
        verify_conn(&conn).map_err(storage)
    })
    .await
    .map_err(storage)?
}

/// Takes the single-writer lock of a ledger file: an SQLite file beside it
/// (`<ledger>-lock`) held in exclusive locking mode for as long as the returned
/// connection lives. The OS drops the lock when the process dies, even by
/// SIGKILL, so a restart is never locked out. A second writer (another process,
/// or a second open in this one) gets a clear error instead of silently
/// splitting the admission state.
fn take_writer_lock(path: &std::path::Path) -> Result<Connection, LedgerError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push("-lock");
    let conn = Connection::open(std::path::PathBuf::from(lock_path)).map_err(storage)?;
    conn.busy_timeout(std::time::Duration::from_millis(0))
        .map_err(storage)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(storage)?;
    conn.execute_batch(
        "BEGIN EXCLUSIVE; CREATE TABLE IF NOT EXISTS holder (pid INTEGER); \
         DELETE FROM holder; COMMIT;",
    )
    .map_err(|e| {
        LedgerError::Storage(format!(
            "the ledger file {} is in use by another process (or already open): {e}",
            path.display()
        ))
    })?;
    conn.execute("INSERT INTO holder (pid) VALUES (?1)", [std::process::id()])
        .map_err(storage)?;
    Ok(conn)
}

pub(super) fn parse_key(json: &str) -> Result<KeyRecord, LedgerError> {
    serde_json::from_str(json).map_err(|e| LedgerError::Storage(format!("bad key record: {e}")))
}

/// The answer to a reserve whose id is already taken.
pub(super) fn reserve_replay(
    key: &KeyId,
    id: &TransferId,
    stored_key: &str,
    points: u64,
    remaining: u64,
) -> Result<Reserved, LedgerError> {
    if stored_key != key.as_str() {
        return Err(LedgerError::Conflict(format!(
            "transfer {id} already belongs to another key"
        )));
    }
    Ok(Reserved {
        key: key.clone(),
        points: Points(points),
        remaining: Points(remaining),
    })
}

/// The answer for an Idempotency-Key whose first request never finished: its
/// gate stopped (found at open), or it has been in flight longer than
/// `pending_ttl_secs`, by which time its reservation was resolved by the
/// pending policy (a replica that crashed leaves such records in a shared
/// ledger). A definite answer, never a second upstream call that could charge
/// twice.
pub(super) fn interrupted_answer() -> StoredAnswer {
    StoredAnswer {
        status: 200,
        body: crate::envelope::error_body(
            crate::envelope::Code::Internal,
            "the first request with this Idempotency-Key was interrupted (its gate stopped); \
             its outcome is unknown and its reservation was settled by the pending policy",
        ),
    }
}

/// Compares a stored idempotency record with a new submit.
pub(super) fn idem_outcome(
    hash: &[u8],
    stored_hash: &[u8],
    state: &str,
    status: Option<i64>,
    body: Option<Vec<u8>>,
) -> IdemBegin {
    if stored_hash != hash {
        return IdemBegin::Mismatch;
    }
    match (state, status) {
        ("done", Some(status)) => IdemBegin::Replay(StoredAnswer {
            status: u16::try_from(status).unwrap_or(500),
            body: body.unwrap_or_default(),
        }),
        _ => IdemBegin::InFlight,
    }
}

/// The task registry, stored beside the ledger so it is as durable as the charges.
impl SqliteLedger {
    /// One process owns the file, so nothing changes behind its back: every call
    /// returns all keys (the gate does not poll an embedded ledger).
    pub(super) async fn keys_since(&self, cursor: &KeyCursor) -> Result<KeyChanges, LedgerError> {
        let keys = self.keys().await?.into_iter().map(|k| (k, 0)).collect();
        Ok(KeyChanges {
            keys,
            gone: Vec::new(),
            next: cursor.clone(),
        })
    }

    pub(super) async fn put_task(&self, rec: &TaskRecord) -> Result<(), LedgerError> {
        let row = TaskRow::of(rec)?;
        self.custom(move |c| row.insert(c)).await.map(|_| ())
    }

    pub(super) async fn task(&self, id: &str) -> Result<Option<TaskRecord>, LedgerError> {
        let id = id.to_owned();
        let row = self
            .custom(move |c| {
                c.prepare_cached("SELECT state, record FROM tasks WHERE task_id = ?1")?
                    .query_row([id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()
            })
            .await?;
        row.map(|(s, j)| task_from_row(&s, &j)).transpose()
    }

    pub(super) async fn end_task(
        &self,
        id: &str,
        state: TaskState,
        at_ms: i64,
    ) -> Result<bool, LedgerError> {
        let id = id.to_owned();
        let n = self
            .custom(move |c| {
                c.prepare_cached(
                    "UPDATE tasks SET state = ?2, checked_ms = ?3 WHERE task_id = ?1 AND state = 'open'",
                )?
                .execute(params![id, super::stored_end(state), at_ms])
            })
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn due_tasks(
        &self,
        due: super::Due,
        checked_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, LedgerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .custom(move |c| {
                // The state is written out, not bound, so that the partial
                // index on it is used.
                let mut st = c.prepare_cached(match due {
                    super::Due::Check => {
                        "SELECT state, record FROM tasks WHERE state = 'open' AND checked_ms < ?1 \
                         ORDER BY checked_ms LIMIT ?2"
                    }
                    super::Due::Refund => {
                        "SELECT state, record FROM tasks WHERE state = 'refund_due' \
                         AND checked_ms < ?1 ORDER BY checked_ms LIMIT ?2"
                    }
                })?;
                let rows = st.query_map(params![checked_before_ms, limit], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.iter().map(|(s, j)| task_from_row(s, j)).collect()
    }

    pub(super) async fn refund_recorded(&self, id: &str) -> Result<(), LedgerError> {
        let id = id.to_owned();
        self.custom(move |c| {
            c.prepare_cached(
                "UPDATE tasks SET state = 'fail' WHERE task_id = ?1 AND state = 'refund_due'",
            )?
            .execute(params![id])
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn touch_task(&self, id: &str, at_ms: i64) -> Result<(), LedgerError> {
        let id = id.to_owned();
        self.custom(move |c| {
            c.prepare_cached("UPDATE tasks SET checked_ms = ?2 WHERE task_id = ?1")?
                .execute(params![id, at_ms])
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn open_task_counts(&self) -> Result<Vec<(KeyId, u32)>, LedgerError> {
        self.custom(|c| {
            let mut st = c.prepare_cached(
                "SELECT key, COUNT(*) FROM tasks WHERE state = 'open' GROUP BY key",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    KeyId(r.get::<_, String>(0)?),
                    u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
    }
}

/// A task row: the JSON record, with the `state` column as the authority.
pub(super) fn task_from_row(state: &str, json: &str) -> Result<TaskRecord, LedgerError> {
    let mut rec: TaskRecord = serde_json::from_str(json).map_err(storage)?;
    rec.state = state.parse().map_err(storage)?;
    Ok(rec)
}
