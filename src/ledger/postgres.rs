//! The PostgreSQL ledger, for several gate replicas sharing budgets.
//!
//! Every mutation is ONE statement (data-modifying CTEs), atomic because a
//! statement is. The gate's hot writes -- reservations, commits, voids and
//! task registrations -- go through `pgbatch`, which applies the ones that
//! arrive together in one transaction (a group commit); the rest, and a write
//! whose group was rolled back, run alone in autocommit. The reservation is the
//! conditional `UPDATE accounts ... WHERE spent + reserved + $points <= budget`;
//! the account row is locked first (`FOR UPDATE` in the first CTE) so that a
//! due period reset and the spend it clears are read from the same, latest row
//! version. Because every account change locks the account row before its
//! transfer row takes a sequence number, the transfer sequence per account is
//! the order in which the changes were applied, and `verify` can replay it.
//!
//! A transition that finds nothing to change (the chain id already reserved,
//! already settled) is then looked up to answer as a replay or a conflict.

use super::pgbatch::{refs, Batched, Batcher, Params, Stmt, LOCK_ACCOUNTS};
use super::{
    now_ms, policy_note, replay_verify, settle_refusal, to_i64, to_u64, window_for,
    window_start_ms, AccountRow, AccountState, AccountView, AdminOp, ChainRow, ChainState,
    Durability, GroupCommits, IdemBegin, KeyChanges, KeyCursor, KeyTerms, KeyVersion, KeyWatch,
    LedgerConfig, LedgerError, PendingPolicy, Period, Refusal, Reserved, Settle, Settled,
    StoredAnswer, TaskRow, TransferRow, VerifyReport, IDEM_RETENTION_MS,
};
use crate::clock::SharedClock;
use crate::keys::KeyRecord;
use crate::points::{KeyId, Points, TransferId};
use crate::tasks::{TaskRecord, TaskState};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

/// The tasks in flight of each key that has any, from the chains and tasks
/// themselves (reservations pending, tasks open): what `accounts.in_flight`
/// must equal. A macro so that the statements below can embed it.
macro_rules! in_flight_truth {
    () => {
        "SELECT key, count(*) AS n FROM (SELECT key FROM chains WHERE state = 'pending' \
         UNION ALL SELECT key FROM tasks WHERE state = 'open') f GROUP BY key"
    };
}

