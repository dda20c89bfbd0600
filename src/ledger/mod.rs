//! The ledger: every point a client key may spend, reserved, settled and
//! recorded, with an embedded SQLite backend (the default) and a PostgreSQL
//! backend for a fleet of gate replicas sharing budgets.
//!
//! # Invariants
//!
//! These hold in both backends; [`Ledger::verify`] proves them from the records.
//!
//! 1. **Money moves only as transfers.** Every change to an account (opening,
//!    budget change, top-up, period change, reservation, commit, void, refund,
//!    period reset) is an immutable transfer row with who made it and why.
//!    Account rows (budget, spent, reserved, period window) are a consequence
//!    of the transfers and can always be recomputed from them.
//! 2. **Never overdrawn by admission.** A reservation is admitted only if
//!    `spent + reserved + points <= budget`, decided in one atomic step (an
//!    in-memory compare-and-update under the account's lock for SQLite, one
//!    conditional `UPDATE` for PostgreSQL) — never a read followed by a write.
//!    Only a commit larger than its reservation may push `spent` past the
//!    budget; the excess is recorded as the commit's `overage`.
//! 3. **Each transfer is applied once.** A transfer chain (one id) is reserved
//!    once, then exactly one of committed or voided, and a committed chain is
//!    refunded at most once. Replaying any transition with the same id returns
//!    the first result and changes nothing; a contradicting transition (commit
//!    after void, void after commit, refund of an uncommitted chain) is a
//!    [`LedgerError::Conflict`].
//! 4. **Durable before Ok.** A reservation or settlement is committed to the
//!    store (fsynced for SQLite) before the call returns `Ok`, so the gate never
//!    forwards a request whose reservation could be lost, and never answers a
//!    client before its charge is recorded. Group commit batches many callers
//!    into one transaction so durability does not cap throughput.
//! 5. **No reservation leaks.** Pending reservations older than
//!    `pending_ttl_secs` are resolved by [`PendingPolicy`] via
//!    [`Ledger::expire_pending`], and those left by a crash are resolved by the
//!    same policy when the ledger is opened, with a record that says so.
//! 6. **Periods reset lazily.** An account with a [`Period`] counts `spent`
//!    within the current window (day, ISO week starting Monday, or month in
//!    the configured timezone). The reset is applied when the account is next
//!    moved and recorded on that transfer (`reset_spent`); reads show the
//!    reset value without writing. There is no timer job.
//!
//! # Failure model
//!
//! A storage error while writing makes the embedded ledger refuse all further
//! operations (fail-stop): its in-memory admission state can no longer be
//! trusted to match the file, and reopening rebuilds it from the file.

mod cli;
mod idfilter;

/// What [`Ledger::due_tasks`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Open tasks nobody asked about lately: the background check.
    Check,
    /// Failed tasks whose refund is not recorded: the refund sweep.
    Refund,
}

/// The stored state of a task that ended in `fail` before its refund is
/// recorded; read back as [`TaskState::Fail`].
pub const REFUND_DUE: &str = "refund_due";

/// The state column's value for a task that ended in `state`.
fn stored_end(state: TaskState) -> &'static str {
    match state {
        TaskState::Fail => REFUND_DUE,
        other => other.as_str(),
    }
}
/// A task's row in the `tasks` table of either store, made on the caller's
/// thread (the record serialized once).
struct TaskRow {
    task_id: String,
    key: String,
    state: &'static str,
    created_ms: i64,
    record: String,
}

impl TaskRow {
    fn of(rec: &TaskRecord) -> Result<TaskRow, LedgerError> {
        Ok(TaskRow {
            task_id: rec.task_id.clone(),
            key: rec.key.0.clone(),
            state: rec.state.as_str(),
            created_ms: rec.created_at.timestamp_millis(),
            record: serde_json::to_string(rec).map_err(|e| LedgerError::Storage(e.to_string()))?,
        })
    }
}

mod pgbatch;
mod pgnotify;
mod postgres;
mod sqlite;

pub use cli::verify_cmd;

use crate::clock::SharedClock;
use crate::keys::KeyRecord;
use crate::points::{KeyId, Points, TransferId};
use crate::tasks::{TaskRecord, TaskState};
use chrono::{DateTime, Datelike, Days, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Which store keeps the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// An SQLite file, one process (the default, zero setup).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by several gate replicas.
    Postgres,
}

/// What happens to a pending reservation that is never settled (crash or expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PendingPolicy {
    /// Charge the reserved points: the upstream may have run the task.
    #[default]
    Charge,
    /// Release the reserved points.
    Void,
}

/// Which failures a committed ledger write survives. The gate forwards a request
/// only after its reservation is committed and answers only after the settle is,
/// so this decides what a failure at the wrong moment can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every commit is on disk before anyone acts on it (SQLite
    /// `synchronous=FULL`; PostgreSQL `synchronous_commit=on`): a power cut
    /// loses nothing the gate acted on.
    #[default]
    PowerLoss,
    /// A commit is handed to the operating system (SQLite `synchronous=NORMAL`)
    /// or to the server's memory (PostgreSQL `synchronous_commit=off`) and
    /// flushed soon after. A crash of the gate loses nothing; a power cut or
    /// kernel crash (SQLite) or a server crash (PostgreSQL) can lose the last
    /// moments of commits, so requests forwarded then go unbilled. The file
    /// stays consistent either way.
    ProcessCrash,
}

impl Durability {
    /// The name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::PowerLoss => "power-loss",
            Durability::ProcessCrash => "process-crash",
        }
    }
}

