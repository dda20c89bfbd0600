//! Group commit for the PostgreSQL ledger.
//!
//! The gate's hot writes -- reservations, commits and voids, task registrations --
//! are queued to one task per gate, which applies whatever has queued up while
//! its previous batch ran as ONE transaction: `BEGIN`, a statement that locks
//! every account the batch touches in key order, the jobs' own statements in
//! arrival order, `COMMIT`, all sent at once (pipelined). So a burst of N writes
//! waits for one WAL flush instead of N, and a hot account's row lock is held for
//! one commit instead of N of them in turn.
//!
//! - **Lock order.** Every batch locks its accounts in ascending key order before
//!   anything else, so batches of different replicas cannot deadlock on them; the
//!   other writers (admin changes, refunds) lock one account per transaction.
//!   The lock statement takes account keys only: a settlement's caller names
//!   the chain's account (`PgLedger` remembers it from the reservation, or reads
//!   it), because a lookup in `chains` inside the lock statement slowed down as
//!   that table grew (docs/benchmarks.md, "PostgreSQL group commit").
//! - **All or nothing.** Jobs see each other's effects in arrival order, as they
//!   would one after another. If any statement fails (a deadlock with a refund, a
//!   race on a chain id with another replica, a lost connection), the batch is
//!   rolled back and every job in it is answered [`Batched::Alone`]: its caller
//!   runs it by itself, on the one-statement path. That is safe because every
//!   batched write is idempotent by its id: a reservation whose chain id exists,
//!   or a settlement whose chain is no longer pending, is answered as a replay,
//!   and a task registration is `ON CONFLICT DO NOTHING`.
//! - **One job** queued alone (a quiet gate) runs as a single autocommit
//!   statement, as before batching: one round trip, no `BEGIN`/`COMMIT`.
//! - **A lock held elsewhere** (an operator's open transaction in `psql`) would
//!   hold every batch that touches its account, and every job queued behind
//!   it, for as long as it is held. Each session waits for a lock at most
//!   `ledger.lock_timeout_ms`; a batch that timed out is rolled back like any
//!   other, and for [`HOLD_BACK`] afterwards the jobs of its accounts are
//!   answered [`Batched::Alone`] at once, so that they wait on their own
//!   account's lock only, in their callers' statements, not in everyone's batch.

use super::{GroupCommits, LedgerError};
use deadpool_postgres::Pool;
use futures_util::future::{maybe_done, MaybeDone};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// At most this many jobs in one transaction.
const MAX_BATCH: usize = 128;

/// How long the accounts of a batch that waited out its lock timeout are kept
/// out of batches.
pub(super) const HOLD_BACK: std::time::Duration = std::time::Duration::from_secs(5);

/// Locks every account of a batch, in key order, before any job runs (also
/// the heal's lock, `PgLedger::heal_in_flight`).
pub(super) const LOCK_ACCOUNTS: &str =
    "SELECT 1 FROM accounts WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE";

/// Which statement a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stmt {
    Reserve,
    Commit,
    Void,
    Task,
}

pub(super) type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// `params` as tokio-postgres takes them.
pub(super) fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// Why a job came back without rows.
#[derive(Debug, Clone)]
pub(super) enum Batched {
    /// Its batch was rolled back: run it alone.
    Alone,
    /// The ledger cannot take writes now (no connection): why.
    Failed(String),
}

impl From<Batched> for LedgerError {
    fn from(b: Batched) -> LedgerError {
        match b {
            Batched::Alone => LedgerError::Storage("the ledger batch was rolled back".into()),
            Batched::Failed(why) => LedgerError::Storage(why),
        }
    }
}

struct Job {
    stmt: Stmt,
    params: Params,
    /// The key of the account the job changes (every job changes one: a task
    /// registration counts a task in flight), for the batch's lock statement.
    account: String,
    reply: oneshot::Sender<Result<Vec<Row>, Batched>>,
}

/// The SQL text of each [`Stmt`], in the order of its variants.
pub(super) type Sql = [String; 4];

/// The handle that queues jobs; the batching task ends when it is dropped.
pub(super) struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    commits: Arc<GroupCommits>,
}

