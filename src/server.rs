//! Starting and stopping a gate: the listeners, the background work, and the
//! graceful drain. Everything long-lived starts in [`start`] and stops in
//! [`Running::shutdown`], in that one place.

use crate::admin;
use crate::audit::{Audit, AuditWriter};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::gate::{self, Gate, GateInner};
use crate::keys::KeyCache;
use crate::ledger::{Durability, KeyCursor, Ledger, LedgerError};
use crate::points::KeyId;
use crate::upstream::client::Upstream;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why a gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The admin listener would be open to the network without a token.
    #[error("refusing to open the admin listener on non-loopback {0} without GATE_ADMIN_TOKEN")]
    AdminWithoutToken(SocketAddr),
    /// The ledger could not open.
    #[error("ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The audit log could not open.
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The upstream client could not be built.
    #[error("upstream: {0}")]
    Upstream(#[from] crate::upstream::client::ForwardError),
    /// The data directory holds settlements for a shared store, and the gate
    /// is not configured with one.
    #[error(
        "the data directory's {file} holds {0} settlement(s) held back during an outage of \
         the PostgreSQL ledger: start the gate with that ledger to write them",
        file = crate::held::FILE
    )]
    HeldWithoutSharedStore(usize),
    /// The held settlements' file cannot be read.
    #[error("held settlements: {0}")]
    Held(#[from] crate::held::HeldError),
    /// The data directory could not be created.
    #[error("data directory {0}: {1}")]
    DataDir(String, std::io::Error),
}

/// A running gate.
pub struct Running {
    /// The client listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// The shared state (tests reach the ledger through it).
    pub gate: Gate,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    audit_writer: Option<AuditWriter>,
}

/// Open the ledger and audit log, load the keys, bind both listeners and serve.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    start_with_clock(cfg, Arc::new(SystemClock)).await
}