/// The `[ledger]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Which store to use.
    pub backend: BackendKind,
    /// SQLite file; the config loader fills `<data_dir>/ledger.db` when unset.
    pub path: Option<std::path::PathBuf>,
    /// PostgreSQL connection URL (`postgres://...`).
    pub url: Option<String>,
    /// PostgreSQL pool size.
    pub pool_size: usize,
    /// How crash-orphaned and expired reservations are resolved.
    pub pending_policy: PendingPolicy,
    /// Age after which a pending reservation is resolved by the policy.
    pub pending_ttl_secs: u64,
    /// Which failures a commit survives.
    pub durability: Durability,
    /// IANA timezone for budget periods.
    pub timezone: String,
    /// This replica's name; PostgreSQL pending reservations are owned by it so
    /// that a restarting replica resolves only its own orphans.
    pub instance: Option<String>,
    /// PostgreSQL schema to use (created if missing); `None` = the server's
    /// default `search_path`. Lets tests and tenants share one database.
    pub schema: Option<String>,
    /// With PostgreSQL, how often each replica asks the store for keys changed
    /// elsewhere. Changes are also pushed (`LISTEN`), so this is the fallback
    /// for when the push is not available.
    pub key_poll_secs: u64,
    /// With PostgreSQL, how long a request whose upstream answer is in hand
    /// keeps trying to write its settlement while the store is unreachable (a
    /// failover, a restart) before it is answered with an error and its
    /// reservation is left to `pending_policy`.
    pub settle_retry_secs: u64,
    /// With PostgreSQL, how long a statement of the gate waits for a row lock
    /// held elsewhere (an operator's open transaction) before it fails: the
    /// session's `lock_timeout`. 0 waits for ever.
    pub lock_timeout_ms: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            backend: BackendKind::Sqlite,
            path: None,
            url: None,
            pool_size: 16,
            pending_policy: PendingPolicy::Charge,
            pending_ttl_secs: 600,
            durability: Durability::PowerLoss,
            timezone: "Asia/Shanghai".to_string(),
            instance: None,
            schema: None,
            key_poll_secs: 1,
            settle_retry_secs: 10,
            lock_timeout_ms: 2_000,
        }
    }
}

impl LedgerConfig {
    /// Whether the store is shared by replicas (PostgreSQL): what each gate
    /// holds in memory (key cache, task counts) is then only its own view.
    pub fn shared(&self) -> bool {
        self.backend == BackendKind::Postgres
    }

    fn tz(&self) -> Result<chrono_tz::Tz, LedgerError> {
        self.timezone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| LedgerError::Config(format!("unknown timezone {:?}", self.timezone)))
    }

    fn instance_name(&self) -> String {
        if let Some(name) = &self.instance {
            return name.clone();
        }
        if let Ok(name) = std::env::var("HOSTNAME") {
            if !name.is_empty() {
                return name;
            }
        }
        if let Ok(name) = std::fs::read_to_string("/etc/hostname") {
            let name = name.trim();
            if !name.is_empty() {
                return name.to_string();
            }
        }
        format!("gate-{:016x}", rand::random::<u64>())
    }
}

/// A budget period: how often an account's spend starts again from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// The budget is a lifetime total.
    None,
    /// Resets at local midnight.
    Day,
    /// Resets at local midnight starting Monday.
    Week,
    /// Resets at local midnight on the first of the month.
    Month,
}

impl Period {
    /// The name used in records and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::None => "none",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Period {
    type Err = LedgerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Period::None),
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            other => Err(LedgerError::Config(format!(
                "unknown period {other:?} (none, day, week, month)"
            ))),
        }
    }
}

/// An account as the gate and operators see it, with any due period reset applied.
#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    /// The key the account belongs to.
    pub key: KeyId,
    /// Points the key may spend (per period, when it has one).
    pub budget: Points,
    /// Points charged (in the current window).
    pub spent: Points,
    /// Points held by pending reservations.
    pub reserved: Points,
    /// `budget - spent - reserved`, floored at zero.
    pub remaining: Points,
    /// The budget period.
    pub period: Period,
    /// Start of the current window (`None` without a period).
    pub window_start: Option<DateTime<Utc>>,
    /// End of the current window (`None` without a period).
    pub window_end: Option<DateTime<Utc>>,
}

/// A successful reservation.
#[derive(Debug, Clone, Serialize)]
pub struct Reserved {
    /// The account charged.
    pub key: KeyId,
    /// Points held.
    pub points: Points,
    /// What remained right after the reservation.
    pub remaining: Points,
}

/// How a transfer chain was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SettleKind {
    /// Charged.
    Commit,
    /// Released without charge.
    Void,
    /// A committed charge given back.
    Refund,
}

impl SettleKind {
    /// The name used in records (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            SettleKind::Commit => "commit",
            SettleKind::Void => "void",
            SettleKind::Refund => "refund",
        }
    }
}

/// The outcome of a settlement (commit, void or refund).
#[derive(Debug, Clone, Serialize)]
pub struct Settled {
    /// The account.
    pub key: KeyId,
    /// The transfer chain.
    pub id: TransferId,
    /// What happened.
    pub kind: SettleKind,
    /// Points charged (commit), released (void) or given back (refund).
    pub points: Points,
    /// Points charged beyond the budget by this commit, recorded.
    pub overage: Points,
    /// What remained right after the settlement.
    pub remaining: Points,
    /// True when this call was a replay of an earlier identical transition.
    pub replay: bool,
}

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The reservation does not fit in the remaining budget.
    #[error("insufficient budget: this request costs {needed} points, {remaining} remain")]
    Insufficient {
        /// What the request would cost.
        needed: Points,
        /// What remains.
        remaining: Points,
    },
    /// No account for this key.
    #[error("no ledger account for key {0}")]
    UnknownAccount(KeyId),
    /// The shared store says the key may not be used with the secret given:
    /// disabled, expired or rotated since this gate last read it.
    #[error("key {0} is disabled, expired or rotated in the shared store")]
    KeyRefused(KeyId),
    /// The shared store counts as many of the key's tasks in flight, on all
    /// replicas together, as its limit allows.
    #[error("concurrent-task limit reached: {limit} tasks of this key are still running")]
    TaskLimit {
        /// The key's limit.
        limit: u32,
    },
    /// The key's submits, on all replicas together, used up its token bucket
    /// in the shared store.
    #[error("rate limit reached: at most {rps} submits per second for this key")]
    RateLimit {
        /// The key's rate.
        rps: u32,
    },
    /// No transfer chain with this id.
    #[error("no ledger transfer {0}")]
    UnknownTransfer(TransferId),
    /// The transition contradicts an earlier one (commit after void, ...).
    #[error("ledger conflict: {0}")]
    Conflict(String),
    /// The store failed; the operation did not happen (or, for the embedded
    /// ledger, the ledger stopped and must be reopened).
    #[error("ledger storage error: {0}")]
    Storage(String),
    /// The configuration is unusable.
    #[error("ledger configuration error: {0}")]
    Config(String),
}