/// Serialises schema migrations of concurrently starting replicas.
const MIGRATION_LOCK: i64 = 0x0063_6875_7a68_616e; // "chuzhan"

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    key TEXT PRIMARY KEY,
    budget BIGINT NOT NULL,
    spent BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    period TEXT NOT NULL,
    window_ms BIGINT NOT NULL
);
CREATE TABLE transfers (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    points BIGINT NOT NULL,
    overage BIGINT NOT NULL DEFAULT 0,
    remaining BIGINT NOT NULL DEFAULT 0,
    period TEXT,
    window_ms BIGINT,
    reset_spent BIGINT,
    actor TEXT NOT NULL,
    note TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE UNIQUE INDEX transfers_chain ON transfers (id, kind) WHERE id IS NOT NULL;
CREATE TABLE chains (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    reserved BIGINT NOT NULL,
    state TEXT NOT NULL,
    settled BIGINT,
    owner TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    settled_ms BIGINT
);
CREATE INDEX chains_pending ON chains (owner, created_ms) WHERE state = 'pending';
CREATE TABLE idem (
    key TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    body_hash BYTEA NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    body BYTEA,
    created_ms BIGINT NOT NULL,
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
    created_ms BIGINT NOT NULL,
    checked_ms BIGINT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX tasks_open ON tasks (checked_ms) WHERE state = 'open';
"#,
    // v3: a change sequence on keys, so replicas reload only what changed.
    r#"
CREATE SEQUENCE keys_change_seq;
ALTER TABLE keys ADD COLUMN change_seq BIGINT NOT NULL DEFAULT nextval('keys_change_seq');
CREATE INDEX keys_change ON keys (change_seq);
"#,
    // v4: a failed task's refund is recorded apart from its end (see the
    // embedded ledger's v3).
    r#"
UPDATE tasks SET state = 'refund_due' WHERE state = 'fail';
CREATE INDEX tasks_refund_due ON tasks (checked_ms) WHERE state = 'refund_due';
"#,
    // v5: until when a key may be used (0 once disabled, NULL for ever), so that
    // a reservation can check the key in the same statement (`RESERVE`).
    r#"
ALTER TABLE keys ADD COLUMN usable_until_ms BIGINT;
UPDATE keys SET usable_until_ms = CASE
    WHEN (record::jsonb ->> 'disabled')::boolean THEN 0
    WHEN record::jsonb ->> 'expires_at' IS NOT NULL
        THEN (extract(epoch FROM (record::jsonb ->> 'expires_at')::timestamptz) * 1000)::bigint
END;
"#,
    // v6: every change to `keys` is pushed to the replicas listening on the
    // channel (`pgnotify`), whoever makes it; the payload is the schema.
    r#"
CREATE FUNCTION keys_changed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('chuzhan_gate_keys', TG_TABLE_SCHEMA);
    RETURN NULL;
END $$;
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
    FOR EACH STATEMENT EXECUTE FUNCTION keys_changed_notify();
"#,
    // v7: each account counts its tasks in flight (reservations pending and
    // tasks open), so that a key's task limit holds across replicas. Every
    // statement that moves a chain out of pending or a task out of open keeps
    // it; `heal_in_flight` corrects what replicas of an older version, still
    // serving during an upgrade, did not count.
    concat!(
        "ALTER TABLE accounts ADD COLUMN in_flight BIGINT NOT NULL DEFAULT 0;\n",
        "UPDATE accounts a SET in_flight = t.n FROM (",
        in_flight_truth!(),
        ") t WHERE a.key = t.key;"
    ),
    // v8: each account keeps its key's token bucket for submits (`RESERVE`),
    // so that a key's rate holds across replicas. NULL: the bucket is full.
    r#"
ALTER TABLE accounts ADD COLUMN rate_tokens DOUBLE PRECISION, ADD COLUMN rate_at TIMESTAMPTZ;
"#,
    // v9: each key row names the transaction that last wrote it, so that a
    // replica's poll reads every change once it commits, in whatever order
    // changes commit (`keys_since`). A trigger stamps every write, a `psql`
    // edit included, with a new change sequence number and the transaction.
    r#"
ALTER TABLE keys ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX keys_change_xid ON keys (change_xid);
CREATE FUNCTION keys_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval('keys_change_seq');
    NEW.change_xid := pg_current_xact_id();
    RETURN NEW;
END $$;
CREATE TRIGGER keys_stamp BEFORE INSERT OR UPDATE ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_stamp_change();
"#,
    // v10: a key row deleted behind the gate's back (the gate itself only
    // disables keys) leaves a tombstone, stamped as a write is, so that the
    // replicas' poll drops it from their caches at the next poll instead of
    // at the minute's reload. A delete prunes the tombstones older than an
    // hour (a replica that has not polled for that long reloads every key).
    // The triggers reach their schema's objects through the table's own
    // schema: v9's function named the sequence bare, so an edit made from a
    // session whose search path did not hold the gate's schema failed.
    r#"
CREATE OR REPLACE FUNCTION keys_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval(format('%I.keys_change_seq', TG_TABLE_SCHEMA)::regclass);
    NEW.change_xid := pg_current_xact_id();
    RETURN NEW;
END $$;
CREATE TABLE keys_gone (
    id TEXT NOT NULL,
    change_seq BIGINT NOT NULL,
    change_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    gone_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE FUNCTION keys_note_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DELETE FROM %I.keys_gone WHERE gone_at < now() - interval ''1 hour''',
                   TG_TABLE_SCHEMA);
    EXECUTE format('INSERT INTO %I.keys_gone (id, change_seq) VALUES ($1, nextval(%L::regclass))',
                   TG_TABLE_SCHEMA, format('%I.keys_change_seq', TG_TABLE_SCHEMA))
        USING OLD.id;
    RETURN NULL;
END $$;
CREATE TRIGGER keys_note_gone AFTER DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_note_gone();
"#,
];

/// The accounts whose count of tasks in flight is not what their chains and
/// tasks say: key, count, truth.
const IN_FLIGHT_DRIFT: &str = concat!(
    "SELECT a.key, a.in_flight, COALESCE(t.n, 0) FROM accounts a LEFT JOIN (",
    in_flight_truth!(),
    ") t ON t.key = a.key WHERE a.in_flight <> COALESCE(t.n, 0) ORDER BY a.key"
);

/// The heal's second look, under the accounts' locks.
const IN_FLIGHT_HEAL: &str = concat!(
    "UPDATE accounts a SET in_flight = COALESCE(t.n, 0) FROM accounts b LEFT JOIN (",
    in_flight_truth!(),
    ") t ON t.key = b.key WHERE a.key = b.key AND a.key = ANY($1) ",
    "AND a.in_flight <> COALESCE(t.n, 0) RETURNING a.key"
);

/// The current window start for each period kind, passed to the statements
/// that may apply a lazy period reset.
const PERIOD_CASE: &str = "CASE a.period WHEN 'day' THEN $D::bigint WHEN 'week' THEN $W::bigint \
                           WHEN 'month' THEN $M::bigint ELSE NULL END";

/// A reservation, in one statement: the account row is locked and the points
/// are held only if they fit, the id is new, and (when `$9`, the hash of the
/// secret the request presented, is given) the key is at this moment usable in
/// the store under that secret: a key disabled, expired or rotated on another
/// replica stops paying for requests at once, not at this replica's next poll.
/// When `$10` is given, the key's tasks in flight across all replicas
/// (`accounts.in_flight`, read under the row's lock) must be below it. When
/// `$11` (submits per second) and `$12` (the bucket's size) are given, the
/// key's token bucket (`accounts.rate_tokens` as of `rate_at`) must hold a
/// token, which the reservation takes; it refills by the database's clock, the
/// one clock all replicas share.
const RESERVE: &str = "
WITH live AS (
    SELECT ($9::text IS NULL OR EXISTS (
        SELECT 1 FROM keys k WHERE k.id = $2 AND k.secret_hash = $9
            AND (k.usable_until_ms IS NULL OR k.usable_until_ms > $5)
    )) AS ok
), old AS (
    SELECT a.key, a.budget, a.spent, a.reserved, a.window_ms, a.in_flight, PERIOD_CASE AS cur,
        a.rate_tokens, a.rate_at, CASE WHEN $11::float8 IS NOT NULL THEN clock_timestamp() END AS rate_now
    FROM accounts a WHERE a.key = $2 FOR UPDATE
), eff AS (
    SELECT *, (cur IS NOT NULL AND window_ms < cur) AS do_reset,
        CASE WHEN cur IS NOT NULL AND window_ms < cur THEN 0 ELSE spent END AS espent,
        CASE WHEN $11 IS NOT NULL THEN LEAST($12::float8, COALESCE(rate_tokens
            + GREATEST(extract(epoch FROM rate_now - rate_at)::float8, 0) * $11, $12))
        END AS tokens
    FROM old
), acc AS (
    UPDATE accounts a SET
        spent = eff.espent,
        window_ms = CASE WHEN eff.do_reset THEN eff.cur ELSE a.window_ms END,
        reserved = a.reserved + $3,
        in_flight = a.in_flight + 1,
        rate_tokens = eff.tokens - 1,
        rate_at = eff.rate_now
    FROM eff, live
    WHERE a.key = eff.key AND eff.espent + a.reserved + $3 <= a.budget AND live.ok
        AND ($10::bigint IS NULL OR a.in_flight < $10)
        AND (eff.tokens IS NULL OR eff.tokens >= 1)
        AND NOT EXISTS (SELECT 1 FROM chains c WHERE c.id = $1)
    RETURNING a.budget, a.spent, a.reserved, a.window_ms, eff.do_reset, eff.spent AS old_spent
), ch AS (
    INSERT INTO chains (id, key, reserved, state, owner, created_ms)
    SELECT $1, $2, $3, 'pending', $4, $5 FROM acc
), tr AS (
    INSERT INTO transfers (id, key, kind, points, overage, remaining, window_ms, reset_spent, actor, note, at_ms)
    SELECT $1, $2, 'reserve', $3, 0, GREATEST(budget - spent - reserved, 0),
        CASE WHEN do_reset THEN window_ms END, CASE WHEN do_reset THEN old_spent END, 'gate', '', $5
    FROM acc
)
SELECT e.budget, e.espent, e.reserved, e.in_flight AS busy, e.tokens, a.budget AS nb, a.spent AS ns, a.reserved AS nr,
    EXISTS (SELECT 1 FROM chains c WHERE c.id = $1) AS taken, (SELECT ok FROM live) AS live
FROM eff e LEFT JOIN acc a ON true";

/// A task registration (first write wins); a new open task counts in its
/// account's tasks in flight.
const PUT_TASK: &str = "
WITH t AS (
    INSERT INTO tasks (task_id, key, state, created_ms, checked_ms, record)
    VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT (task_id) DO NOTHING
    RETURNING key, state
)
UPDATE accounts a SET in_flight = a.in_flight + 1 FROM t WHERE a.key = t.key AND t.state = 'open'";

/// A task's end, once (of concurrent enders exactly one changes the row); it
/// no longer counts in its account's tasks in flight.
const END_TASK: &str = "
WITH t AS (
    UPDATE tasks SET state = $2, checked_ms = $3 WHERE task_id = $1 AND state = 'open'
    RETURNING key
), acc AS (
    UPDATE accounts a SET in_flight = GREATEST(a.in_flight - 1, 0) FROM t WHERE a.key = t.key
)
SELECT count(*) FROM t";

/// A commit, and with it (when `$9`, a task id, is given) the registration of
/// the task the charge started, in the same statement: the task is registered
/// exactly when its charge is committed, and it keeps the reservation's place
/// in the account's tasks in flight (one update of the account row, not two).
const COMMIT: &str = "
WITH ch AS (
    UPDATE chains SET state = 'committed', settled = $2, settled_ms = $3
    WHERE id = $1 AND state = 'pending' RETURNING key, reserved
), t AS (
    INSERT INTO tasks (task_id, key, state, created_ms, checked_ms, record)
    SELECT $9::text, ch.key, $10::text, $11::bigint, $11::bigint, $12::text FROM ch WHERE $9 IS NOT NULL
    ON CONFLICT (task_id) DO NOTHING
    RETURNING state
), old AS (
    SELECT a.key, a.budget, a.spent, a.reserved, a.window_ms, ch.reserved AS rsv, PERIOD_CASE AS cur
    FROM accounts a JOIN ch ON a.key = ch.key FOR UPDATE OF a
), eff AS (
    SELECT *, (cur IS NOT NULL AND window_ms < cur) AS do_reset,
        CASE WHEN cur IS NOT NULL AND window_ms < cur THEN 0 ELSE spent END AS espent
    FROM old
), acc AS (
    UPDATE accounts a SET
        spent = eff.espent + $2,
        window_ms = CASE WHEN eff.do_reset THEN eff.cur ELSE a.window_ms END,
        reserved = a.reserved - eff.rsv,
        in_flight = GREATEST(a.in_flight - 1 + (SELECT count(*) FROM t WHERE t.state = 'open'), 0)
    FROM eff WHERE a.key = eff.key
    RETURNING a.key, a.budget, a.spent, a.reserved, a.window_ms, eff.do_reset, eff.spent AS old_spent,
        GREATEST(0, $2 - GREATEST(0, eff.budget - eff.espent - (eff.reserved - eff.rsv))) AS overage
), tr AS (
    INSERT INTO transfers (id, key, kind, points, overage, remaining, window_ms, reset_spent, actor, note, at_ms)
    SELECT $1, key, 'commit', $2, overage, GREATEST(budget - spent - reserved, 0),
        CASE WHEN do_reset THEN window_ms END, CASE WHEN do_reset THEN old_spent END, $7, $8, $3
    FROM acc
)
SELECT key, $2::bigint AS points, overage, GREATEST(budget - spent - reserved, 0) AS remaining FROM acc";

const VOID: &str = "
WITH ch AS (
    UPDATE chains SET state = 'voided', settled_ms = $2
    WHERE id = $1 AND state = 'pending' RETURNING key, reserved
), acc AS (
    UPDATE accounts a SET reserved = a.reserved - ch.reserved,
        in_flight = GREATEST(a.in_flight - 1, 0)
    FROM ch WHERE a.key = ch.key
    RETURNING a.key, a.budget, a.spent, a.reserved, ch.reserved AS rsv
), tr AS (
    INSERT INTO transfers (id, key, kind, points, overage, remaining, actor, note, at_ms)
    SELECT $1, key, 'void', rsv, 0, GREATEST(budget - spent - reserved, 0), $3, $4, $2 FROM acc
)
SELECT key, rsv AS points, 0::bigint AS overage, GREATEST(budget - spent - reserved, 0) AS remaining FROM acc";

const REFUND: &str = "
WITH ch AS (
    UPDATE chains SET state = 'refunded', settled_ms = $2
    WHERE id = $1 AND state = 'committed' RETURNING key, settled
), old AS (
    SELECT a.key, a.budget, a.spent, a.reserved, a.window_ms, ch.settled AS pts, PERIOD_CASE AS cur
    FROM accounts a JOIN ch ON a.key = ch.key FOR UPDATE OF a
), eff AS (
    SELECT *, (cur IS NOT NULL AND window_ms < cur) AS do_reset,
        CASE WHEN cur IS NOT NULL AND window_ms < cur THEN 0 ELSE spent END AS espent
    FROM old
), acc AS (
    UPDATE accounts a SET
        spent = GREATEST(eff.espent - eff.pts, 0),
        window_ms = CASE WHEN eff.do_reset THEN eff.cur ELSE a.window_ms END
    FROM eff WHERE a.key = eff.key
    RETURNING a.key, a.budget, a.spent, a.reserved, a.window_ms, eff.do_reset, eff.spent AS old_spent, eff.pts
), tr AS (
    INSERT INTO transfers (id, key, kind, points, overage, remaining, window_ms, reset_spent, actor, note, at_ms)
    SELECT $1, key, 'refund', pts, 0, GREATEST(budget - spent - reserved, 0),
        CASE WHEN do_reset THEN window_ms END, CASE WHEN do_reset THEN old_spent END, $6, $7, $2
    FROM acc
)
SELECT key, pts AS points, 0::bigint AS overage, GREATEST(budget - spent - reserved, 0) AS remaining FROM acc";

const OPEN: &str = "
WITH acc AS (
    INSERT INTO accounts (key, budget, spent, reserved, period, window_ms)
    VALUES ($1, $2, 0, 0, $3, $4) ON CONFLICT (key) DO NOTHING
    RETURNING key, budget, spent, reserved, period, window_ms
), tr AS (
    INSERT INTO transfers (key, kind, points, overage, remaining, period, window_ms, actor, note, at_ms)
    SELECT key, 'open', budget, 0, budget, $3, $4, $5, $6, $7 FROM acc
)
SELECT budget, spent, reserved, period, window_ms FROM acc";

const SET_BUDGET: &str = "
WITH acc AS (
    UPDATE accounts SET budget = $2 WHERE key = $1
    RETURNING key, budget, spent, reserved, period, window_ms
), tr AS (
    INSERT INTO transfers (key, kind, points, overage, remaining, actor, note, at_ms)
    SELECT key, 'budget', $2, 0, GREATEST(budget - spent - reserved, 0), $3, $4, $5 FROM acc
)
SELECT budget, spent, reserved, period, window_ms FROM acc";

const TOP_UP: &str = "
WITH acc AS (
    UPDATE accounts SET budget = budget + $2 WHERE key = $1
    RETURNING key, budget, spent, reserved, period, window_ms
), tr AS (
    INSERT INTO transfers (key, kind, points, overage, remaining, actor, note, at_ms)
    SELECT key, 'topup', $2, 0, GREATEST(budget - spent - reserved, 0), $3, $4, $5 FROM acc
)
SELECT budget, spent, reserved, period, window_ms FROM acc";

const SET_PERIOD: &str = "
WITH acc AS (
    UPDATE accounts SET period = $2, window_ms = $6 WHERE key = $1
    RETURNING key, budget, spent, reserved, period, window_ms
), tr AS (
    INSERT INTO transfers (key, kind, points, overage, remaining, period, window_ms, actor, note, at_ms)
    SELECT key, 'period', 0, 0, GREATEST(budget - spent - reserved, 0), $2, $6, $3, $4, $5 FROM acc
)
SELECT budget, spent, reserved, period, window_ms FROM acc";

fn with_periods(sql: &str, d: &str, w: &str, m: &str) -> String {
    sql.replace("PERIOD_CASE", PERIOD_CASE)
        .replace("$D", d)
        .replace("$W", w)
        .replace("$M", m)
}

fn pg(e: tokio_postgres::Error) -> LedgerError {
    match e.as_db_error() {
        Some(db) => {
            LedgerError::Storage(format!("postgres: {} ({})", db.message(), db.code().code()))
        }
        None => LedgerError::Storage(format!("postgres: {e}")),
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn pool_err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("postgres pool: {e}"))
}

fn account_state(row: &Row) -> Result<AccountState, LedgerError> {
    let period: String = row.try_get("period").map_err(pg)?;
    Ok(AccountState {
        budget: to_u64(row.try_get("budget").map_err(pg)?),
        spent: to_u64(row.try_get("spent").map_err(pg)?),
        reserved: to_u64(row.try_get("reserved").map_err(pg)?),
        period: period.parse().unwrap_or(Period::None),
        window_ms: row.try_get("window_ms").map_err(pg)?,
    })
}

/// The PostgreSQL backend.
pub(super) struct PgLedger {
    pool: Pool,
    clock: SharedClock,
    tz: chrono_tz::Tz,
    policy: PendingPolicy,
    ttl_ms: i64,
    owner: String,
    reserve_sql: String,
    commit_sql: String,
    refund_sql: String,
    /// Group commit of reservations, commits, voids and task registrations.
    batch: Batcher,
    /// The account of each chain this instance reserved and has not settled,
    /// for the group's lock order without asking the database.
    chain_keys: dashmap::DashMap<String, String>,
    /// Where the key-change listener connects (`pgnotify`), and what it saw.
    listen_cfg: tokio_postgres::Config,
    key_watch: std::sync::Arc<KeyWatch>,
}

/// A reservation's answer from the rows of `RESERVE`: `None` when its id is
/// taken (a replay to look up).
fn reserved(
    rows: &[Row],
    key: &KeyId,
    points: Points,
    terms: KeyTerms<'_>,
) -> Result<Option<Reserved>, LedgerError> {
    let row = rows
        .first()
        .ok_or_else(|| LedgerError::UnknownAccount(key.clone()))?;
    if row.try_get::<_, bool>("taken").map_err(pg)? {
        return Ok(None);
    }
    let nb: Option<i64> = row.try_get("nb").map_err(pg)?;
    if nb.is_none() && !row.try_get::<_, bool>("live").map_err(pg)? {
        return Err(LedgerError::KeyRefused(key.clone()));
    }
    let Some(b) = nb else {
        let budget: i64 = row.try_get("budget").map_err(pg)?;
        let spent: i64 = row.try_get("espent").map_err(pg)?;
        let reserved: i64 = row.try_get("reserved").map_err(pg)?;
        let busy: i64 = row.try_get("busy").map_err(pg)?;
        let fits = spent
            .saturating_add(reserved)
            .saturating_add(to_i64(points.get())?)
            <= budget;
        let tokens: Option<f64> = row.try_get("tokens").map_err(pg)?;
        if let Some(rate) = terms
            .rate
            .filter(|_| fits && tokens.is_some_and(|t| t < 1.0))
        {
            return Err(LedgerError::RateLimit { rps: rate.per_sec });
        }
        if let Some(limit) = terms.task_limit.filter(|l| fits && busy >= i64::from(*l)) {
            return Err(LedgerError::TaskLimit { limit });
        }
        return Err(LedgerError::Insufficient {
            needed: points,
            remaining: Points(to_u64(
                budget.saturating_sub(spent).saturating_sub(reserved),
            )),
        });
    };
    let s: i64 = row
        .try_get::<_, Option<i64>>("ns")
        .map_err(pg)?
        .unwrap_or(0);
    let r: i64 = row
        .try_get::<_, Option<i64>>("nr")
        .map_err(pg)?
        .unwrap_or(0);
    Ok(Some(Reserved {
        key: key.clone(),
        points,
        remaining: Points(to_u64(b.saturating_sub(s).saturating_sub(r))),
    }))
}

/// A key record and its version from a row of `record, change_seq`.
fn key_version(row: &Row) -> Result<KeyVersion, LedgerError> {
    let json: &str = row.try_get(0).map_err(pg)?;
    let seq: i64 = row.try_get(1).map_err(pg)?;
    Ok((super::sqlite::parse_key(json)?, to_u64(seq)))
}

/// A settlement's answer from the row of `COMMIT`, `VOID` or `REFUND`.
fn settled(row: &Row, id: &TransferId, how: Settle) -> Result<Settled, LedgerError> {
    Ok(Settled {
        key: KeyId(row.try_get("key").map_err(pg)?),
        id: id.clone(),
        kind: how.kind(),
        points: Points(to_u64(row.try_get("points").map_err(pg)?)),
        overage: Points(to_u64(row.try_get("overage").map_err(pg)?)),
        remaining: Points(to_u64(row.try_get("remaining").map_err(pg)?)),
        replay: false,
    })
}

/// Verifies a PostgreSQL ledger without migrating it or resolving orphans.
pub(super) async fn verify_url(cfg: &LedgerConfig) -> Result<VerifyReport, LedgerError> {
    let mut cfg = cfg.clone();
    cfg.pool_size = 1;
    let ledger = PgLedger::connect(&cfg, std::sync::Arc::new(crate::clock::SystemClock))?;
    ledger.verify().await
}

impl PgLedger {
    /// A pool on the configured database; no statement is run yet.
    fn connect(cfg: &LedgerConfig, clock: SharedClock) -> Result<PgLedger, LedgerError> {
        let url = cfg
            .url
            .as_deref()
            .ok_or_else(|| LedgerError::Config("ledger.url is not set".into()))?;
        let tz = cfg.tz()?;
        let mut pg_cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| LedgerError::Config(format!("ledger.url: {e}")))?;
        let mut options: Vec<String> = pg_cfg
            .get_options()
            .map(str::to_owned)
            .into_iter()
            .collect();
        if let Some(schema) = &cfg.schema {
            let valid = !schema.is_empty()
                && schema.len() <= 63
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !schema.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(LedgerError::Config(format!(
                    "ledger.schema {schema:?}: use lowercase letters, digits and _"
                )));
            }
            options.push(format!("-c search_path={schema}"));
        }
        // Set in both modes: a server whose default is `off` must not make a
        // `power-loss` gate lose commits it has acted on.
        let commit = match cfg.durability {
            Durability::PowerLoss => "on",
            Durability::ProcessCrash => "off",
        };
        options.push(format!("-c synchronous_commit={commit}"));
        // A lock held elsewhere (an open transaction in `psql`) must not hold
        // the gate's writes, and through the group commit every key's, for ever.
        options.push(format!("-c lock_timeout={}", cfg.lock_timeout_ms));
        pg_cfg.options(options.join(" "));
        if pg_cfg.get_connect_timeout().is_none() {
            pg_cfg.connect_timeout(std::time::Duration::from_secs(10));
        }
        let listen_cfg = pg_cfg.clone();
        let mgr = Manager::from_config(
            pg_cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size.max(1))
            .build()
            .map_err(pool_err)?;
        let reserve_sql = with_periods(RESERVE, "$6", "$7", "$8");
        let commit_sql = with_periods(COMMIT, "$4", "$5", "$6");
        let batch = Batcher::start(
            pool.clone(),
            [
                reserve_sql.clone(),
                commit_sql.clone(),
                VOID.to_owned(),
                PUT_TASK.to_owned(),
            ],
        );
        Ok(PgLedger {
            pool,
            clock,
            tz,
            policy: cfg.pending_policy,
            ttl_ms: i64::try_from(cfg.pending_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            owner: cfg.instance_name(),
            reserve_sql,
            commit_sql,
            refund_sql: with_periods(REFUND, "$3", "$4", "$5"),
            batch,
            chain_keys: dashmap::DashMap::new(),
            listen_cfg,
            key_watch: Default::default(),
        })
    }

    pub(super) async fn open(
        cfg: &LedgerConfig,
        clock: SharedClock,
        spare: &[TransferId],
    ) -> Result<PgLedger, LedgerError> {
        let ledger = PgLedger::connect(cfg, clock)?;
        ledger.migrate(cfg.schema.as_deref()).await?;
        // Only this instance's orphans: other replicas may be serving theirs.
        let client = ledger.pool.get().await.map_err(pool_err)?;
        let orphans = client
            .query(
                "SELECT id, reserved FROM chains WHERE state = 'pending' AND owner = $1",
                &[&ledger.owner],
            )
            .await
            .map_err(pg)?;
        drop(client);
        let mut left = Vec::with_capacity(orphans.len());
        for row in orphans {
            let id = TransferId(row.try_get(0).map_err(pg)?);
            let reserved: i64 = row.try_get(1).map_err(pg)?;
            if !spare.contains(&id) {
                left.push((id, reserved));
            }
        }
        if !left.is_empty() {
            tracing::warn!(
                count = left.len(),
                instance = %ledger.owner,
                "resolving reservations this instance left pending"
            );
        }
        let note = policy_note(
            ledger.policy,
            "pending at startup (this instance stopped without settling it)",
        );
        for (id, reserved) in left {
            match ledger
                .resolve(&id, to_u64(reserved), "recovery", &note)
                .await
            {
                Ok(_) | Err(LedgerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ledger)
    }

    async fn migrate(&self, schema: Option<&str>) -> Result<(), LedgerError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        let result = async {
            // Replicas starting together wait here for the one migrating, for
            // as long as it takes.
            client
                .batch_execute("SET lock_timeout = 0")
                .await
                .map_err(pg)?;
            if let Some(schema) = schema {
                // The name was validated in `open`.
                client
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .await
                    .map_err(pg)?;
            }
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)",
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await
                .map_err(pg)?;
            let have: i32 = row.try_get(0).map_err(pg)?;
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
                if version <= have {
                    continue;
                }
                let tx = client.transaction().await.map_err(pg)?;
                tx.batch_execute(sql).await.map_err(pg)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await
                .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
            }
            Ok::<(), LedgerError>(())
        }
        .await;
        let unlock = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg);
        let reset = client.batch_execute("RESET lock_timeout").await.map_err(pg);
        result.and(unlock.map(|_| ())).and(reset)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        self.pool.get().await.map_err(pool_err)
    }

    fn windows(&self, now: i64) -> [i64; 3] {
        [Period::Day, Period::Week, Period::Month]
            .map(|p| window_start_ms(p, self.tz, now).unwrap_or(0))
    }

    /// The parameters of `RESERVE`, as of now.
    fn reserve_params(
        &self,
        key: &KeyId,
        terms: KeyTerms<'_>,
        points: Points,
        id: &TransferId,
    ) -> Result<Params, LedgerError> {
        let now = now_ms(&self.clock);
        let [d, w, m] = self.windows(now);
        Ok(vec![
            Box::new(id.as_str().to_owned()),
            Box::new(key.as_str().to_owned()),
            Box::new(to_i64(points.get())?),
            Box::new(self.owner.clone()),
            Box::new(now),
            Box::new(d),
            Box::new(w),
            Box::new(m),
            Box::new(terms.secret_hash.map(str::to_owned)),
            Box::new(terms.task_limit.map(i64::from)),
            Box::new(terms.rate.map(|r| f64::from(r.per_sec))),
            Box::new(terms.rate.map(|r| f64::from(r.burst))),
        ])
    }

    /// The parameters of `COMMIT`, `VOID` or `REFUND`, as of now.
    fn settle_params(
        &self,
        id: &TransferId,
        how: Settle,
        actor: &str,
        note: &str,
        task: Option<&TaskRecord>,
    ) -> Result<Params, LedgerError> {
        let now = now_ms(&self.clock);
        // Every statement takes the id first and the actor and note after the
        // rest; a commit adds its points (and after the note, the task it
        // registers), and what moves spend also the period windows.
        let mut params: Params = vec![Box::new(id.as_str().to_owned())];
        if let Settle::Commit(p) = how {
            params.push(Box::new(to_i64(p.get())?));
        }
        params.push(Box::new(now));
        if !matches!(how, Settle::Void) {
            let [d, w, m] = self.windows(now);
            params.extend([d, w, m].map(|x| Box::new(x) as _));
        }
        params.push(Box::new(actor.to_owned()));
        params.push(Box::new(note.to_owned()));
        if let Settle::Commit(_) = how {
            // The task registered with the commit, if any (`$9`–`$12`).
            let (task_id, state, created, record) = match task.map(TaskRow::of).transpose()? {
                Some(r) => (
                    Some(r.task_id),
                    Some(r.state),
                    Some(r.created_ms),
                    Some(r.record),
                ),
                None => (None, None, None, None),
            };
            params.push(Box::new(task_id));
            params.push(Box::new(state));
            params.push(Box::new(created));
            params.push(Box::new(record));
        }
        Ok(params)
    }

    pub(super) async fn admin(
        &self,
        key: &KeyId,
        op: AdminOp,
        actor: &str,
        note: &str,
    ) -> Result<AccountView, LedgerError> {
        let now = now_ms(&self.clock);
        let client = self.client().await?;
        let k = key.as_str();
        let rows = match op {
            AdminOp::Open { budget, period } => {
                let b = to_i64(budget.get())?;
                let w = window_for(period, self.tz, now);
                let stmt = client.prepare_cached(OPEN).await.map_err(pg)?;
                let rows = client
                    .query(&stmt, &[&k, &b, &period.as_str(), &w, &actor, &note, &now])
                    .await
                    .map_err(pg)?;
                if rows.is_empty() {
                    return Err(LedgerError::Conflict(format!(
                        "account {key} already exists"
                    )));
                }
                rows
            }
            AdminOp::Budget(p) | AdminOp::TopUp(p) => {
                let sql = if matches!(op, AdminOp::Budget(_)) {
                    SET_BUDGET
                } else {
                    TOP_UP
                };
                let p = to_i64(p.get())?;
                let stmt = client.prepare_cached(sql).await.map_err(pg)?;
                client
                    .query(&stmt, &[&k, &p, &actor, &note, &now])
                    .await
                    .map_err(|e| {
                        if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
                            LedgerError::Conflict("budget overflow".into())
                        } else {
                            pg(e)
                        }
                    })?
            }
            AdminOp::Period(period) => {
                let w = window_for(period, self.tz, now);
                let stmt = client.prepare_cached(SET_PERIOD).await.map_err(pg)?;
                client
                    .query(&stmt, &[&k, &period.as_str(), &actor, &note, &now, &w])
                    .await
                    .map_err(pg)?
            }
        };
        let row = rows
            .first()
            .ok_or_else(|| LedgerError::UnknownAccount(key.clone()))?;
        Ok(account_state(row)?.view(key, now, self.tz))
    }

    pub(super) async fn account(&self, key: &KeyId) -> Result<AccountView, LedgerError> {
        let now = now_ms(&self.clock);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT budget, spent, reserved, period, window_ms FROM accounts WHERE key = $1",
            )
            .await
            .map_err(pg)?;
        let row = client
            .query_opt(&stmt, &[&key.as_str()])
            .await
            .map_err(pg)?
            .ok_or_else(|| LedgerError::UnknownAccount(key.clone()))?;
        Ok(account_state(&row)?.view(key, now, self.tz))
    }

    pub(super) async fn accounts(&self) -> Result<Vec<AccountView>, LedgerError> {
        let now = now_ms(&self.clock);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key, budget, spent, reserved, period, window_ms FROM accounts ORDER BY key",
                &[],
            )
            .await
            .map_err(pg)?;
        self.views(&rows, now)
    }

    /// Account rows (`key` and the `account_state` columns) as views at `now`.
    fn views(&self, rows: &[Row], now: i64) -> Result<Vec<AccountView>, LedgerError> {
        rows.iter()
            .map(|r| {
                let key = KeyId(r.try_get("key").map_err(pg)?);
                Ok(account_state(r)?.view(&key, now, self.tz))
            })
            .collect()
    }

    pub(super) async fn accounts_of(
        &self,
        keys: &[KeyId],
    ) -> Result<Vec<AccountView>, LedgerError> {
        let now = now_ms(&self.clock);
        let client = self.client().await?;
        let ids: Vec<&str> = keys.iter().map(KeyId::as_str).collect();
        let rows = client
            .query(
                "SELECT key, budget, spent, reserved, period, window_ms FROM accounts \
                 WHERE key = ANY($1) ORDER BY key",
                &[&ids],
            )
            .await
            .map_err(pg)?;
        self.views(&rows, now)
    }

    pub(super) async fn reserve(
        &self,
        key: &KeyId,
        terms: KeyTerms<'_>,
        points: Points,
        id: &TransferId,
    ) -> Result<Reserved, LedgerError> {
        let params = self.reserve_params(key, terms, points, id)?;
        match self
            .batch
            .run(Stmt::Reserve, params, key.as_str().to_owned())
            .await
        {
            Ok(rows) => match reserved(&rows, key, points, terms)? {
                Some(r) => {
                    self.chain_keys
                        .insert(id.as_str().to_owned(), key.as_str().to_owned());
                    Ok(r)
                }
                None => self.reserve_replay(key, id).await,
            },
            Err(Batched::Alone) => self.reserve_alone(key, terms, points, id).await,
            Err(e) => Err(e.into()),
        }
    }

    /// A reservation by itself, in autocommit (after its batch was rolled back).
    async fn reserve_alone(
        &self,
        key: &KeyId,
        terms: KeyTerms<'_>,
        points: Points,
        id: &TransferId,
    ) -> Result<Reserved, LedgerError> {
        let params = self.reserve_params(key, terms, points, id)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.reserve_sql).await.map_err(pg)?;
        let res = client.query(&stmt, &refs(&params)).await;
        drop(client);
        match res {
            Ok(rows) => match reserved(&rows, key, points, terms)? {
                Some(r) => Ok(r),
                None => self.reserve_replay(key, id).await,
            },
            // Another replica inserted the same id after this statement's snapshot.
            Err(e) if is_unique_violation(&e) => self.reserve_replay(key, id).await,
            Err(e) => Err(pg(e)),
        }
    }

    /// The id is taken: a replay (or a misuse with another key).
    async fn reserve_replay(&self, key: &KeyId, id: &TransferId) -> Result<Reserved, LedgerError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT key, points, remaining FROM transfers WHERE id = $1 AND kind = 'reserve'",
                &[&id.as_str()],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| LedgerError::Conflict(format!("transfer {id} is taken")))?;
        let stored_key: String = row.try_get(0).map_err(pg)?;
        super::sqlite::reserve_replay(
            key,
            id,
            &stored_key,
            to_u64(row.try_get(1).map_err(pg)?),
            to_u64(row.try_get(2).map_err(pg)?),
        )
    }

    pub(super) async fn settle(
        &self,
        id: &TransferId,
        how: Settle,
        actor: &str,
        note: &str,
        task: Option<&TaskRecord>,
    ) -> Result<Settled, LedgerError> {
        let stmt = match how {
            Settle::Commit(_) => Stmt::Commit,
            Settle::Void => Stmt::Void,
            // Refunds come from task checks, one at a time: not grouped.
            Settle::Refund => return self.settle_alone(id, how, actor, note, task).await,
        };
        let params = self.settle_params(id, how, actor, note, task)?;
        // The chain's account: known if this instance reserved it, else read.
        let key = match self.chain_keys.remove(id.as_str()) {
            Some((_, key)) => key,
            None => {
                let row = self
                    .client()
                    .await?
                    .query_opt("SELECT key FROM chains WHERE id = $1", &[&id.as_str()])
                    .await
                    .map_err(pg)?;
                match row {
                    Some(row) => row.try_get(0).map_err(pg)?,
                    None => return self.settle_alone(id, how, actor, note, task).await,
                }
            }
        };
        match self.batch.run(stmt, params, key).await {
            Ok(rows) => match rows.first() {
                Some(row) => settled(row, id, how),
                // Not pending (a replay, a conflict) or no such chain: the
                // one-statement path finds out which.
                None => self.settle_alone(id, how, actor, note, task).await,
            },
            Err(Batched::Failed(e)) => Err(LedgerError::Storage(e)),
            Err(Batched::Alone) => self.settle_alone(id, how, actor, note, task).await,
        }
    }

    async fn settle_alone(
        &self,
        id: &TransferId,
        how: Settle,
        actor: &str,
        note: &str,
        task: Option<&TaskRecord>,
    ) -> Result<Settled, LedgerError> {
        let client = self.client().await?;
        // A chain found still pending after a failed attempt means a concurrent
        // transaction touched it and rolled back; try again a few times.
        for _ in 0..3 {
            let sql = match how {
                Settle::Commit(_) => &self.commit_sql,
                Settle::Void => VOID,
                Settle::Refund => &self.refund_sql,
            };
            let params = self.settle_params(id, how, actor, note, task)?;
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            let rows = client.query(&stmt, &refs(&params)).await.map_err(pg)?;
            if let Some(row) = rows.first() {
                return settled(row, id, how);
            }
            let Some(state_row) = client
                .query_opt("SELECT state FROM chains WHERE id = $1", &[&id.as_str()])
                .await
                .map_err(pg)?
            else {
                return Err(LedgerError::UnknownTransfer(id.clone()));
            };
            let state: String = state_row.try_get(0).map_err(pg)?;
            let state = ChainState::parse(&state)
                .ok_or_else(|| LedgerError::Storage(format!("chain {id} has state {state:?}")))?;
            let allowed = matches!(
                (how, state),
                (Settle::Commit(_) | Settle::Void, ChainState::Pending)
                    | (Settle::Refund, ChainState::Committed)
            );
            if allowed {
                continue;
            }
            return match settle_refusal(id, how, state) {
                Refusal::Conflict(msg) => Err(LedgerError::Conflict(msg)),
                Refusal::Replay(kind) => {
                    let row = client
                        .query_opt(
                            "SELECT key, points, overage, remaining FROM transfers WHERE id = $1 AND kind = $2",
                            &[&id.as_str(), &kind.as_str()],
                        )
                        .await
                        .map_err(pg)?
                        .ok_or_else(|| {
                            LedgerError::Storage(format!("transfer {id} has no {} record", kind.as_str()))
                        })?;
                    Ok(Settled {
                        key: KeyId(row.try_get(0).map_err(pg)?),
                        id: id.clone(),
                        kind,
                        points: Points(to_u64(row.try_get(1).map_err(pg)?)),
                        overage: Points(to_u64(row.try_get(2).map_err(pg)?)),
                        remaining: Points(to_u64(row.try_get(3).map_err(pg)?)),
                        replay: true,
                    })
                }
            };
        }
        Err(LedgerError::Conflict(format!(
            "transfer {id} is being settled concurrently"
        )))
    }

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
        let now = now_ms(&self.clock);
        let cutoff = now.saturating_sub(self.ttl_ms);
        let due = {
            let client = self.client().await?;
            client
                .query(
                    "SELECT id, reserved FROM chains WHERE state = 'pending' AND created_ms <= $1",
                    &[&cutoff],
                )
                .await
                .map_err(pg)?
        };
        let note = policy_note(self.policy, "pending longer than pending_ttl_secs");
        let mut out = Vec::with_capacity(due.len());
        for row in due {
            let id = TransferId(row.try_get(0).map_err(pg)?);
            let reserved: i64 = row.try_get(1).map_err(pg)?;
            if spare.contains(&id) {
                continue;
            }
            match self.resolve(&id, to_u64(reserved), "expiry", &note).await {
                Ok(s) if !s.replay => out.push(s),
                Ok(_) | Err(LedgerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM idem WHERE created_ms < $1",
                &[&now.saturating_sub(IDEM_RETENTION_MS)],
            )
            .await
            .map_err(pg)?;
        Ok(out)
    }

    /// Listens for key changes until dropped (`pgnotify`).
    pub(super) async fn listen_keys(&self) {
        super::pgnotify::listen(self.listen_cfg.clone(), self.owner.clone(), &self.key_watch).await
    }

    pub(super) fn key_watch(&self) -> &std::sync::Arc<KeyWatch> {
        &self.key_watch
    }

    pub(super) fn group_commits(&self) -> &GroupCommits {
        self.batch.commits()
    }

    /// The one number a statement answers (a count, a maximum).
    async fn number(&self, sql: &str) -> Result<i64, LedgerError> {
        let row = self.client().await?.query_one(sql, &[]).await.map_err(pg)?;
        row.try_get(0).map_err(pg)
    }

    pub(super) async fn pending_count(&self) -> Result<u64, LedgerError> {
        let n = self
            .number("SELECT count(*) FROM chains WHERE state = 'pending'")
            .await?;
        Ok(to_u64(n))
    }

    pub(super) async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let mut client = self.client().await?;
        // One snapshot for all three tables.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let transfers = tx
            .query(
                "SELECT seq, id, key, kind, points, period, window_ms, reset_spent FROM transfers ORDER BY seq",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                Ok(TransferRow {
                    seq: r.try_get(0)?,
                    id: r.try_get(1)?,
                    key: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    points: r.try_get(4)?,
                    period: r.try_get(5)?,
                    window_ms: r.try_get(6)?,
                    reset_spent: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        let accounts = tx
            .query(
                "SELECT key, budget, spent, reserved, period, window_ms FROM accounts ORDER BY key",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                Ok(AccountRow {
                    key: r.try_get("key").map_err(pg)?,
                    state: account_state(r)?,
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let chains = tx
            .query("SELECT id, key, reserved, state, settled FROM chains", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                Ok(ChainRow {
                    id: r.try_get(0)?,
                    key: r.try_get(1)?,
                    reserved: r.try_get(2)?,
                    state: r.try_get(3)?,
                    settled: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        let drifted = tx
            .query(IN_FLIGHT_DRIFT, &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                Ok(format!(
                    "account {}: counts {} tasks in flight, its chains and tasks {}",
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, i64>(1)?,
                    r.try_get::<_, i64>(2)?
                ))
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        let mut report = replay_verify(&transfers, &accounts, &chains);
        report.mismatches.extend(drifted);
        Ok(report)
    }

    /// See [`super::Ledger::heal_in_flight`]. The accounts that differ are
    /// locked first, then counted again: every statement that changes the
    /// count holds its account's lock, so the second look is exact.
    pub(super) async fn heal_in_flight(&self) -> Result<Vec<KeyId>, LedgerError> {
        let mut client = self.client().await?;
        let keys: Vec<String> = client
            .query(IN_FLIGHT_DRIFT, &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(pg)?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(LOCK_ACCOUNTS, &[&keys]).await.map_err(pg)?;
        let healed = tx
            .query(IN_FLIGHT_HEAL, &[&keys])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.try_get(0).map(KeyId))
            .collect::<Result<Vec<_>, _>>()
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(healed)
    }

    /// The tasks in flight of all keys on all replicas.
    pub(super) async fn fleet_in_flight(&self) -> Result<u64, LedgerError> {
        Ok(to_u64(
            self.number("SELECT COALESCE(sum(in_flight), 0)::bigint FROM accounts")
                .await?,
        ))
    }

    pub(super) async fn ping(&self) -> Result<(), LedgerError> {
        let now = now_ms(&self.clock).to_string();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (k, v) VALUES ('ping', $1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                &[&now],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(super) async fn durability(&self) -> Result<Durability, LedgerError> {
        let client = self.client().await?;
        let row = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(pg)?;
        let value: String = row.get(0);
        // `local`, `remote_write` and `remote_apply` all wait for the local flush.
        Ok(match value.as_str() {
            "off" => Durability::ProcessCrash,
            _ => Durability::PowerLoss,
        })
    }

    pub(super) async fn close(&self) -> Result<(), LedgerError> {
        // Every call already committed before returning; nothing is queued.
        Ok(())
    }

    pub(super) async fn idem_begin(
        &self,
        key: &KeyId,
        idem_key: &str,
        body_hash: &[u8; 32],
    ) -> Result<IdemBegin, LedgerError> {
        let now = now_ms(&self.clock);
        let client = self.client().await?;
        let hash: &[u8] = body_hash;
        // The record may vanish between the insert and the read (abandoned);
        // then the insert is tried again.
        for _ in 0..3 {
            let inserted = client
                .query_opt(
                    "INSERT INTO idem (key, idem_key, body_hash, state, created_ms) \
                     VALUES ($1, $2, $3, 'inflight', $4) ON CONFLICT (key, idem_key) DO NOTHING RETURNING 1",
                    &[&key.as_str(), &idem_key, &hash, &now],
                )
                .await
                .map_err(pg)?;
            if inserted.is_some() {
                return Ok(IdemBegin::New);
            }
            // A record left in flight longer than a reservation may stay pending
            // belongs to a request whose gate stopped (its reservation has been
            // resolved by the policy since): answer it definitely, once.
            let answer = super::sqlite::interrupted_answer();
            let status = i32::from(answer.status);
            let stale_before = now.saturating_sub(self.ttl_ms);
            let taken_over = client
                .query_opt(
                    "UPDATE idem SET state = 'done', status = $4, body = $5 \
                     WHERE key = $1 AND idem_key = $2 AND body_hash = $3 AND state = 'inflight' \
                     AND created_ms < $6 RETURNING 1",
                    &[
                        &key.as_str(),
                        &idem_key,
                        &hash,
                        &status,
                        &answer.body,
                        &stale_before,
                    ],
                )
                .await
                .map_err(pg)?;
            if taken_over.is_some() {
                return Ok(IdemBegin::Replay(answer));
            }
            let row = client
                .query_opt(
                    "SELECT body_hash, state, status, body FROM idem WHERE key = $1 AND idem_key = $2",
                    &[&key.as_str(), &idem_key],
                )
                .await
                .map_err(pg)?;
            if let Some(row) = row {
                let stored: Vec<u8> = row.try_get(0).map_err(pg)?;
                let state: String = row.try_get(1).map_err(pg)?;
                let status: Option<i32> = row.try_get(2).map_err(pg)?;
                let body: Option<Vec<u8>> = row.try_get(3).map_err(pg)?;
                return Ok(super::sqlite::idem_outcome(
                    hash,
                    &stored,
                    &state,
                    status.map(i64::from),
                    body,
                ));
            }
        }
        Ok(IdemBegin::InFlight)
    }

    pub(super) async fn idem_finish(
        &self,
        key: &KeyId,
        idem_key: &str,
        answer: &StoredAnswer,
    ) -> Result<(), LedgerError> {
        let client = self.client().await?;
        let status = i32::from(answer.status);
        client
            .execute(
                "UPDATE idem SET state = 'done', status = $3, body = $4 WHERE key = $1 AND idem_key = $2",
                &[&key.as_str(), &idem_key, &status, &answer.body],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(super) async fn idem_abandon(
        &self,
        key: &KeyId,
        idem_key: &str,
    ) -> Result<(), LedgerError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM idem WHERE key = $1 AND idem_key = $2 AND state = 'inflight'",
                &[&key.as_str(), &idem_key],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(super) async fn put_key(&self, rec: &KeyRecord) -> Result<u64, LedgerError> {
        let json = serde_json::to_string(rec).map_err(|e| LedgerError::Storage(e.to_string()))?;
        let usable_until: Option<i64> = if rec.disabled {
            Some(0)
        } else {
            rec.expires_at.map(|t| t.timestamp_millis())
        };
        let client = self.client().await?;
        let res = client
            .query_one(
                "INSERT INTO keys (id, secret_hash, record, usable_until_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET secret_hash = excluded.secret_hash, record = excluded.record, \
                 usable_until_ms = excluded.usable_until_ms \
                 RETURNING change_seq",
                &[&rec.id.as_str(), &rec.secret_hash, &json, &usable_until],
            )
            .await;
        match res {
            Ok(row) => Ok(to_u64(row.try_get(0).map_err(pg)?)),
            Err(e) if is_unique_violation(&e) => Err(LedgerError::Conflict(
                "that secret already belongs to another key".into(),
            )),
            Err(e) => Err(pg(e)),
        }
    }

    async fn one_key(&self, sql: &str, arg: &str) -> Result<Option<KeyVersion>, LedgerError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg)?;
        let row = client.query_opt(&stmt, &[&arg]).await.map_err(pg)?;
        row.as_ref().map(key_version).transpose()
    }

    pub(super) async fn key_by_id(&self, id: &KeyId) -> Result<Option<KeyVersion>, LedgerError> {
        self.one_key(
            "SELECT record, change_seq FROM keys WHERE id = $1",
            id.as_str(),
        )
        .await
    }

    pub(super) async fn key_by_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<KeyVersion>, LedgerError> {
        self.one_key(
            "SELECT record, change_seq FROM keys WHERE secret_hash = $1",
            secret_hash,
        )
        .await
    }

    /// Where a poll from now on starts: the store's snapshot of its
    /// transactions (which have committed, which are still running).
    pub(super) async fn key_cursor(&self) -> Result<KeyCursor, LedgerError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(pg)?;
        Ok(KeyCursor::Snapshot(row.try_get(0).map_err(pg)?))
    }

    /// Keys written (and key rows deleted, `keys_gone`) by the transactions
    /// that `cursor`'s snapshot did not see committed and this statement's
    /// snapshot does, and that snapshot as the next cursor. Each committed
    /// write is read by exactly the first poll whose snapshot sees it, so a
    /// change is never skipped for committing after a later-numbered one (a
    /// cursor on the change sequence would skip it). The index narrows the
    /// search to transactions from the old snapshot's oldest running one on.
    pub(super) async fn keys_since(&self, cursor: &KeyCursor) -> Result<KeyChanges, LedgerError> {
        let KeyCursor::Snapshot(since) = cursor else {
            return Err(LedgerError::Storage(
                "a key cursor of the embedded ledger was passed to PostgreSQL".into(),
            ));
        };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH s AS (SELECT $1::text::pg_snapshot AS since, pg_current_snapshot() AS now) \
                 SELECT s.now::text, k.record, k.change_seq, NULL::text FROM s LEFT JOIN keys k \
                 ON k.change_xid >= pg_snapshot_xmin(s.since) \
                 AND NOT pg_visible_in_snapshot(k.change_xid, s.since) \
                 UNION ALL \
                 SELECT s.now::text, NULL, g.change_seq, g.id FROM s JOIN keys_gone g \
                 ON g.change_xid >= pg_snapshot_xmin(s.since) \
                 AND NOT pg_visible_in_snapshot(g.change_xid, s.since)",
            )
            .await
            .map_err(pg)?;
        let rows = client.query(&stmt, &[since]).await.map_err(pg)?;
        let mut next = since.clone();
        let (mut keys, mut gone) = (Vec::new(), Vec::new());
        for row in &rows {
            next = row.try_get(0).map_err(pg)?;
            let json: Option<String> = row.try_get(1).map_err(pg)?;
            let deleted: Option<String> = row.try_get(3).map_err(pg)?;
            let seq = || -> Result<u64, LedgerError> { Ok(to_u64(row.try_get(2).map_err(pg)?)) };
            if let Some(json) = json {
                keys.push((super::sqlite::parse_key(&json)?, seq()?));
            } else if let Some(id) = deleted {
                gone.push((KeyId(id), seq()?));
            }
        }
        Ok(KeyChanges {
            keys,
            gone,
            next: KeyCursor::Snapshot(next),
        })
    }

    pub(super) async fn key_count(&self) -> Result<u64, LedgerError> {
        Ok(to_u64(self.number("SELECT count(*) FROM keys").await?))
    }

    pub(super) async fn keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM keys ORDER BY id", &[])
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get(0).map_err(pg)?;
                super::sqlite::parse_key(&json)
            })
            .collect()
    }
}

impl PgLedger {
    pub(super) async fn keys_page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyVersion>, LedgerError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Every id sorts after '' (ids are never empty).
        let after = after.map_or("", |k| k.as_str());
        let rows = client
            .query(
                "SELECT record, change_seq FROM keys WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(key_version).collect()
    }
}

/// The task registry, in the same database as the ledger so replicas share it.
impl PgLedger {
    pub(super) async fn put_task(&self, rec: &TaskRecord) -> Result<(), LedgerError> {
        let row = TaskRow::of(rec)?;
        let params: Params = vec![
            Box::new(row.task_id.clone()),
            Box::new(row.key.clone()),
            Box::new(row.state),
            Box::new(row.created_ms),
            Box::new(row.record.clone()),
        ];
        match self.batch.run(Stmt::Task, params, row.key.clone()).await {
            Ok(_) => Ok(()),
            Err(Batched::Failed(e)) => Err(LedgerError::Storage(e)),
            Err(Batched::Alone) => {
                self.client()
                    .await?
                    .execute(
                        PUT_TASK,
                        &[
                            &row.task_id,
                            &row.key,
                            &row.state,
                            &row.created_ms,
                            &row.record,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            }
        }
    }

    pub(super) async fn task(&self, id: &str) -> Result<Option<TaskRecord>, LedgerError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT state, record FROM tasks WHERE task_id = $1", &[&id])
            .await
            .map_err(pg)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let s: String = r.try_get(0).map_err(pg)?;
                let j: String = r.try_get(1).map_err(pg)?;
                super::sqlite::task_from_row(&s, &j).map(Some)
            }
        }
    }

    pub(super) async fn end_task(
        &self,
        id: &str,
        state: TaskState,
        at_ms: i64,
    ) -> Result<bool, LedgerError> {
        // One conditional UPDATE: of concurrent enders (replicas, duplicate
        // callbacks, polls) exactly one sees a row changed.
        let row = self
            .client()
            .await?
            .query_one(END_TASK, &[&id, &super::stored_end(state), &at_ms])
            .await
            .map_err(pg)?;
        Ok(row.try_get::<_, i64>(0).map_err(pg)? == 1)
    }

    pub(super) async fn due_tasks(
        &self,
        due: super::Due,
        checked_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, LedgerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                // The state is written out so that the partial index on it is used.
                match due {
                    super::Due::Check => {
                        "SELECT state, record FROM tasks WHERE state = 'open' AND checked_ms < $1 \
                         ORDER BY checked_ms LIMIT $2"
                    }
                    super::Due::Refund => {
                        "SELECT state, record FROM tasks WHERE state = 'refund_due' \
                         AND checked_ms < $1 ORDER BY checked_ms LIMIT $2"
                    }
                },
                &[&checked_before_ms, &limit],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get(0).map_err(pg)?;
                let j: String = r.try_get(1).map_err(pg)?;
                super::sqlite::task_from_row(&s, &j)
            })
            .collect()
    }

    pub(super) async fn refund_recorded(&self, id: &str) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "UPDATE tasks SET state = 'fail' WHERE task_id = $1 AND state = 'refund_due'",
                &[&id],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(super) async fn touch_task(&self, id: &str, at_ms: i64) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "UPDATE tasks SET checked_ms = $2 WHERE task_id = $1",
                &[&id, &at_ms],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(super) async fn open_task_counts(&self) -> Result<Vec<(KeyId, u32)>, LedgerError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, COUNT(*) FROM tasks WHERE state = 'open' GROUP BY key",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let k: String = r.try_get(0).map_err(pg)?;
                let n: i64 = r.try_get(1).map_err(pg)?;
                Ok((KeyId(k), u32::try_from(n).unwrap_or(u32::MAX)))
            })
            .collect()
    }
}