impl Batcher {
    /// Starts the batching task on the current runtime.
    pub(super) fn start(pool: Pool, sql: Sql) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let commits = Arc::new(GroupCommits::default());
        tokio::spawn(serve(pool, sql, rx, Arc::clone(&commits)));
        Batcher { tx, commits }
    }

    /// The transactions the batches committed.
    pub(super) fn commits(&self) -> &GroupCommits {
        &self.commits
    }

    /// Runs one statement, which changes the account of key `account`, in the
    /// next batch and returns its rows once the batch has committed.
    pub(super) async fn run(
        &self,
        stmt: Stmt,
        params: Params,
        account: String,
    ) -> Result<Vec<Row>, Batched> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            stmt,
            params,
            account,
            reply,
        };
        let stopped = || Batched::Failed("the ledger's batcher stopped".into());
        self.tx.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn serve(
    pool: Pool,
    sql: Sql,
    mut rx: mpsc::UnboundedReceiver<Job>,
    commits: Arc<GroupCommits>,
) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    // Accounts whose batch waited out its lock timeout, until when.
    let mut held_back: std::collections::HashMap<String, tokio::time::Instant> =
        std::collections::HashMap::new();
    while let Some(first) = rx.recv().await {
        let now = tokio::time::Instant::now();
        held_back.retain(|_, until| *until > now);
        let mut next = Some(first);
        while let Some(job) = next.take() {
            if held_back.contains_key(&job.account) {
                let _ = job.reply.send(Err(Batched::Alone));
            } else {
                jobs.push(job);
            }
            if jobs.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let answers: Vec<Result<Vec<Row>, Batched>> = match run_batch(&pool, &sql, &jobs).await {
            Ok(answers) => {
                commits.committed(answers.len());
                answers.into_iter().map(Ok).collect()
            }
            Err((why, lock_timeout)) => {
                if matches!(why, Batched::Alone) && jobs.len() > 1 {
                    commits.rolled_back();
                }
                if lock_timeout {
                    let until = tokio::time::Instant::now() + HOLD_BACK;
                    for j in &jobs {
                        held_back.insert(j.account.clone(), until);
                    }
                    tracing::warn!(
                        accounts = jobs.len(),
                        "a ledger batch waited out its lock timeout (a lock held elsewhere); \
                         its accounts are written outside batches for a while"
                    );
                }
                jobs.iter().map(|_| Err(why.clone())).collect()
            }
        };
        for (job, answer) in jobs.drain(..).zip(answers) {
            // A caller that went away (its request was dropped) needs no answer.
            let _ = job.reply.send(answer);
        }
    }
}

type Pending<'a> = Pin<
    Box<
        MaybeDone<
            Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>,
        >,
    >,
>;

/// Whether a statement failed for waiting out `lock_timeout`.
fn lock_timed_out(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// Applies `jobs` in one transaction; the rows of each job's statement, in
/// order, or why none, and whether it was for a lock timeout.
async fn run_batch(pool: &Pool, sql: &Sql, jobs: &[Job]) -> Result<Vec<Vec<Row>>, (Batched, bool)> {
    let client = pool
        .get()
        .await
        .map_err(|e| (Batched::Failed(format!("ledger pool: {e}")), false))?;
    let mut stmts = Vec::with_capacity(4);
    for text in sql {
        stmts.push(client.prepare_cached(text).await.map_err(|e| {
            tracing::warn!(error = %e, "ledger batch: prepare failed");
            (Batched::Alone, false)
        })?);
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = jobs.iter().map(|j| refs(&j.params)).collect();
    if let [job] = jobs {
        // Alone in the queue: one autocommit statement.
        return client
            .query(&stmts[job.stmt as usize], &params[0])
            .await
            .map(|rows| vec![rows])
            .map_err(|e| {
                tracing::debug!(error = %e, "ledger write failed; retrying alone");
                (Batched::Alone, lock_timed_out(&e))
            });
    }
    let keys: Vec<&str> = jobs.iter().map(|j| j.account.as_str()).collect();
    let lock = client
        .prepare_cached(LOCK_ACCOUNTS)
        .await
        .map_err(|_| (Batched::Alone, false))?;
    let begin = client.batch_execute("BEGIN");
    let lock_params: [&(dyn ToSql + Sync); 1] = [&keys];
    let locked = client.query(&lock, &lock_params);
    let mut pending: Vec<Pending<'_>> = jobs
        .iter()
        .zip(&params)
        .map(|(j, p)| {
            let fut: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                Box::pin(client.query(&stmts[j.stmt as usize], p));
            Box::pin(maybe_done(fut))
        })
        .collect();
    let commit = client.batch_execute("COMMIT");
    // Pipelining: a tokio-postgres request goes out on its future's first poll,
    // and the server answers in order; so poll each once, in order, then wait.
    let mut begin = Box::pin(maybe_done(begin));
    let mut locked = Box::pin(maybe_done(locked));
    let mut commit = Box::pin(maybe_done(commit));
    let _ = futures_util::poll!(begin.as_mut());
    let _ = futures_util::poll!(locked.as_mut());
    for p in &mut pending {
        let _ = futures_util::poll!(p.as_mut());
    }
    let _ = futures_util::poll!(commit.as_mut());
    begin.as_mut().await;
    locked.as_mut().await;
    for p in &mut pending {
        p.as_mut().await;
    }
    commit.as_mut().await;
    let mut failed = None;
    let begun = begin.as_mut().take_output().and_then(Result::err);
    let lock_err = locked.as_mut().take_output().and_then(Result::err);
    let mut out = Vec::with_capacity(jobs.len());
    for p in &mut pending {
        match p.as_mut().take_output() {
            Some(Ok(rows)) => out.push(rows),
            Some(Err(e)) => {
                failed.get_or_insert(e);
            }
            None => {}
        }
    }
    // A statement that failed turned the COMMIT into a rollback; so the batch
    // committed only if every part of it succeeded.
    let committed = commit.as_mut().take_output().and_then(Result::err);
    if let Some(e) = begun.or(lock_err).or(failed).or(committed) {
        tracing::warn!(error = %e, jobs = jobs.len(), "ledger batch rolled back; its writes run alone");
        return Err((Batched::Alone, lock_timed_out(&e)));
    }
    if out.len() != jobs.len() {
        return Err((Batched::Alone, false));
    }
    Ok(out)
}