/// A key record and the store's version of it: the PostgreSQL change sequence,
/// or for the embedded ledger a number its own process gives each write (its
/// reads are version 0). See `KeyCache::put`.
pub type KeyVersion = (KeyRecord, u64);

/// Where a replica's poll for changed keys ([`Ledger::keys_since`]) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCursor {
    /// The embedded ledger: one process owns the file, so there is nothing to
    /// poll for.
    Embedded,
    /// PostgreSQL: the snapshot of the store's transactions (committed and
    /// running, in `pg_snapshot` text form) that the last poll read with.
    Snapshot(String),
}

/// What a replica's poll ([`Ledger::keys_since`]) read.
#[derive(Debug, Clone)]
pub struct KeyChanges {
    /// Keys written, each with its version.
    pub keys: Vec<KeyVersion>,
    /// Keys whose rows were deleted behind the gate's back, each with the
    /// version of its deletion: a copy held at an earlier version is gone.
    pub gone: Vec<(KeyId, u64)>,
    /// Where the next poll starts.
    pub next: KeyCursor,
}

/// Outcome of beginning a client-supplied `Idempotency-Key` submit (scoped to the key).
#[derive(Debug, Clone)]
pub enum IdemBegin {
    /// First time: go ahead, then call `idem_finish` or `idem_abandon`.
    New,
    /// The same submit is being handled right now.
    InFlight,
    /// Already answered: send this answer again.
    Replay(StoredAnswer),
    /// The same idempotency key was used with a different body.
    Mismatch,
}

/// The answer stored for an idempotent submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// HTTP status.
    pub status: u16,
    /// Response body bytes.
    pub body: Vec<u8>,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Accounts checked.
    pub accounts: usize,
    /// Transfers replayed.
    pub transfers: usize,
    /// Pending reservations.
    pub pending: usize,
    /// Every disagreement between the records and the account/chain rows.
    pub mismatches: Vec<String>,
}

impl VerifyReport {
    /// True when the records and the balances agree.
    pub fn is_clean(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// A cheap-to-clone handle on the ledger.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Backend>,
    clock: SharedClock,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.inner {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        };
        f.debug_struct("Ledger").field("backend", &kind).finish()
    }
}