/// As [`start`], with an injected clock.
pub async fn start_with_clock(cfg: Config, clock: SharedClock) -> Result<Running, StartError> {
    if !cfg.admin_listen.ip().is_loopback() && cfg.admin_token.is_empty() {
        return Err(StartError::AdminWithoutToken(cfg.admin_listen));
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| StartError::DataDir(cfg.data_dir.display().to_string(), e))?;
    // Settlements an earlier run held back during a store outage: written
    // below, before anything is served; their reservations are spared by the
    // ledger's crash recovery, which would otherwise apply `pending_policy`.
    let held = crate::held::Held::open(&cfg.data_dir)?;
    if !held.is_empty() && !cfg.ledger.shared() {
        return Err(StartError::HeldWithoutSharedStore(held.len()));
    }
    let ledger = Ledger::open_sparing(&cfg.ledger, clock.clone(), &held.ids()).await?;
    // Read back from the store, not the config: what a power cut could cost.
    match ledger.durability().await? {
        Durability::PowerLoss => tracing::info!(
            backend = ?cfg.ledger.backend,
            "ledger durability: power-loss (every commit is on disk before the gate acts on it)"
        ),
        Durability::ProcessCrash => tracing::warn!(
            backend = ?cfg.ledger.backend,
            "ledger durability: process-crash (a power cut or a crash of the store's machine \
             can lose the last commits; requests forwarded then go unbilled)"
        ),
    }
    if crate::sched::one_cpu() {
        tracing::info!("one CPU: the ledger and audit writers run under SCHED_BATCH");
    }
    let (audit, audit_writer) = if cfg.audit.enabled {
        let (a, w) = Audit::open(&cfg.audit, clock.clone()).await?;
        (a, Some(w))
    } else {
        (Audit::disabled(), None)
    };
    let upstream = Upstream::new(&cfg.upstream)?;
    let keys = KeyCache::default();
    // Taken before the load, so that a change made meanwhile on another replica
    // is picked up by the first poll; polling from 0 would read every key again.
    let key_cursor = ledger.key_cursor().await?;
    keys.reserve(usize::try_from(ledger.key_count().await?).unwrap_or(usize::MAX));
    load_keys(&ledger, &keys).await?;
    // Tasks still open count against their keys' concurrency limits.
    let open_tasks = ledger.open_task_counts().await?;
    let callback_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            StartError::Upstream(crate::upstream::client::ForwardError::NotSent(
                e.to_string(),
            ))
        })?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.admin_listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.admin_listen,
            source,
        })?;
    let shared_store = cfg.ledger.shared();
    let gate = Gate::new(GateInner {
        cfg,
        ledger,
        audit,
        upstream,
        keys,
        clock,
        metrics: Default::default(),
        tasks: Default::default(),
        // With a shared store a key's tasks in flight are counted in the store.
        limits: crate::limits::Limits::new(!shared_store),
        workflows: Default::default(),
        callback_client,
        held: Arc::new(held),
        requests: Default::default(),
    });
    if !gate.held.is_empty() {
        tracing::warn!(
            count = gate.held.len(),
            "writing settlements an earlier run held back during a store outage"
        );
        crate::gate::settle_owed(&gate).await;
    }
    for (key, n) in open_tasks {
        gate.limits.restore(&key, n);
    }
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let g = gate.clone();
    tasks.push(tokio::spawn(serve_loop(
        listener,
        stop_rx.clone(),
        g.cfg.limits.header_read_timeout_secs,
        Duration::from_secs(g.cfg.limits.drain_secs),
        move |req| {
            let g = g.clone();
            async move { Ok::<_, std::convert::Infallible>(gate::handle(g, req).await) }
        },
    )));
    let g = gate.clone();
    tasks.push(tokio::spawn(serve_loop(
        admin_listener,
        stop_rx.clone(),
        g.cfg.limits.header_read_timeout_secs,
        Duration::from_secs(5),
        move |req| {
            let g = g.clone();
            async move { Ok::<_, std::convert::Infallible>(admin::handle(g, req).await) }
        },
    )));
    if shared_store {
        tasks.push(tokio::spawn(key_sync(
            gate.clone(),
            stop_rx.clone(),
            key_cursor,
        )));
    }
    tasks.push(tokio::spawn(housekeeping(gate.clone(), stop_rx)));
    tracing::info!(%addr, %admin_addr, upstream = gate.upstream.base(), "gate listening");
    Ok(Running {
        addr,
        admin_addr,
        gate,
        stop,
        tasks,
        audit_writer,
    })
}

/// Keys read from the store per page when (re)loading the key cache.
const KEY_PAGE: usize = 1000;

/// Puts every key of the store into the cache, a page at a time so that the
/// store's records are never all in memory at once, then drops cached keys the
/// store no longer has. A failure part-way drops nothing.
async fn load_keys(ledger: &Ledger, keys: &KeyCache) -> Result<usize, LedgerError> {
    let mut reload = keys.reload();
    let mut after: Option<KeyId> = None;
    loop {
        let page = ledger.keys_page(after.as_ref(), KEY_PAGE).await?;
        reload.put_page(&page);
        match page.last() {
            Some(last) if page.len() == KEY_PAGE => after = Some(last.0.id.clone()),
            _ => break,
        }
    }
    Ok(reload.finish())
}