/// Enum dispatch keeps the API free of `dyn` and async-trait. There is one
/// value per ledger, behind the handle's `Arc`, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Sqlite(sqlite::SqliteLedger),
    Postgres(postgres::PgLedger),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match &*$self.inner {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

impl Ledger {
    /// Opens the ledger: applies the embedded schema migrations, then resolves
    /// reservations left pending by a crash according to the policy (SQLite:
    /// all of them; PostgreSQL: those owned by this `instance`), recording that.
    pub async fn open(cfg: &LedgerConfig, clock: SharedClock) -> Result<Ledger, LedgerError> {
        Ledger::open_sparing(cfg, clock, &[]).await
    }

    /// As [`Ledger::open`], leaving the reservations `spare` pending: the gate
    /// holds their settlements (`crate::held`) and writes them next, so the
    /// policy must not decide them first. Only a shared store's gate holds
    /// settlements; the embedded ledger is never given any.
    pub async fn open_sparing(
        cfg: &LedgerConfig,
        clock: SharedClock,
        spare: &[TransferId],
    ) -> Result<Ledger, LedgerError> {
        let backend = match cfg.backend {
            BackendKind::Sqlite => {
                Backend::Sqlite(sqlite::SqliteLedger::open(cfg, clock.clone()).await?)
            }
            BackendKind::Postgres => {
                Backend::Postgres(postgres::PgLedger::open(cfg, clock.clone(), spare).await?)
            }
        };
        Ok(Ledger {
            inner: Arc::new(backend),
            clock,
        })
    }

    /// Verifies the store named by `cfg` without opening the ledger: read-only,
    /// no migrations, no crash recovery — safe while a gate serves from it.
    /// Reservations a crashed gate left pending count as pending, not as
    /// mismatches; the next open resolves them.
    pub async fn verify_store(cfg: &LedgerConfig) -> Result<VerifyReport, LedgerError> {
        match cfg.backend {
            BackendKind::Sqlite => {
                let path = cfg
                    .path
                    .clone()
                    .ok_or_else(|| LedgerError::Config("ledger.path is not set".into()))?;
                sqlite::verify_file(path).await
            }
            BackendKind::Postgres => postgres::verify_url(cfg).await,
        }
    }

    /// Opens an account for a key. An existing account is a `Conflict`.
    pub async fn open_account(
        &self,
        key: &KeyId,
        budget: Points,
        period: Period,
        actor: &str,
        note: &str,
    ) -> Result<AccountView, LedgerError> {
        let op = AdminOp::Open { budget, period };
        dispatch!(self, b => b.admin(key, op, actor, note).await)
    }

    /// Sets the budget (a `budget` transfer).
    pub async fn set_budget(
        &self,
        key: &KeyId,
        budget: Points,
        actor: &str,
        note: &str,
    ) -> Result<AccountView, LedgerError> {
        dispatch!(self, b => b.admin(key, AdminOp::Budget(budget), actor, note).await)
    }

    /// Raises the budget by `points` (a `topup` transfer).
    pub async fn top_up(
        &self,
        key: &KeyId,
        points: Points,
        actor: &str,
        note: &str,
    ) -> Result<AccountView, LedgerError> {
        dispatch!(self, b => b.admin(key, AdminOp::TopUp(points), actor, note).await)
    }

    /// Changes the budget period; the current window starts now's window.
    pub async fn set_period(
        &self,
        key: &KeyId,
        period: Period,
        actor: &str,
        note: &str,
    ) -> Result<AccountView, LedgerError> {
        dispatch!(self, b => b.admin(key, AdminOp::Period(period), actor, note).await)
    }

    /// One account, with any due period reset shown.
    pub async fn account(&self, key: &KeyId) -> Result<AccountView, LedgerError> {
        dispatch!(self, b => b.account(key).await)
    }

    /// All accounts, ordered by key.
    pub async fn accounts(&self) -> Result<Vec<AccountView>, LedgerError> {
        dispatch!(self, b => b.accounts().await)
    }

    /// The accounts of `keys` that exist, ordered by key: what a page of keys or
    /// the keys active since start need, without building every account's view.
    pub async fn accounts_of(&self, keys: &[KeyId]) -> Result<Vec<AccountView>, LedgerError> {
        let mut out = dispatch!(self, b => b.accounts_of(keys).await)?;
        // In Rust's order, not the database collation's.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Reserves `points` on `key` under transfer id `id`, durably, if they fit.
    pub async fn reserve(
        &self,
        key: &KeyId,
        points: Points,
        id: &TransferId,
    ) -> Result<Reserved, LedgerError> {
        self.reserve_as(key, KeyTerms::default(), points, id).await
    }

    /// [`Ledger::reserve`] for a request on the terms of its key. A shared
    /// store makes the reservation only if, in the store and at that moment,
    /// the key is enabled, unexpired and still has the secret presented (else
    /// `KeyRefused`): a key disabled or rotated on one replica pays for nothing
    /// more on any other, whatever their caches hold; and only if the key's
    /// tasks in flight on all replicas together are below its limit (else
    /// `TaskLimit`) and its submits on all replicas together are within its
    /// rate (else `RateLimit`). The embedded ledger has one writer, whose cache
    /// and counts are the truth: it leaves all three to the gate.
    pub async fn reserve_as(
        &self,
        key: &KeyId,
        terms: KeyTerms<'_>,
        points: Points,
        id: &TransferId,
    ) -> Result<Reserved, LedgerError> {
        match &*self.inner {
            Backend::Sqlite(b) => b.reserve(key, points, id).await,
            Backend::Postgres(b) => b.reserve(key, terms, points, id).await,
        }
    }

    /// With a shared store, sets each account's count of tasks in flight to
    /// what its chains and tasks say, where the two differ (replicas of an
    /// older version, during an upgrade, do not count); the keys corrected.
    /// Nothing to do for the embedded ledger, whose gate counts in memory.
    pub async fn heal_in_flight(&self) -> Result<Vec<KeyId>, LedgerError> {
        match &*self.inner {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(b) => b.heal_in_flight().await,
        }
    }

    /// With a shared store, the tasks in flight of all keys on all replicas
    /// (`None` for the embedded ledger).
    pub async fn fleet_in_flight(&self) -> Result<Option<u64>, LedgerError> {
        match &*self.inner {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(b) => b.fleet_in_flight().await.map(Some),
        }
    }

    /// Charges `points` (which may differ from the reservation) and releases the
    /// reservation, durably.
    pub async fn commit(&self, id: &TransferId, points: Points) -> Result<Settled, LedgerError> {
        let how = Settle::Commit(points);
        dispatch!(self, b => b.settle(id, how, "gate", "", None).await)
    }

    /// [`Ledger::commit`] of a request that started an upstream task, and the
    /// task's registration, in one durable write: the task is registered
    /// exactly when its charge is committed (a replay or a refusal of the
    /// commit registers nothing), and with a shared store it keeps the
    /// reservation's place in the key's tasks in flight.
    pub async fn commit_task(
        &self,
        id: &TransferId,
        points: Points,
        task: &TaskRecord,
    ) -> Result<Settled, LedgerError> {
        let how = Settle::Commit(points);
        dispatch!(self, b => b.settle(id, how, "gate", "", Some(task)).await)
    }

    /// Releases the reservation without charge, durably.
    pub async fn void(&self, id: &TransferId) -> Result<Settled, LedgerError> {
        dispatch!(self, b => b.settle(id, Settle::Void, "gate", "", None).await)
    }

    /// Gives a committed charge back, exactly once.
    pub async fn refund(&self, id: &TransferId) -> Result<Settled, LedgerError> {
        dispatch!(self, b => b.settle(id, Settle::Refund, "gate", "", None).await)
    }

    /// Resolves reservations pending longer than `pending_ttl_secs` by the policy.
    pub async fn expire_pending(&self) -> Result<Vec<Settled>, LedgerError> {
        self.expire_pending_sparing(&[]).await
    }

    /// As [`Ledger::expire_pending`], leaving the reservations `spare` pending:
    /// the gate holds their settlements (`crate::held`), decided by the
    /// upstream's answer, and writes them next.
    pub async fn expire_pending_sparing(
        &self,
        spare: &[TransferId],
    ) -> Result<Vec<Settled>, LedgerError> {
        dispatch!(self, b => b.expire_pending(spare).await)
    }

    /// Lets go of the in-memory copies of settled transfer chains that the
    /// embedded ledger keeps for quick replays (they stay in the file); nothing
    /// to do for PostgreSQL. Cheap; the gate calls it several times a second, so
    /// that the memory they take follows the request rate of the last second.
    pub fn forget_settled(&self) -> Result<(), LedgerError> {
        match &*self.inner {
            Backend::Sqlite(b) => b.forget_settled(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// The group commits that applied the gate's writes so far (`/metrics`).
    pub fn group_commits(&self) -> GroupCommitStats {
        use std::sync::atomic::Ordering::Relaxed;
        let g = dispatch!(self, b => b.group_commits());
        GroupCommitStats {
            transactions: g.transactions.load(Relaxed),
            writes: g.writes.load(Relaxed),
            rollbacks: g.rollbacks.load(Relaxed),
        }
    }

    /// How many reservations are pending.
    pub async fn pending_count(&self) -> Result<u64, LedgerError> {
        dispatch!(self, b => b.pending_count().await)
    }

    /// Recomputes every account and chain from the transfers and compares.
    pub async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        dispatch!(self, b => b.verify().await)
    }

    /// Proves the store is reachable and writable (for readiness checks).
    pub async fn ping(&self) -> Result<(), LedgerError> {
        dispatch!(self, b => b.ping().await)
    }

    /// The durability the store actually runs at, read back from it (SQLite's
    /// `synchronous` on the writer, PostgreSQL's `synchronous_commit` on a
    /// pooled session), so a server configured otherwise cannot pass unseen.
    pub async fn durability(&self) -> Result<Durability, LedgerError> {
        dispatch!(self, b => b.durability().await)
    }

    /// Flushes queued writes; further calls still work (SQLite) until drop.
    pub async fn close(&self) -> Result<(), LedgerError> {
        dispatch!(self, b => b.close().await)
    }

    /// Begins a client `Idempotency-Key` submit; `body_hash` is the SHA-256 of the body.
    pub async fn idem_begin(
        &self,
        key: &KeyId,
        idem_key: &str,
        body_hash: &[u8; 32],
    ) -> Result<IdemBegin, LedgerError> {
        dispatch!(self, b => b.idem_begin(key, idem_key, body_hash).await)
    }

    /// Stores the answer of an idempotent submit.
    pub async fn idem_finish(
        &self,
        key: &KeyId,
        idem_key: &str,
        answer: &StoredAnswer,
    ) -> Result<(), LedgerError> {
        dispatch!(self, b => b.idem_finish(key, idem_key, answer).await)
    }

    /// Forgets an in-flight submit that never reached the upstream.
    pub async fn idem_abandon(&self, key: &KeyId, idem_key: &str) -> Result<(), LedgerError> {
        dispatch!(self, b => b.idem_abandon(key, idem_key).await)
    }

    /// Inserts or replaces a key record by id and returns its new version; a
    /// `secret_hash` used by another key is a `Conflict`.
    pub async fn put_key(&self, rec: &KeyRecord) -> Result<u64, LedgerError> {
        dispatch!(self, b => b.put_key(rec).await)
    }

    /// A key record by id, with its version.
    pub async fn key_by_id(&self, id: &KeyId) -> Result<Option<KeyVersion>, LedgerError> {
        dispatch!(self, b => b.key_by_id(id).await)
    }

    /// A key record by the hex SHA-256 of its secret, with its version.
    pub async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyVersion>, LedgerError> {
        dispatch!(self, b => b.key_by_hash(secret_hash).await)
    }

    /// How many keys the store holds.
    pub async fn key_count(&self) -> Result<u64, LedgerError> {
        dispatch!(self, b => b.key_count().await)
    }

    /// All key records, ordered by id.
    pub async fn keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        dispatch!(self, b => b.keys().await)
    }

    /// Key records in id order: at most `limit` of those whose id comes after
    /// `after` (from the first when `None`). Pages let the gate load and list
    /// 100,000 keys without holding every record in memory at once.
    pub async fn keys_page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyVersion>, LedgerError> {
        dispatch!(self, b => b.keys_page(after, limit).await)
    }

    /// Keys changed since `cursor` (from [`Ledger::key_cursor`] at first) and
    /// the cursor to pass next time: replicas poll this to pick up changes
    /// made on others without reloading every key. Every change is read once
    /// it has committed, whatever order changes commit in, and so is the
    /// deletion of a key's row behind the gate's back (for an hour).
    pub async fn keys_since(&self, cursor: &KeyCursor) -> Result<KeyChanges, LedgerError> {
        dispatch!(self, b => b.keys_since(cursor).await)
    }

    /// The cursor to poll [`Ledger::keys_since`] from to see only changes made
    /// from now on.
    pub async fn key_cursor(&self) -> Result<KeyCursor, LedgerError> {
        match &*self.inner {
            Backend::Sqlite(_) => Ok(KeyCursor::Embedded),
            Backend::Postgres(b) => b.key_cursor().await,
        }
    }

    /// With a shared store, listens for key changes made anywhere (any
    /// replica, or `psql`) and wakes [`Ledger::key_watch`]'s `changed` for each,
    /// reconnecting after failures, for as long as the future runs. The
    /// embedded ledger, which nobody else changes, returns at once.
    pub async fn listen_keys(&self) {
        if let Backend::Postgres(b) = &*self.inner {
            b.listen_keys().await
        }
    }

    /// The key-change listener's state (`None` for the embedded ledger).
    pub fn key_watch(&self) -> Option<Arc<KeyWatch>> {
        match &*self.inner {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b.key_watch().clone()),
        }
    }

    /// Registers a task by itself (first write wins; a replay is a no-op). The
    /// gate registers the tasks it charges with their commit ([`Ledger::commit_task`]).
    pub async fn put_task(&self, rec: &TaskRecord) -> Result<(), LedgerError> {
        dispatch!(self, b => b.put_task(rec).await)
    }

    /// A registered task, by its upstream id.
    pub async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, LedgerError> {
        dispatch!(self, b => b.task(task_id).await)
    }

    /// Moves an open task to its end state in one conditional update. Returns
    /// `true` for exactly one caller however many race (polls, duplicate
    /// callbacks, replicas): that caller does what the end requires (refund).
    ///
    /// A task that ended in `fail` is stored as [`REFUND_DUE`] until
    /// [`Ledger::refund_recorded`]: if the refund never follows (the gate died
    /// in between, or the ledger refused it for a moment), [`Ledger::due_tasks`]
    /// with [`Due::Refund`] still finds it, and the refund, idempotent by id,
    /// is made then.
    pub async fn end_task(&self, task_id: &str, state: TaskState) -> Result<bool, LedgerError> {
        let now = self.now_ms();
        dispatch!(self, b => b.end_task(task_id, state, now).await)
    }

    /// Tasks that need the gate's attention, oldest first: open tasks not
    /// checked since `before` (for the background check), or failed tasks
    /// whose refund was not recorded and that ended before `before`.
    pub async fn due_tasks(
        &self,
        due: Due,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, LedgerError> {
        dispatch!(self, b => b.due_tasks(due, before.timestamp_millis(), limit).await)
    }

    /// Records that a failed task needs nothing more: its refund is made, or
    /// the ledger refused it for good (a no-op for any other task, and when
    /// repeated).
    pub async fn refund_recorded(&self, task_id: &str) -> Result<(), LedgerError> {
        dispatch!(self, b => b.refund_recorded(task_id).await)
    }

    /// Records that an open task was just checked.
    pub async fn touch_task(&self, task_id: &str) -> Result<(), LedgerError> {
        let now = self.now_ms();
        dispatch!(self, b => b.touch_task(task_id, now).await)
    }

    /// Open tasks per key (to restore concurrency counts at start).
    pub async fn open_task_counts(&self) -> Result<Vec<(KeyId, u32)>, LedgerError> {
        dispatch!(self, b => b.open_task_counts().await)
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().timestamp_millis()
    }
}

// ---------------------------------------------------------------------------
// Shared between the backends.

/// An administrative account change.
#[derive(Debug, Clone, Copy)]
enum AdminOp {
    Open { budget: Points, period: Period },
    Budget(Points),
    TopUp(Points),
    Period(Period),
}

impl AdminOp {
    fn kind(self) -> &'static str {
        match self {
            AdminOp::Open { .. } => "open",
            AdminOp::Budget(_) => "budget",
            AdminOp::TopUp(_) => "topup",
            AdminOp::Period(_) => "period",
        }
    }
}

/// A requested settlement.
/// Counts of the group commits a backend made.
#[derive(Debug, Default)]
struct GroupCommits {
    transactions: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
    rollbacks: std::sync::atomic::AtomicU64,
}

impl GroupCommits {
    fn committed(&self, writes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.transactions.fetch_add(1, Relaxed);
        self.writes.fetch_add(writes as u64, Relaxed);
    }

    fn rolled_back(&self) {
        self.rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a shared store checks about the key in the statement that reserves
/// (see [`Ledger::reserve_as`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyTerms<'a> {
    /// Hex SHA-256 of the secret the request presented: the key must be
    /// usable under it.
    pub secret_hash: Option<&'a str>,
    /// The key's limit on tasks in flight, on all replicas together.
    pub task_limit: Option<u32>,
    /// The key's submit rate, on all replicas together.
    pub rate: Option<SubmitRate>,
}

/// A key's token bucket: `per_sec` submits a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitRate {
    /// Tokens added per second (the key's `rps`), above zero.
    pub per_sec: u32,
    /// The bucket's size (the key's `burst`, or `rps`), at least one.
    pub burst: u32,
}

impl SubmitRate {
    /// The bucket of a key's `rps` and `burst`; `None` when it has no rate.
    pub fn of(rps: Option<u32>, burst: Option<u32>) -> Option<SubmitRate> {
        let per_sec = rps.filter(|r| *r > 0)?;
        Some(SubmitRate {
            per_sec,
            burst: burst.unwrap_or(per_sec).max(1),
        })
    }
}

/// What a shared store's key-change listener has seen (`/metrics`), and the
/// wake-up it gives the gate's key sync.
#[derive(Debug, Default)]
pub struct KeyWatch {
    /// Woken for every key change in this gate's store, and once on every
    /// (re)connection for what was missed meanwhile.
    pub changed: tokio::sync::Notify,
    /// Whether the listener is connected and listening now.
    pub connected: std::sync::atomic::AtomicBool,
    /// Connections the listener made (the first, then each reconnection).
    pub connections: std::sync::atomic::AtomicU64,
    /// Key-change notifications received for this gate's store.
    pub notifications: std::sync::atomic::AtomicU64,
}

/// The ledger's group commits since it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Transactions that applied the gate's writes (reservations,
    /// settlements, task registrations).
    pub transactions: u64,
    /// The writes in them; `writes / transactions` is the mean group.
    pub writes: u64,
    /// Group commits that failed and were rolled back (PostgreSQL: their
    /// writes were then run one by one; SQLite: the ledger stopped).
    pub rollbacks: u64,
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Commit(Points),
    Void,
    Refund,
}

impl Settle {
    fn kind(self) -> SettleKind {
        match self {
            Settle::Commit(_) => SettleKind::Commit,
            Settle::Void => SettleKind::Void,
            Settle::Refund => SettleKind::Refund,
        }
    }
}

/// The state of a transfer chain as stored in the `chains` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainState {
    Pending,
    Committed,
    Voided,
    Refunded,
}

impl ChainState {
    fn as_str(self) -> &'static str {
        match self {
            ChainState::Pending => "pending",
            ChainState::Committed => "committed",
            ChainState::Voided => "voided",
            ChainState::Refunded => "refunded",
        }
    }

    fn parse(s: &str) -> Option<ChainState> {
        match s {
            "pending" => Some(ChainState::Pending),
            "committed" => Some(ChainState::Committed),
            "voided" => Some(ChainState::Voided),
            "refunded" => Some(ChainState::Refunded),
            _ => None,
        }
    }
}

/// What an attempted settlement of a chain in `state` means when it cannot be
/// applied: a replay of the same transition, or a conflict.
fn settle_refusal(id: &TransferId, how: Settle, state: ChainState) -> Refusal {
    use ChainState::*;
    match (how, state) {
        (Settle::Commit(_), Committed | Refunded) => Refusal::Replay(SettleKind::Commit),
        (Settle::Void, Voided) => Refusal::Replay(SettleKind::Void),
        (Settle::Refund, Refunded) => Refusal::Replay(SettleKind::Refund),
        (Settle::Commit(_), Voided) => {
            Refusal::Conflict(format!("transfer {id} was voided; it cannot be committed"))
        }
        (Settle::Void, Committed | Refunded) => {
            Refusal::Conflict(format!("transfer {id} was committed; it cannot be voided"))
        }
        (Settle::Refund, Pending) => Refusal::Conflict(format!(
            "transfer {id} is pending; only a committed transfer can be refunded"
        )),
        (Settle::Refund, Voided) => Refusal::Conflict(format!(
            "transfer {id} was voided; only a committed transfer can be refunded"
        )),
        // The transition is allowed; the caller raced with another transition
        // that had not landed when it looked.
        (Settle::Commit(_) | Settle::Void, Pending) | (Settle::Refund, Committed) => {
            Refusal::Conflict(format!("transfer {id} is being settled concurrently"))
        }
    }
}