/// With a shared store, keeps the key cache in step with it, so that changes
/// made on another replica take effect here too: the keys changed since
/// `cursor` are read whenever the store reports a change (`Ledger::listen_keys`),
/// and every `ledger.key_poll_secs` in case a report was lost; a key whose row
/// was deleted behind the gate's back is dropped by the same poll. Every key is
/// read again once a minute, in case a poll failed for longer than the store
/// keeps the deletions (an hour).
/// A task of its own, so that nothing else the gate waits on delays it.
async fn key_sync(gate: Gate, mut stop: watch::Receiver<bool>, mut cursor: KeyCursor) {
    let ledger = gate.ledger.clone();
    let listener = AbortOnDrop(tokio::spawn(async move { ledger.listen_keys().await }));
    let watch = gate.ledger.key_watch();
    let changed = || async {
        match &watch {
            Some(w) => w.changed.notified().await,
            None => std::future::pending().await,
        }
    };
    let mut poll = tokio::time::interval(Duration::from_secs(gate.cfg.ledger.key_poll_secs.max(1)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let minute = Duration::from_secs(60);
    let mut reload = tokio::time::interval_at(tokio::time::Instant::now() + minute, minute);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = changed() => {}
            _ = reload.tick() => {
                if let Err(e) = load_keys(&gate.ledger, &gate.keys).await {
                    tracing::warn!(error = %e, "reloading keys failed");
                }
                continue;
            }
            _ = stop.changed() => break,
        }
        match gate.ledger.keys_since(&cursor).await {
            Ok(changes) => {
                cursor = changes.next;
                gate.keys.forget_all(&changes.gone);
                gate.keys.put_all(&changes.keys);
            }
            Err(e) => tracing::debug!(error = %e, "reading changed keys failed"),
        }
    }
    drop(listener);
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Background upkeep: forget settled transfers kept in memory; resolve expired
/// reservations; check open tasks nobody polls; make refunds cut off by a crash.
async fn housekeeping(gate: Gate, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Settled transfers are forgotten more often than once a second: under load
    // the memory they hold is proportional to the time they are kept.
    let mut forget = tokio::time::interval(Duration::from_millis(250));
    forget.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut trim = crate::memory::QuietTrim::default();
    // Expired reservations are looked for every 10 s, or as often as they
    // can expire when `pending_ttl_secs` is shorter; since when the store has
    // answered every round (see `sweep_expired`).
    let sweep_every = gate.cfg.ledger.pending_ttl_secs.clamp(1, 10);
    let mut reachable_since: Option<Instant> = None;
    // The background check waits for the upstream, which may be slow: it runs
    // in a task of its own, one round at a time, so that it never holds up
    // the rest of the upkeep (key changes from other replicas, forgetting
    // settled transfers, expiry). Stopping aborts it; a refund it cut off is
    // made by the sweep.
    let mut check: Option<tokio::task::JoinHandle<()>> = None;
    // Settlements held back by a shared store's outage (`gate::settle_owed`),
    // written once a second while there are any, one round at a time.
    let mut owed: Option<tokio::task::JoinHandle<()>> = None;
    // Refunds cut off by a crash of this gate (or of a replica) are made once
    // at start, then looked for every 10 s.
    let swept = crate::tasks::refund_due(&gate, Duration::ZERO).await;
    if swept > 0 {
        tracing::warn!(count = swept, "refunds cut off before this start made");
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = forget.tick() => {
                if let Err(e) = gate.ledger.forget_settled() {
                    tracing::error!(error = %e, "forgetting settled transfers failed");
                }
                continue;
            }
            _ = stop.changed() => {
                for t in [check.take(), owed.take()].into_iter().flatten() {
                    t.abort();
                }
                return;
            }
        }
        n += 1;
        if gate.cfg.ledger.shared() {
            // In a task of its own: a write to a store that is still away may
            // wait for a connection timeout.
            if !gate.held.is_empty() && owed.as_ref().is_none_or(|o| o.is_finished()) {
                let gate = gate.clone();
                owed = Some(tokio::spawn(async move {
                    crate::gate::settle_owed(&gate).await;
                }));
            }
            sync_fleet_counts(&gate, n).await;
        }
        if n % gate.cfg.tasks.check_interval_secs.max(1) == 0
            && check.as_ref().is_none_or(|c| c.is_finished())
        {
            let gate = gate.clone();
            check = Some(tokio::spawn(async move {
                crate::tasks::check_due(&gate).await;
            }));
        }
        if n % 10 == 5 {
            crate::tasks::refund_due(&gate, crate::tasks::REFUND_GRACE).await;
        }
        if trim.tick(gate.metrics.requests_total()) {
            let started = Instant::now();
            let _ = tokio::task::spawn_blocking(crate::memory::release_free_memory).await;
            tracing::debug!(
                ms = started.elapsed().as_secs_f64() * 1e3,
                "free heap memory released"
            );
        }
        if n % sweep_every == 0 {
            reachable_since = sweep_expired(&gate, reachable_since).await;
        }
    }
}