enum Refusal {
    Replay(SettleKind),
    Conflict(String),
}

/// Account fields as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AccountState {
    budget: u64,
    spent: u64,
    reserved: u64,
    period: Period,
    /// Start of the window `spent` belongs to, in ms (0 without a period).
    window_ms: i64,
}

impl AccountState {
    fn remaining(&self) -> u64 {
        self.budget
            .saturating_sub(self.spent)
            .saturating_sub(self.reserved)
    }

    /// Applies a due period reset; returns the spend that was reset.
    fn reset_if_due(&mut self, now_ms: i64, tz: chrono_tz::Tz) -> Option<u64> {
        let current = window_start_ms(self.period, tz, now_ms)?;
        if self.window_ms < current {
            let old = self.spent;
            self.spent = 0;
            self.window_ms = current;
            Some(old)
        } else {
            None
        }
    }

    fn view(&self, key: &KeyId, now_ms: i64, tz: chrono_tz::Tz) -> AccountView {
        let mut s = *self;
        s.reset_if_due(now_ms, tz);
        let (start, end) = match window_start_ms(s.period, tz, now_ms) {
            Some(_) => (
                DateTime::from_timestamp_millis(s.window_ms),
                DateTime::from_timestamp_millis(window_end_ms(s.period, tz, s.window_ms)),
            ),
            None => (None, None),
        };
        AccountView {
            key: key.clone(),
            budget: Points(s.budget),
            spent: Points(s.spent),
            reserved: Points(s.reserved),
            remaining: Points(s.remaining()),
            period: s.period,
            window_start: start,
            window_end: end,
        }
    }
}

/// Local midnight of `date`, as UTC ms (the earliest instant if DST makes it ambiguous,
/// the first valid instant after a DST gap).
fn local_midnight_ms(tz: chrono_tz::Tz, date: NaiveDate) -> i64 {
    let naive = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&naive).earliest() {
        Some(t) => t.timestamp_millis(),
        None => {
            let later = naive + chrono::Duration::hours(1);
            tz.from_local_datetime(&later)
                .earliest()
                .map(|t| t.timestamp_millis())
                .unwrap_or_else(|| naive.and_utc().timestamp_millis())
        }
    }
}

fn first_day(period: Period, date: NaiveDate) -> NaiveDate {
    match period {
        Period::None | Period::Day => date,
        Period::Week => date
            .checked_sub_days(Days::new(u64::from(date.weekday().num_days_from_monday())))
            .unwrap_or(date),
        Period::Month => date.with_day(1).unwrap_or(date),
    }
}

/// The start of the window containing `now_ms`, or `None` for `Period::None`.
fn window_start_ms(period: Period, tz: chrono_tz::Tz, now_ms: i64) -> Option<i64> {
    if period == Period::None {
        return None;
    }
    let now = DateTime::from_timestamp_millis(now_ms)?;
    let local = now.with_timezone(&tz).date_naive();
    Some(local_midnight_ms(tz, first_day(period, local)))
}

/// The end of the window that starts at `start_ms`.
fn window_end_ms(period: Period, tz: chrono_tz::Tz, start_ms: i64) -> i64 {
    let Some(start) = DateTime::from_timestamp_millis(start_ms) else {
        return start_ms;
    };
    let date = start.with_timezone(&tz).date_naive();
    let next = match period {
        Period::None => return start_ms,
        Period::Day => date.checked_add_days(Days::new(1)),
        Period::Week => date.checked_add_days(Days::new(7)),
        Period::Month => date.checked_add_months(chrono::Months::new(1)),
    };
    next.map(|d| local_midnight_ms(tz, first_day(period, d)))
        .unwrap_or(start_ms)
}

/// The window fields for a newly opened account or a period change.
fn window_for(period: Period, tz: chrono_tz::Tz, now_ms: i64) -> i64 {
    window_start_ms(period, tz, now_ms).unwrap_or(0)
}

/// One stored transfer row, as verify replays it.
#[derive(Debug, Clone)]
struct TransferRow {
    seq: i64,
    id: Option<String>,
    key: String,
    kind: String,
    points: i64,
    period: Option<String>,
    window_ms: Option<i64>,
    reset_spent: Option<i64>,
}

/// One stored account row.
#[derive(Debug, Clone)]
struct AccountRow {
    key: String,
    state: AccountState,
}

/// One stored chain row.
#[derive(Debug, Clone)]
struct ChainRow {
    id: String,
    key: String,
    reserved: i64,
    state: String,
    settled: Option<i64>,
}