/// How long a shared store must have answered every round of the expiry
/// sweep before a replica resolves reservations by `pending_policy` again.
const SWEEP_GRACE: Duration = Duration::from_secs(10);

/// Resolves expired reservations by `pending_policy`. With a shared store,
/// only once the store has answered every round for [`SWEEP_GRACE`]
/// (`reachable_since`; until then a round only checks that it answers): after
/// an outage, the replica that holds a reservation's settlement
/// (`crate::held`) writes it within a second or two of the store's return,
/// so the upstream's answer decides it, not another replica's sweep. This
/// gate's own held settlements are spared outright. Returns since when the
/// store has answered.
async fn sweep_expired(gate: &Gate, reachable_since: Option<Instant>) -> Option<Instant> {
    use crate::metrics::ExpiryRound;
    let shared = gate.cfg.ledger.shared();
    if shared && reachable_since.is_none_or(|t| t.elapsed() < SWEEP_GRACE) {
        return match gate.ledger.ping().await {
            Ok(()) => {
                gate.metrics.expiry_round(ExpiryRound::Waited);
                Some(reachable_since.unwrap_or_else(Instant::now))
            }
            Err(_) => {
                gate.metrics.expiry_round(ExpiryRound::Failed);
                None
            }
        };
    }
    match gate.ledger.expire_pending_sparing(&gate.held.ids()).await {
        Ok(v) => {
            gate.metrics.expiry_round(ExpiryRound::Swept);
            if !v.is_empty() {
                tracing::warn!(count = v.len(), "expired pending reservations resolved");
            }
            reachable_since
        }
        Err(e) => {
            gate.metrics.expiry_round(ExpiryRound::Failed);
            tracing::error!(error = %e, "expiring reservations failed");
            None
        }
    }
}

/// With a shared store: the global cap on tasks in flight counts the tasks of
/// all replicas, read from the store every second (a task ended on another
/// replica frees its place here within the second); and once a minute each
/// account's count of tasks in flight is checked against its chains and tasks
/// and corrected where replicas of an older version did not keep it.
async fn sync_fleet_counts(gate: &Gate, n: u64) {
    if gate.cfg.tasks.global_concurrency.is_some() {
        match gate.ledger.fleet_in_flight().await {
            Ok(Some(total)) => gate
                .limits
                .set_total(u32::try_from(total).unwrap_or(u32::MAX)),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the fleet's tasks in flight failed"),
        }
    }
    if n % 60 == 30 {
        match gate.ledger.heal_in_flight().await {
            Ok(keys) if !keys.is_empty() => tracing::warn!(
                count = keys.len(),
                "tasks-in-flight counts corrected (a replica of an older version, or an edit by hand)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checking the tasks-in-flight counts failed"),
        }
    }
}

/// Accept connections until told to stop, then drain the open ones (bounded).
async fn serve_loop<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    header_timeout_secs: u64,
    drain: Duration,
    svc: F,
) where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = Result<
                hyper::Response<http_body_util::Full<bytes::Bytes>>,
                std::convert::Infallible,
            >,
        > + Send
        + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(header_timeout_secs))
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service_fn(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
    }
}

impl Running {
    /// Stop accepting, drain in-flight requests, flush the audit log and the ledger.
    pub async fn shutdown(mut self) {
        let deadline = Instant::now() + Duration::from_secs(self.gate.cfg.limits.drain_secs);
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Requests whose clients hung up run on with no connection for the
        // drain to wait for: a paid draw among them still settles.
        let requests = &self.gate.requests;
        requests.close();
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        if tokio::time::timeout(wait, requests.wait()).await.is_err() {
            tracing::warn!(
                count = requests.len(),
                "requests still running at the end of the drain; their reservations are left to recovery"
            );
        }
        if let Err(e) = self.gate.audit.flush().await {
            tracing::error!(error = %e, "audit flush failed");
        }
        if let Some(w) = self.audit_writer.take() {
            w.shutdown().await;
        }
        if let Err(e) = self.gate.ledger.close().await {
            tracing::error!(error = %e, "ledger close failed");
        }
        tracing::info!("gate stopped");
    }
}

/// Wait for SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