fn to_i64(p: u64) -> Result<i64, LedgerError> {
    i64::try_from(p).map_err(|_| LedgerError::Conflict(format!("{p} points is out of range")))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Replays the transfers in order and compares the result with the stored
/// accounts and chains. Both backends call this with rows read from their store.
fn replay_verify(
    transfers: &[TransferRow],
    accounts: &[AccountRow],
    chains: &[ChainRow],
) -> VerifyReport {
    #[derive(Clone, Copy)]
    struct Ch {
        reserved: i128,
        state: ChainState,
        settled: Option<i128>,
    }
    let mut mismatches = Vec::new();
    // Signed and wide so that a corrupt history shows up as a mismatch, not a panic.
    let mut accs: HashMap<&str, (i128, i128, i128, String, i64)> = HashMap::new();
    let mut chs: HashMap<&str, (String, Ch)> = HashMap::new();
    for t in transfers {
        let Some(acc) = (if t.kind == "open" {
            if accs.contains_key(t.key.as_str()) {
                mismatches.push(format!(
                    "transfer {}: account {} opened twice",
                    t.seq, t.key
                ));
            }
            accs.insert(
                t.key.as_str(),
                (
                    i128::from(t.points),
                    0,
                    0,
                    t.period.clone().unwrap_or_else(|| "none".into()),
                    t.window_ms.unwrap_or(0),
                ),
            );
            continue;
        } else {
            accs.get_mut(t.key.as_str())
        }) else {
            mismatches.push(format!(
                "transfer {} ({}) for account {} that was never opened",
                t.seq, t.kind, t.key
            ));
            continue;
        };
        if let Some(old) = t.reset_spent {
            if acc.1 != i128::from(old) {
                mismatches.push(format!(
                    "transfer {}: period reset of {} records spent {old}, replay has {}",
                    t.seq, t.key, acc.1
                ));
            }
            acc.1 = 0;
            acc.4 = t.window_ms.unwrap_or(acc.4);
        }
        let p = i128::from(t.points);
        let id = t.id.as_deref().unwrap_or("");
        match t.kind.as_str() {
            "budget" => acc.0 = p,
            "topup" => acc.0 += p,
            "period" => {
                acc.3 = t.period.clone().unwrap_or_else(|| "none".into());
                acc.4 = t.window_ms.unwrap_or(0);
            }
            "reserve" => {
                if chs.contains_key(id) {
                    mismatches.push(format!("transfer {}: chain {id} reserved twice", t.seq));
                    continue;
                }
                acc.2 += p;
                chs.insert(
                    id,
                    (
                        t.key.clone(),
                        Ch {
                            reserved: p,
                            state: ChainState::Pending,
                            settled: None,
                        },
                    ),
                );
            }
            "commit" | "void" | "refund" => {
                let Some((ckey, ch)) = chs.get_mut(id) else {
                    mismatches.push(format!(
                        "transfer {}: {} of unknown chain {id}",
                        t.seq, t.kind
                    ));
                    continue;
                };
                if *ckey != t.key {
                    mismatches.push(format!(
                        "transfer {}: chain {id} belongs to {ckey}, not {}",
                        t.seq, t.key
                    ));
                }
                match (t.kind.as_str(), ch.state) {
                    ("commit", ChainState::Pending) => {
                        acc.2 -= ch.reserved;
                        acc.1 += p;
                        ch.state = ChainState::Committed;
                        ch.settled = Some(p);
                    }
                    ("void", ChainState::Pending) => {
                        acc.2 -= ch.reserved;
                        ch.state = ChainState::Voided;
                    }
                    ("refund", ChainState::Committed) => {
                        if ch.settled != Some(p) {
                            mismatches.push(format!(
                                "transfer {}: refund of {id} gives {p}, commit charged {:?}",
                                t.seq, ch.settled
                            ));
                        }
                        acc.1 = (acc.1 - p).max(0);
                        ch.state = ChainState::Refunded;
                    }
                    (kind, state) => mismatches.push(format!(
                        "transfer {}: {kind} of chain {id} in state {}",
                        t.seq,
                        state.as_str()
                    )),
                }
            }
            other => mismatches.push(format!("transfer {}: unknown kind {other:?}", t.seq)),
        }
        if acc.2 < 0 {
            mismatches.push(format!("transfer {}: {} reserved below zero", t.seq, t.key));
        }
    }
    let mut stored: HashMap<&str, &AccountState> = HashMap::new();
    for a in accounts {
        stored.insert(a.key.as_str(), &a.state);
        match accs.get(a.key.as_str()) {
            None => mismatches.push(format!("account {} has no opening transfer", a.key)),
            Some((budget, spent, reserved, period, window)) => {
                let s = &a.state;
                if i128::from(s.budget) != *budget {
                    mismatches.push(format!(
                        "account {}: budget {} but transfers give {budget}",
                        a.key, s.budget
                    ));
                }
                if i128::from(s.spent) != *spent {
                    mismatches.push(format!(
                        "account {}: spent {} but transfers give {spent}",
                        a.key, s.spent
                    ));
                }
                if i128::from(s.reserved) != *reserved {
                    mismatches.push(format!(
                        "account {}: reserved {} but transfers give {reserved}",
                        a.key, s.reserved
                    ));
                }
                if s.period.as_str() != period {
                    mismatches.push(format!(
                        "account {}: period {} but transfers give {period}",
                        a.key, s.period
                    ));
                }
                if s.window_ms != *window {
                    mismatches.push(format!(
                        "account {}: window {} but transfers give {window}",
                        a.key, s.window_ms
                    ));
                }
            }
        }
    }
    for key in accs.keys() {
        if !stored.contains_key(key) {
            mismatches.push(format!("account {key} is in the transfers but has no row"));
        }
    }
    let mut pending = 0;
    let mut seen = 0;
    for c in chains {
        if c.state == "pending" {
            pending += 1;
        }
        match chs.get(c.id.as_str()) {
            None => mismatches.push(format!("chain {} has no reserve transfer", c.id)),
            Some((key, ch)) => {
                seen += 1;
                if *key != c.key
                    || ch.reserved != i128::from(c.reserved)
                    || ch.state.as_str() != c.state
                    || ch.settled != c.settled.map(i128::from)
                {
                    mismatches.push(format!(
                        "chain {}: stored ({}, {}, {}, {:?}) but transfers give ({key}, {}, {}, {:?})",
                        c.id,
                        c.key,
                        c.reserved,
                        c.state,
                        c.settled,
                        ch.reserved,
                        ch.state.as_str(),
                        ch.settled
                    ));
                }
            }
        }
    }
    if seen != chs.len() {
        mismatches.push(format!(
            "{} chains in the transfers have no chain row",
            chs.len() - seen
        ));
    }
    VerifyReport {
        accounts: accounts.len(),
        transfers: transfers.len(),
        pending,
        mismatches,
    }
}

/// The note written when a pending reservation is resolved by the policy.
fn policy_note(policy: PendingPolicy, why: &str) -> String {
    match policy {
        PendingPolicy::Charge => {
            format!("{why}: charged the reserved points by pending_policy=charge")
        }
        PendingPolicy::Void => {
            format!("{why}: released the reserved points by pending_policy=void")
        }
    }
}

fn now_ms(clock: &SharedClock) -> i64 {
    clock.now().timestamp_millis()
}

/// How long idempotency records are kept.
const IDEM_RETENTION_MS: i64 = 24 * 3600 * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .unwrap_or(-1)
    }

    #[test]
    fn week_windows_start_on_monday_in_shanghai() {
        let tz = chrono_tz::Asia::Shanghai;
        // Wednesday 2026-11-25 10:00 Shanghai = 02:00 UTC.
        let start = window_start_ms(Period::Week, tz, ms("2026-11-25T02:00:00Z"));
        assert_eq!(start, Some(ms("2026-11-22T16:00:00Z")));
        let end = window_end_ms(Period::Week, tz, ms("2026-11-22T16:00:00Z"));
        assert_eq!(end, ms("2026-11-29T16:00:00Z"));
    }

    #[test]
    fn day_and_month_windows_follow_local_midnight() {
        let tz = chrono_tz::Asia::Shanghai;
        // 2026-11-30 23:30 UTC is already 1 December in Shanghai.
        let now = ms("2026-11-30T23:30:00Z");
        assert_eq!(
            window_start_ms(Period::Day, tz, now),
            Some(ms("2026-11-30T16:00:00Z"))
        );
        assert_eq!(
            window_start_ms(Period::Month, tz, now),
            Some(ms("2026-11-30T16:00:00Z"))
        );
        assert_eq!(
            window_end_ms(Period::Month, tz, ms("2026-11-30T16:00:00Z")),
            ms("2026-12-31T16:00:00Z")
        );
        assert_eq!(window_start_ms(Period::None, tz, now), None);
    }
}
