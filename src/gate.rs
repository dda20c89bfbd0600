//! The request path: the whole life of a client request, in order, in this file.
//!
//! ```text
//! authenticate → route → (read body) → price → reserve → forward → settle → reply → audit
//! ```
//!
//! Each phase is a function named after it. Its result type says how it can end:
//! `Err(Reject)` stops the request with an answer in the upstream's envelope and
//! nothing charged. Only [`reply`] turns outcomes into HTTP responses.
//!
//! Money safety rests on three rules kept here:
//! - a billable request is forwarded only after its reservation is durable;
//! - every request runs in a task of its own, so a client that hangs up cannot leave
//!   a reservation unsettled (hyper drops only the future that waits for it), and a
//!   stop waits for those tasks (`GateInner::requests`);
//! - a settlement is durable before the client gets its answer (in the ledger, or,
//!   while a shared store is away, in the held settlements' file: `crate::held`).

use crate::audit::{Audit, Fields};
use crate::clock::SharedClock;
use crate::config::{Config, RejectStatus, UnknownOutcome};
use crate::envelope::{self, Code};
use crate::held::{Decided, Held, HeldAnswer, Owed};
use crate::json_edit;
use crate::keys::{ActiveKey, KeyCache};
use crate::ledger::{IdemBegin, KeyTerms, Ledger, LedgerError, Settled, StoredAnswer, SubmitRate};
use crate::points::{KeyId, Points, TransferId};
use crate::pricing::{self, Endpoint, PriceInputs, Priced, Quote};
use crate::tasks::{self, TaskRecord, TaskState};
use crate::upstream::client::{Answer, ForwardError, Upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything a request needs, behind one cheap-to-clone handle.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

/// The shared state of a running gate.
pub struct GateInner {
    /// The configuration it was started with.
    pub cfg: Config,
    /// The ledger (budgets, reservations, key records).
    pub ledger: Ledger,
    /// The audit log.
    pub audit: Audit,
    /// The pooled upstream client.
    pub upstream: Upstream,
    /// Keys by secret hash.
    pub keys: KeyCache,
    /// The clock.
    pub clock: SharedClock,
    /// Request counters and histograms.
    pub metrics: crate::metrics::Metrics,
    /// Task ownership cache (the registry itself is in the ledger's store).
    pub tasks: crate::tasks::TaskCache,
    /// Per-key rate and concurrency limits.
    pub limits: crate::limits::Limits,
    /// Workflow `consume` by workflow id, fetched once.
    pub workflows: dashmap::DashMap<String, Points>,
    /// Client for forwarding callbacks to clients (not the upstream's pool).
    pub callback_client: reqwest::Client,
    /// With a shared store: settlements the store did not take within
    /// `ledger.settle_retry_secs`, kept on disk too and written by
    /// [`settle_owed`] once it is back.
    pub held: Arc<Held>,
    /// Every request's task ([`handle`]): a stop waits for them all, also
    /// those whose client hung up and so hold no connection open.
    pub requests: tokio_util::task::TaskTracker,
}

/// Counts and audits a settlement the ledger took: the points charged, or
/// the reservation's points voided.
async fn record_settlement(
    gate: &Gate,
    (key, key_name): (&KeyId, &str),
    id: &TransferId,
    how: &Decided,
    reserved: Points,
    remaining: Points,
) {
    let transition = how.transition();
    let (kind, points) = match how {
        Decided::Commit { points, .. } => ("charged", *points),
        Decided::Void => ("voided", reserved),
    };
    gate.metrics.points(key.as_str(), kind, points.get());
    audit_transition(gate, key, key_name, id, transition, points, remaining).await;
}

/// Writes the settlements kept by [`settle`] while the shared store was away
/// (and those an earlier run of the gate kept in its data directory), oldest
/// first, until the store refuses one for being unreachable again. A
/// settlement the ledger refuses otherwise (its reservation expired and was
/// resolved by `pending_policy` meanwhile, on another replica) is dropped:
/// the ledger has settled it.
pub async fn settle_owed(gate: &Gate) {
    for id in gate.held.ids() {
        let Some(owed) = gate.held.get(&id) else {
            continue;
        };
        if !owed.written {
            match owed.how.write(&gate.ledger, &id).await {
                Ok(settled) => {
                    if settled.replay && already_audited(gate, &id, &owed.how).await {
                        tracing::info!(transfer = %id, "a held settlement was already written and audited by an earlier run");
                    } else {
                        record_settlement(
                            gate,
                            (&owed.key, &owed.key_name),
                            &id,
                            &owed.how,
                            owed.reserved,
                            settled.remaining,
                        )
                        .await;
                    }
                    tracing::warn!(transfer = %id, "a settlement held back by a store outage was written");
                    // Kept until its answer, if any, is stored: the request
                    // may still be attaching one.
                    if let Err(e) = gate.held.mark_written(&id).await {
                        tracing::error!(transfer = %id, error = %e, "cannot rewrite {}", crate::held::FILE);
                    }
                }
                Err(LedgerError::Storage(e)) => {
                    tracing::debug!(error = %e, "the shared store still does not take settlements");
                    break;
                }
                Err(e) => {
                    release_held(gate, &id).await;
                    tracing::warn!(transfer = %id, error = %e, "a settlement held back by a store outage was already resolved by the ledger");
                    continue;
                }
            }
        }
        if let Some(a) = &owed.answer {
            match store_answer(gate, &owed.key, a).await {
                Err(LedgerError::Storage(e)) => {
                    tracing::debug!(error = %e, "the shared store still does not take answers");
                    break;
                }
                Err(e) => {
                    tracing::warn!(transfer = %id, error = %e, "an idempotent answer held back by a store outage was refused")
                }
                Ok(()) => {}
            }
        }
        // An answer attached since `owed` was read keeps the entry for the
        // next round.
        if let Err(e) = gate
            .held
            .release_unless_answered(&id, owed.answer.is_some())
            .await
        {
            tracing::error!(transfer = %id, error = %e, "cannot rewrite {}; the next start replays this settlement", crate::held::FILE);
        }
    }
}

/// Whether the audit log already has the record of held settlement `id`, which
/// the ledger reports it had applied: a run killed after writing it but before
/// rewriting the held file, or a write whose acknowledgement the store lost.
/// Only the log can tell whether that run made the record; in doubt (no log, a
/// read error, an id without a time) the record is made again, since a
/// duplicate is easier to explain to an auditor than a gap.
async fn already_audited(gate: &Gate, id: &TransferId, how: &Decided) -> bool {
    let (Some(dir), Some(ms)) = (gate.audit.dir(), id.created_ms()) else {
        return false;
    };
    let (dir, request_id, transition) = (dir.to_path_buf(), id.0.clone(), how.transition());
    // Written after the reservation was made: a second's slack for file times.
    let after = std::time::UNIX_EPOCH + Duration::from_millis(ms.saturating_sub(1_000));
    let found = tokio::task::spawn_blocking(move || {
        crate::audit::has_ledger_record(&dir, &request_id, transition, after)
    })
    .await;
    match found {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(transfer = %id, error = %e, "cannot search the audit log; recording the held settlement again");
            false
        }
        Err(_) => false,
    }
}

/// Holds an idempotent submit's answer with its held settlement, for
/// [`settle_owed`] to store once the store is back. If the settlement was
/// written meanwhile, the answer is stored at once, if the store takes it.
async fn hold_answer(gate: &Gate, key: &KeyId, id: &TransferId, ik: &str, stored: StoredAnswer) {
    let Ok(body) = String::from_utf8(stored.body) else {
        return; // Not JSON text: the upstream's answers are.
    };
    let answer = HeldAnswer {
        idem_key: ik.to_owned(),
        status: stored.status,
        body,
    };
    let attached = match gate.held.attach_answer(id, answer.clone()).await {
        Ok(attached) => attached,
        Err(e) => {
            tracing::error!(transfer = %id, error = %e, "cannot keep an idempotent answer on disk");
            true
        }
    };
    if !attached {
        if let Err(e) = store_answer(gate, key, &answer).await {
            tracing::warn!(transfer = %id, error = %e, "an idempotent answer could not be stored");
        }
    }
}

/// Stores an idempotent submit's held answer for its key.
async fn store_answer(gate: &Gate, key: &KeyId, a: &HeldAnswer) -> Result<(), LedgerError> {
    let stored = StoredAnswer {
        status: a.status,
        body: a.body.clone().into_bytes(),
    };
    gate.ledger.idem_finish(key, &a.idem_key, &stored).await
}

async fn release_held(gate: &Gate, id: &TransferId) {
    if let Err(e) = gate.held.release(id).await {
        tracing::error!(transfer = %id, error = %e, "cannot rewrite {}; the next start replays this settlement", crate::held::FILE);
    }
}

impl std::ops::Deref for Gate {
    type Target = GateInner;
    fn deref(&self) -> &GateInner {
        &self.inner
    }
}

impl Gate {
    /// Assemble a gate from its parts.
    pub fn new(inner: GateInner) -> Gate {
        Gate {
            inner: Arc::new(inner),
        }
    }
}

/// A refusal: the request ends here with the upstream's envelope.
#[derive(Debug)]
pub struct Reject {
    /// Business code.
    pub code: Code,
    /// What went wrong, for the client.
    pub msg: String,
    /// HTTP status to use regardless of `reject_status` (413 for an oversized body).
    pub status: Option<StatusCode>,
    /// Short reason for audit and metrics (`"auth"`, `"budget"`, ...).
    pub reason: &'static str,
}

impl Reject {
    fn new(code: Code, reason: &'static str, msg: impl Into<String>) -> Reject {
        Reject {
            code,
            msg: msg.into(),
            status: None,
            reason,
        }
    }
}

/// Per-request facts gathered along the way, for the reply and the audit record.
struct Trace {
    id: String,
    started: Instant,
    key: Option<Arc<ActiveKey>>,
    endpoint: Option<Endpoint>,
    path: String,
    quote: Option<Quote>,
    settled: Option<Settled>,
    charged: Option<Points>,
    upstream_status: Option<u16>,
    upstream_code: Option<i64>,
    task_id: Option<String>,
    upstream_latency: Option<Duration>,
    note: Option<String>,
}

/// What the request path produced: an answer to send back.
enum Outcome {
    /// The upstream's answer (possibly rewritten).
    Upstream(Answer),
    /// An answer the gate made itself (client/detail, idempotent replay).
    Made { status: u16, body: Vec<u8> },
}

/// Where a path goes.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// Answered by the gate from the client's own account.
    ClientDetail,
    /// Forwarded without a charge.
    Free(Endpoint),
    /// Priced, reserved, forwarded, settled.
    Billable(Endpoint),
    /// An operator-configured extra path, forwarded without a charge.
    Passthrough,
}

/// Serve one client request. Never fails: every error becomes an envelope.
///
/// The request's life runs in a task of its own. When a client hangs up, hyper
/// drops this future; the spawned task is not cancelled with it, so a request that
/// got as far as a reservation always reaches its settlement (and its audit
/// record) instead of leaving points held until expiry.
pub async fn handle(gate: Gate, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let requests = gate.requests.clone();
    match requests.spawn(serve(gate, req)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            let mut resp = Response::new(Full::new(Bytes::from(envelope::error_body(
                Code::Internal,
                "internal error",
            ))));
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    }
}

async fn serve(gate: Gate, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut t = Trace {
        id: new_request_id(),
        started: Instant::now(),
        key: None,
        endpoint: None,
        path: req.uri().path().to_owned(),
        quote: None,
        settled: None,
        charged: None,
        upstream_status: None,
        upstream_code: None,
        task_id: None,
        upstream_latency: None,
        note: None,
    };
    if t.path == "/gate/callback" && req.method() == Method::POST {
        return upstream_callback(&gate, req, &t).await;
    }
    let result = life(&gate, req, &mut t).await;
    let resp = reply(&gate, &t, &result);
    audit(&gate, &t, &result).await;
    resp
}

/// The phases in order. Returns the answer to send, or the refusal.
async fn life(gate: &Gate, req: Request<Incoming>, t: &mut Trace) -> Result<Outcome, Reject> {
    let key = authenticate(gate, req.headers()).await?;
    t.key = Some(key.clone());
    let route = route(gate, req.method(), &t.path)?;
    if let Route::Free(ep) | Route::Billable(ep) = route {
        t.endpoint = Some(ep);
    }
    let (parts, body) = req.into_parts();
    let body = read_body(gate, &parts.headers, body).await?;
    let pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| t.path.clone());
    match route {
        Route::ClientDetail => client_detail(gate, &key).await,
        Route::Free(ep) if is_task_read(ep) => {
            let rec = own_task(gate, &key, &body, t).await?;
            let out = forward_free(gate, false, &pq, &parts.headers, body, t).await;
            if let (Some(rec), Ok(Outcome::Upstream(a))) = (&rec, &out) {
                tasks::observe_answer(gate, rec, &a.body).await;
            }
            out
        }
        Route::Free(ep) => forward_free(gate, ep.is_get(), &pq, &parts.headers, body, t).await,
        Route::Passthrough => {
            let get = parts.method == Method::GET;
            forward_free(gate, get, &pq, &parts.headers, body, t).await
        }
        Route::Billable(ep) => {
            let inputs = price_inputs(gate, &key, ep, &body, t).await?;
            let quote = match price(gate, ep, &body, &inputs)? {
                Priced::Free => {
                    return forward_free(gate, false, &pq, &parts.headers, body, t).await;
                }
                Priced::Billable(q) => q,
            };
            t.quote = Some(quote.clone());
            let idem = idempotency(gate, &key, &parts.headers, &body).await?;
            if let Some(IdemState::Replay(ans)) = idem {
                t.note = Some("idempotent replay".into());
                return Ok(Outcome::Made {
                    status: ans.status,
                    body: ans.body,
                });
            }
            let idem_key = match idem {
                Some(IdemState::Fresh(k)) => Some(k),
                _ => None,
            };
            let slot = match limit(gate, &key) {
                Ok(s) => s,
                Err(rej) => {
                    if let Some(k) = &idem_key {
                        let _ = gate.ledger.idem_abandon(&key.id, k).await;
                    }
                    return Err(rej);
                }
            };
            let reservation = match reserve(gate, &key, &quote, &t.id).await {
                Ok(r) => r,
                Err(rej) => {
                    gate.limits.cancel(slot);
                    if let Some(k) = &idem_key {
                        let _ = gate.ledger.idem_abandon(&key.id, k).await;
                    }
                    return Err(rej);
                }
            };
            audit_transition(
                gate,
                &key.id,
                key.name(),
                &reservation.id,
                "reserve",
                reservation.points,
                reservation.remaining,
            )
            .await;
            // The upstream calls the gate back (with the gate's nonce) when the
            // client asked for a callback and the gate has a public URL.
            let plan = tasks::plan_callback(gate.cfg.public_url.as_deref(), &body);
            let body = plan.as_ref().map(|p| p.body.clone()).unwrap_or(body);
            // From here the request is paid for. It runs in its own task (see
            // `handle`), so forward and settle complete even if the client goes away.
            let sent_at = Instant::now();
            let fwd = forward(gate, &pq, &parts.headers, body).await;
            let latency = sent_at.elapsed();
            // Kept only for an idempotent submit, whose answer may have to be
            // held with its settlement.
            let transfer = idem_key.as_ref().map(|_| reservation.id.clone());
            let settled = settle(gate, &key, ep, reservation, &quote, &fwd, plan).await;
            if matches!(&settled, Ok(s) if s.registered) {
                gate.limits.keep(slot);
            } else {
                gate.limits.cancel(slot);
            }
            let out = finish_billable(fwd, &settled);
            if let Some(ik) = &idem_key {
                match &out {
                    Ok(Outcome::Upstream(a)) => {
                        let stored = StoredAnswer {
                            status: a.status,
                            body: a.body.to_vec(),
                        };
                        let done = gate.ledger.idem_finish(&key.id, ik, &stored).await;
                        if let (Err(LedgerError::Storage(_)), Some(id), Ok(s)) =
                            (done, &transfer, &settled)
                        {
                            if s.held {
                                hold_answer(gate, &key.id, id, ik, stored).await;
                            }
                        }
                    }
                    _ => {
                        let _ = gate.ledger.idem_abandon(&key.id, ik).await;
                    }
                }
            }
            t.upstream_latency = Some(latency);
            match &settled {
                Ok(s) => {
                    t.charged = Some(s.charged);
                    t.task_id = s.task_id.clone();
                    t.upstream_status = s.upstream_status;
                    t.upstream_code = s.upstream_code;
                    t.note = s.note.clone();
                    t.settled = s.settled.clone();
                }
                Err(e) => t.note = Some(e.to_string()),
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------

/// Authenticate: find the client's key from `Auth-Token: <key>` or
/// `Authorization: Bearer <key>`. Missing, empty, unknown, disabled or expired → 1001.
async fn authenticate(gate: &Gate, headers: &HeaderMap) -> Result<Arc<ActiveKey>, Reject> {
    let presented = headers
        .get("auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .or_else(|| {
            headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .filter(|s| !s.is_empty())
        });
    let Some(secret) = presented else {
        return Err(Reject::new(
            Code::Auth,
            "auth",
            "authentication failed: no key given (send Auth-Token or Authorization: Bearer)",
        ));
    };
    let found = match gate.keys.lookup(secret) {
        Some(k) => Some(k),
        None => key_from_store(gate, secret).await,
    };
    usable(gate, found)
}

/// The key a secret found (if any), or why it may not be used.
fn usable(gate: &Gate, found: Option<Arc<ActiveKey>>) -> Result<Arc<ActiveKey>, Reject> {
    match found {
        Some(k) if k.usable_at(gate.clock.now()) => Ok(k),
        Some(k) if k.disabled => Err(Reject::new(
            Code::Auth,
            "auth",
            "authentication failed: key is disabled",
        )),
        Some(_) => Err(Reject::new(
            Code::Auth,
            "auth",
            "authentication failed: key has expired",
        )),
        None => Err(Reject::new(
            Code::Auth,
            "auth",
            "authentication failed: unknown key",
        )),
    }
}

/// A secret the key cache does not hold may be a key made or rotated on another
/// replica since this gate's last poll of the shared store (up to a second
/// ago): it is looked up there (at most `STORE_LOOKUPS_PER_SEC` a second), so
/// that a key works on every replica as soon as it is made or rotated. The
/// copy found goes into the cache unless a later version is there already.
async fn key_from_store(gate: &Gate, secret: &str) -> Option<Arc<ActiveKey>> {
    if !gate.cfg.ledger.shared() || !gate.limits.store_lookup() {
        return None;
    }
    match gate
        .ledger
        .key_by_hash(&crate::keys::hash_secret(secret))
        .await
    {
        Ok(Some((rec, version))) => {
            gate.keys.put(&rec, version);
            gate.keys.lookup(secret)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "looking up an unknown key in the store failed");
            None
        }
    }
}

/// Route: decide what kind of request this is. Unknown paths and wrong methods are
/// refused (fail closed) unless the operator configured them as pass-through.
fn route(gate: &Gate, method: &Method, path: &str) -> Result<Route, Reject> {
    if let Some(ep) = Endpoint::from_path(path) {
        let want = if ep.is_get() {
            Method::GET
        } else {
            Method::POST
        };
        if *method != want {
            return Err(Reject::new(
                Code::Invalid,
                "method",
                format!("{path} takes {want}, not {method}"),
            ));
        }
        return Ok(match ep {
            Endpoint::ClientDetail => Route::ClientDetail,
            ep if ep.is_billable() => Route::Billable(ep),
            ep => Route::Free(ep),
        });
    }
    if gate.cfg.passthrough.iter().any(|p| p == path) {
        return Ok(Route::Passthrough);
    }
    Err(Reject::new(
        Code::Invalid,
        "unknown_path",
        format!("unknown endpoint {path}: the gate forwards only known 触站 API paths"),
    ))
}

/// Read the whole body within the configured size and time limits.
async fn read_body(gate: &Gate, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Reject> {
    let limit = gate.cfg.limits.body_bytes;
    let too_large = || Reject {
        code: Code::Invalid,
        msg: format!("request body too large: the limit is {limit} bytes"),
        status: Some(StatusCode::PAYLOAD_TOO_LARGE),
        reason: "body_too_large",
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = Duration::from_secs(gate.cfg.limits.body_read_timeout_secs);
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(Reject::new(
            Code::Invalid,
            "body_read",
            "request body could not be read",
        )),
        Err(_) => Err(Reject::new(
            Code::Invalid,
            "body_timeout",
            "request body not received in time",
        )),
    }
}

/// Price: the provider's formula for this endpoint and body, or 1003 naming the field.
fn price(gate: &Gate, ep: Endpoint, body: &[u8], inputs: &PriceInputs) -> Result<Priced, Reject> {
    pricing::price(&gate.cfg.pricing, ep, body, inputs)
        .map_err(|e| Reject::new(e.code(), "invalid", e.to_string()))
}

/// The client's `Idempotency-Key`, when it sent one.
enum IdemState {
    /// First time: proceed, then record the answer under this key.
    Fresh(String),
    /// Seen before with the same body: answer with this again.
    Replay(StoredAnswer),
}

/// Look up the client's `Idempotency-Key`: replay a finished answer, refuse a reuse
/// with another body or while the first is still in flight.
async fn idempotency(
    gate: &Gate,
    key: &ActiveKey,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<IdemState>, Reject> {
    let Some(ik) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let ik = ik
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| {
            Reject::new(
                Code::Invalid,
                "idempotency",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })?;
    let hash: [u8; 32] = {
        use sha2::{Digest, Sha256};
        Sha256::digest(body).into()
    };
    match gate.ledger.idem_begin(&key.id, ik, &hash).await {
        Ok(IdemBegin::New) => Ok(Some(IdemState::Fresh(ik.to_owned()))),
        Ok(IdemBegin::Replay(a)) => Ok(Some(IdemState::Replay(a))),
        Ok(IdemBegin::InFlight) => Err(Reject::new(
            Code::Limit,
            "idempotency",
            "a request with this Idempotency-Key is still in progress",
        )),
        Ok(IdemBegin::Mismatch) => Err(Reject::new(
            Code::Invalid,
            "idempotency",
            "Idempotency-Key was already used with a different body",
        )),
        Err(e) => Err(ledger_reject(e)),
    }
}

/// Endpoints that read a task: only the key that submitted it may.
fn is_task_read(ep: Endpoint) -> bool {
    matches!(
        ep,
        Endpoint::TaskDetail
            | Endpoint::MjProgress
            | Endpoint::WorkflowTaskDetail
            | Endpoint::TrainDetail
    )
}

/// Ownership: a client may touch only tasks it submitted. Another key's task, and
/// a task the gate never charged, are refused alike, as if they did not exist.
async fn own_task(
    gate: &Gate,
    key: &ActiveKey,
    body: &[u8],
    t: &mut Trace,
) -> Result<Option<Arc<TaskRecord>>, Reject> {
    let Some(task_id) = pricing::task_ref(body) else {
        // No task id: the upstream answers its own 1003.
        return Ok(None);
    };
    t.task_id = Some(task_id.clone());
    match tasks::owned(gate, &key.id, &task_id).await {
        Ok(Some(rec)) => Ok(Some(rec)),
        Ok(None) => Err(Reject::new(
            Code::NotFound,
            "not_owner",
            "task does not exist",
        )),
        Err(e) => Err(ledger_reject(e)),
    }
}

/// What pricing cannot read from the body: the original charge of the task an
/// inpaint repaints (from the registry, which also proves ownership), and a
/// workflow's `consume` (from `/aiapi/workflow/detail`, cached).
async fn price_inputs(
    gate: &Gate,
    key: &ActiveKey,
    ep: Endpoint,
    body: &[u8],
    t: &mut Trace,
) -> Result<PriceInputs, Reject> {
    let mut inputs = PriceInputs::default();
    match ep {
        Endpoint::Inpaint | Endpoint::MjUpscale | Endpoint::MjVariation | Endpoint::MjZoomout => {
            if let Some(rec) = own_task(gate, key, body, t).await? {
                inputs.original_charge = Some(rec.upstream_points);
            }
            t.task_id = None;
        }
        Endpoint::WorkflowRun => {
            if let Some(id) = pricing::workflow_id(body) {
                if !gate.cfg.pricing.workflows.contains_key(&id) {
                    inputs.workflow_consume = tasks::workflow_consume(gate, &id).await;
                }
            }
        }
        _ => {}
    }
    Ok(inputs)
}

/// Limits: the key's submit rate and tasks in flight, and the operator-wide cap,
/// checked before anything is reserved. Over a limit → 1005. With a shared
/// store this gate checks only the global cap: the key's rate and tasks in
/// flight are kept there, for all replicas together, and checked by the
/// reservation itself (`reserve`).
fn limit(gate: &Gate, key: &ActiveKey) -> Result<crate::limits::Slot, Reject> {
    let here = !gate.cfg.ledger.shared();
    let own = |v: Option<u32>| v.filter(|_| here);
    gate.limits
        .check_rate(&key.id, own(key.rps), own(key.burst))
        .and_then(|()| {
            gate.limits.acquire(
                &key.id,
                own(key.concurrency),
                gate.cfg.tasks.global_concurrency,
            )
        })
        .map_err(limit_reject)
}

fn limit_reject(e: crate::limits::LimitError) -> Reject {
    Reject::new(Code::Limit, "limit", e.to_string())
}

/// The registry record of a task the upstream accepted.
#[allow(clippy::too_many_arguments)]
fn task_record(
    gate: &Gate,
    key: &ActiveKey,
    ep: Endpoint,
    transfer: &TransferId,
    task_id: &str,
    s: &Settlement,
    charged: Points,
    plan: Option<tasks::CallbackPlan>,
) -> TaskRecord {
    let (client_callback, client_nonce, gate_nonce) = match plan {
        Some(p) => (Some(p.client_callback), p.client_nonce, Some(p.gate_nonce)),
        None => (None, None, None),
    };
    TaskRecord {
        task_id: task_id.to_owned(),
        key: key.id.clone(),
        endpoint: ep.path().to_owned(),
        transfer: transfer.clone(),
        upstream_points: s.upstream_points,
        charged,
        state: TaskState::Open,
        client_callback,
        client_nonce,
        gate_nonce,
        created_at: gate.clock.now(),
    }
}

/// `POST /gate/callback`: the upstream reporting a task's end. Not a client
/// request: no key; the task id and the gate's nonce are the proof.
async fn upstream_callback(
    gate: &Gate,
    req: Request<Incoming>,
    t: &Trace,
) -> Response<Full<Bytes>> {
    let body = match tokio::time::timeout(
        Duration::from_secs(gate.cfg.limits.body_read_timeout_secs),
        Limited::new(req.into_body(), gate.cfg.limits.body_bytes).collect(),
    )
    .await
    {
        Ok(Ok(c)) => c.to_bytes(),
        _ => Bytes::new(),
    };
    let (status, body) = tasks::handle_callback(gate, &body).await;
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&t.id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A durable hold on points, to be consumed by exactly one settlement.
struct Reservation {
    id: TransferId,
    points: Points,
    remaining: Points,
}

/// Reserve: hold the quoted points on the client's budget, durably, in one atomic
/// step. Not enough budget → 1002 with the price and what remains.
async fn reserve(
    gate: &Gate,
    key: &ActiveKey,
    quote: &Quote,
    request_id: &str,
) -> Result<Reservation, Reject> {
    let points = Points(key.charge_for(quote.points.get()));
    let id = TransferId(request_id.to_owned());
    let secret_hash = key.secret_hash();
    let terms = KeyTerms {
        secret_hash: Some(&secret_hash),
        task_limit: key.concurrency,
        rate: SubmitRate::of(key.rps, key.burst),
    };
    match gate.ledger.reserve_as(&key.id, terms, points, &id).await {
        Ok(r) => {
            gate.metrics
                .points(key.id.as_str(), "reserved", points.get());
            Ok(Reservation {
                id,
                points,
                remaining: r.remaining,
            })
        }
        Err(LedgerError::KeyRefused(_)) => Err(key_refused(gate, key, &secret_hash).await),
        Err(LedgerError::TaskLimit { limit }) => {
            Err(limit_reject(crate::limits::LimitError::Concurrency {
                limit,
            }))
        }
        Err(LedgerError::RateLimit { rps }) => {
            Err(limit_reject(crate::limits::LimitError::Rate { rps }))
        }
        Err(e) => Err(ledger_reject(e)),
    }
}

/// The shared store refused a reservation for a key this gate's cache holds as
/// usable: it was disabled, expired or rotated on another replica since this
/// gate's last poll. The key is read again at once (so the cache stops
/// admitting it) and the client told why, as authentication would have.
async fn key_refused(gate: &Gate, key: &ActiveKey, secret_hash: &str) -> Reject {
    let fresh = match gate.ledger.key_by_id(&key.id).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(key = %key.id, error = %e, "reading a refused key again failed");
            None
        }
    };
    let now_usable = fresh.and_then(|(rec, version)| {
        gate.keys.put(&rec, version);
        (rec.secret_hash == secret_hash).then(|| Arc::new(ActiveKey::from(&rec)))
    });
    match usable(gate, now_usable) {
        // Enabled again in the meantime; this request was still refused.
        Ok(_) => Reject::new(
            Code::Auth,
            "auth",
            "authentication failed: the key changed while this request was checked; send it again",
        ),
        Err(r) => r,
    }
}

fn ledger_reject(e: LedgerError) -> Reject {
    match e {
        LedgerError::Insufficient { needed, remaining } => Reject::new(
            Code::Budget,
            "budget",
            format!("insufficient budget: this request costs {needed} points, {remaining} remain"),
        ),
        other => {
            tracing::error!(error = %other, "ledger refused");
            Reject::new(
                Code::Internal,
                "ledger",
                "the gate cannot record this charge right now; nothing was charged",
            )
        }
    }
}

/// Forward: send the original bytes upstream with the operator's token.
async fn forward(
    gate: &Gate,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Answer, ForwardError> {
    let r = gate
        .upstream
        .send(false, path_and_query, headers, body)
        .await;
    gate.metrics
        .upstream_done(r.as_ref().ok().map(|a| a.status));
    r
}

/// Forward a free request and pass the answer back untouched.
async fn forward_free(
    gate: &Gate,
    get: bool,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    t: &mut Trace,
) -> Result<Outcome, Reject> {
    let sent = Instant::now();
    let r = gate.upstream.send(get, path_and_query, headers, body).await;
    t.upstream_latency = Some(sent.elapsed());
    match r {
        Ok(a) => {
            t.upstream_status = Some(a.status);
            Ok(Outcome::Upstream(a))
        }
        Err(e) => Err(upstream_reject(&e)),
    }
}

fn upstream_reject(e: &ForwardError) -> Reject {
    tracing::warn!(error = %e, "upstream failed");
    Reject::new(
        Code::Internal,
        "upstream",
        match e {
            ForwardError::NotSent(_) => "upstream unreachable; nothing was charged",
            ForwardError::Unknown(_) => "upstream answer was lost",
        },
    )
}

/// What settling decided, for the reply and the audit.
struct Settlement {
    /// The settlement is held until the shared store is back (`crate::held`).
    held: bool,
    charged: Points,
    upstream_points: Points,
    /// Whether an accepted task was registered (with its commit).
    registered: bool,
    remaining: Points,
    settled: Option<Settled>,
    task_id: Option<String>,
    upstream_status: Option<u16>,
    upstream_code: Option<i64>,
    /// A successful status with a body that is not JSON.
    unreadable: bool,
    note: Option<String>,
}

/// The facts settle needs from an upstream answer.
struct Verdict {
    code: Option<i64>,
    task_id: Option<String>,
    used: Option<u64>,
}

fn read_verdict(body: &[u8]) -> Option<Verdict> {
    #[derive(serde::Deserialize)]
    struct Env<'a> {
        code: Option<i64>,
        #[serde(borrow)]
        data: Option<Data<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "paintingSign", borrow)]
        painting_sign: Option<&'a serde_json::value::RawValue>,
        used: Option<serde_json::Number>,
    }
    let env: Env = serde_json::from_slice(body).ok()?;
    let data = env.data;
    let task_id = data
        .as_ref()
        .and_then(|d| d.painting_sign)
        .map(|raw| {
            serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
        })
        .filter(|s| !s.is_empty() && s != "null");
    let used = data.and_then(|d| d.used).and_then(|n| {
        n.as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64))
    });
    Some(Verdict {
        code: env.code,
        task_id,
        used,
    })
}

/// Settle: turn the upstream's answer into exactly one ledger transition.
/// - code 0 with a task id → commit (to `data.used` × rate when present, else the quote);
/// - business error, HTTP error, or never sent → void;
/// - sent but the answer was lost or unreadable → the configured policy (default charge).
async fn settle(
    gate: &Gate,
    key: &Arc<ActiveKey>,
    ep: Endpoint,
    r: Reservation,
    quote: &Quote,
    fwd: &Result<Answer, ForwardError>,
    plan: Option<tasks::CallbackPlan>,
) -> Result<Settlement, LedgerError> {
    let mut s = Settlement {
        held: false,
        charged: Points::ZERO,
        upstream_points: quote.points,
        registered: false,
        remaining: Points::ZERO,
        settled: None,
        task_id: None,
        upstream_status: None,
        upstream_code: None,
        unreadable: false,
        note: None,
    };
    // What an unknown outcome costs: the reservation, or nothing, by policy.
    let if_unknown = match gate.cfg.upstream.unknown_outcome {
        UnknownOutcome::Charge => Some(r.points),
        UnknownOutcome::Void => None,
    };
    let charge: Option<Points> = match fwd {
        Err(ForwardError::NotSent(_)) => None,
        Err(e @ ForwardError::Unknown(_)) => {
            s.note = Some(format!("outcome unknown: {e}"));
            if_unknown
        }
        Ok(a) => {
            s.upstream_status = Some(a.status);
            match read_verdict(&a.body) {
                _ if !(200..300).contains(&a.status) => None,
                Some(v) => {
                    s.upstream_code = v.code;
                    s.task_id = v.task_id.clone();
                    match (v.code, v.task_id) {
                        (Some(0), Some(_)) => Some(match v.used {
                            Some(u) => {
                                s.upstream_points = Points(u);
                                Points(key.charge_for(u))
                            }
                            None => Points(key.charge_for(quote.points.get())),
                        }),
                        (Some(0), None) => {
                            s.note = Some("upstream accepted without a task id".into());
                            if_unknown
                        }
                        _ => None,
                    }
                }
                None => {
                    s.unreadable = true;
                    s.note = Some("upstream answer is not JSON: outcome unknown".into());
                    if_unknown
                }
            }
        }
    };
    let started = Instant::now();
    let how = match (charge, &s.task_id) {
        // An accepted task: its commit and its registration are one durable
        // write, so the client waits for one write, and the task is in the
        // registry exactly when its charge is in the ledger. Not cached here:
        // most tasks are never polled through the gate (callbacks, the
        // background check), and caching every submit grew memory by ~300 bytes
        // per task; the first poll loads it, and its end evicts it.
        (Some(p), Some(task_id)) if p.get() > 0 => {
            let rec = task_record(gate, key, ep, &r.id, task_id, &s, p, plan);
            Decided::Commit {
                points: p,
                task: Some(Box::new(rec)),
            }
        }
        (Some(p), _) => Decided::Commit {
            points: p,
            task: None,
        },
        (None, _) => Decided::Void,
    };
    let settled = match settle_write(gate, &r.id, &how).await {
        Ok(settled) => settled,
        Err(e @ LedgerError::Storage(_)) if gate.cfg.ledger.shared() => {
            // The upstream has decided, the store cannot take it: hold it,
            // durably, and answer as if it were written. The reservation
            // already holds the points, so the request is paid for; the held
            // settlement is written when the store is back, by this run or by
            // the next start of this gate.
            let charged = charge.unwrap_or(Points::ZERO);
            let owed = Owed {
                transfer: r.id.clone(),
                key: key.id.clone(),
                key_name: key.name().to_owned(),
                how,
                reserved: r.points,
                answer: None,
                written: false,
            };
            return match gate.held.hold(owed).await {
                Ok(()) => {
                    tracing::warn!(transfer = %r.id, error = %e, "settlement held until the store is back");
                    s.held = true;
                    s.charged = charged;
                    // What will remain once it is written, as far as this
                    // request can tell.
                    s.remaining =
                        Points((r.remaining.get() + r.points.get()).saturating_sub(charged.get()));
                    s.note = Some(format!(
                        "settlement held until the ledger's store is back: {e}"
                    ));
                    Ok(s)
                }
                Err(io) => {
                    tracing::error!(transfer = %r.id, error = %io, "cannot keep a held settlement on disk; it is held in memory only");
                    Err(e)
                }
            };
        }
        Err(e) => return Err(e),
    };
    s.registered = matches!(how, Decided::Commit { task: Some(_), .. });
    gate.metrics.ledger_commit.observe(started.elapsed());
    if charge.is_some() && s.upstream_points != quote.points {
        gate.metrics
            .price_drift(quote.points.get(), s.upstream_points.get());
    }
    record_settlement(
        gate,
        (&key.id, key.name()),
        &r.id,
        &how,
        r.points,
        settled.remaining,
    )
    .await;
    s.charged = charge.unwrap_or(Points::ZERO);
    s.remaining = settled.remaining;
    s.settled = Some(settled);
    Ok(s)
}

/// Writes a settlement, and with a shared store keeps trying while the store
/// is unreachable, for up to `ledger.settle_retry_secs`: the upstream has
/// answered, so a store that comes back within a failover's time turns what
/// would be an error and a charge by `pending_policy` into the answer and the
/// exact charge. A retried transition is applied once: the ledger replays a
/// settlement it already holds (the first attempt may have committed before
/// its reply was lost). The embedded ledger is not retried: its write failures
/// stop it until a restart.
async fn settle_write(gate: &Gate, id: &TransferId, how: &Decided) -> Result<Settled, LedgerError> {
    let until = Instant::now() + Duration::from_secs(gate.cfg.ledger.settle_retry_secs);
    let mut pause = Duration::from_millis(50);
    loop {
        match how.write(&gate.ledger, id).await {
            Err(LedgerError::Storage(e))
                if gate.cfg.ledger.shared() && Instant::now() + pause < until =>
            {
                tracing::warn!(error = %e, "settlement not written; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            done => return done,
        }
    }
}

/// Turn a settled forward into the answer for the client: rewrite `data.balance`
/// and `data.used` of an accepted submit, pass everything else through.
fn finish_billable(
    fwd: Result<Answer, ForwardError>,
    settled: &Result<Settlement, LedgerError>,
) -> Result<Outcome, Reject> {
    let s = match settled {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "settlement failed");
            return Err(Reject::new(
                Code::Internal,
                "ledger",
                "the gate could not record the settlement of this request, which was sent \
                 upstream: its reservation stays held and the operator's ledger settles it \
                 later (charged by default, as the upstream may have run it); X-Request-Id \
                 identifies it to the operator",
            ));
        }
    };
    match fwd {
        Err(e @ ForwardError::Unknown(_)) => {
            tracing::warn!(error = %e, "upstream answer lost");
            Err(unknown_outcome(
                s,
                "the upstream's answer was lost after the request was sent",
            ))
        }
        Err(e) => Err(upstream_reject(&e)),
        // A successful status with a body that is not JSON (cut short, say) would
        // reach the client as bytes it cannot read, after a charge it cannot see.
        Ok(_) if s.unreadable => Err(unknown_outcome(
            s,
            "the upstream's answer could not be read",
        )),
        Ok(mut a) => {
            if s.upstream_code == Some(0) && s.task_id.is_some() {
                a.body = Bytes::from(rewrite_submit(&a.body, s.charged, s.remaining));
            }
            Ok(Outcome::Upstream(a))
        }
    }
}

/// The answer to a submit whose outcome is unknown: what happened, and what it
/// cost by the operator's `upstream.unknown_outcome` policy.
fn unknown_outcome(s: &Settlement, what: &str) -> Reject {
    let msg = if s.charged.get() > 0 {
        format!(
            "{what}: the upstream may have run it, so it was charged {} points \
             ({} remain); X-Request-Id identifies it to the operator",
            s.charged, s.remaining
        )
    } else {
        format!("{what}: its outcome is unknown; nothing was charged")
    };
    Reject::new(Code::Internal, "upstream", msg)
}

/// Set `data.used` and `data.balance` in a submit answer, changing nothing else.
fn rewrite_submit(body: &[u8], charged: Points, remaining: Points) -> Vec<u8> {
    let mut out = body.to_vec();
    for (field, value) in [("used", charged), ("balance", remaining)] {
        let v = value.to_string().into_bytes();
        out = match json_edit::find_path(&out, &["data", field]) {
            Some(m) => json_edit::splice(&out, vec![(m.value, v)]),
            None => match json_edit::find_path(&out, &["data"]) {
                Some(d) => json_edit::insert_member(&out, d.value, field, &v).unwrap_or(out),
                None => out,
            },
        };
    }
    out
}

/// `GET /aiapi/v1/client/detail`, answered from the client's own account; the
/// operator's upstream balance is never shown.
async fn client_detail(gate: &Gate, key: &ActiveKey) -> Result<Outcome, Reject> {
    let acc = gate.ledger.account(&key.id).await.map_err(ledger_reject)?;
    /// The upstream's own field order.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Detail<'a> {
        company_name: &'a str,
        balance: u64,
        used: u64,
        task_limit_count: u32,
    }
    let data = Detail {
        company_name: key.name(),
        balance: acc.remaining.get(),
        used: acc.spent.get(),
        // The key's own limit; else the operator-wide cap; 0 when neither is set.
        task_limit_count: key
            .concurrency
            .or(gate.cfg.tasks.global_concurrency)
            .unwrap_or(0),
    };
    Ok(Outcome::Made {
        status: 200,
        body: envelope::ok_body(&data),
    })
}

/// Reply: the only place outcomes become HTTP responses. Every answer carries
/// `X-Request-Id`.
fn reply(gate: &Gate, t: &Trace, result: &Result<Outcome, Reject>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match result {
        Ok(Outcome::Upstream(a)) => (
            StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY),
            a.content_type
                .clone()
                .unwrap_or_else(|| HeaderValue::from_static("application/json")),
            a.body.clone(),
        ),
        Ok(Outcome::Made { status, body }) => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
            HeaderValue::from_static("application/json;charset=UTF-8"),
            Bytes::from(body.clone()),
        ),
        Err(r) => {
            let status = r.status.unwrap_or(match gate.cfg.reject_status {
                RejectStatus::Upstream => StatusCode::OK,
                RejectStatus::Semantic => {
                    StatusCode::from_u16(r.code.semantic_status()).unwrap_or(StatusCode::OK)
                }
            });
            (
                status,
                HeaderValue::from_static("application/json;charset=UTF-8"),
                Bytes::from(envelope::error_body(r.code, &r.msg)),
            )
        }
    };
    gate.metrics.request_done(
        t.endpoint.map(Endpoint::name).unwrap_or("other"),
        decision(result),
        t.started.elapsed(),
        t.upstream_latency,
    );
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, ctype);
    if let Ok(v) = HeaderValue::from_str(&t.id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn decision(result: &Result<Outcome, Reject>) -> &'static str {
    match result {
        Ok(_) => "admitted",
        Err(r) => r.reason,
    }
}

/// Audit: one record per decision, written off the hot path (the audit queue waits
/// rather than drops when full).
async fn audit(gate: &Gate, t: &Trace, result: &Result<Outcome, Reject>) {
    let mut f = gate.audit.fields();
    f.str("event", "request")
        .str("request_id", &t.id)
        .str("endpoint", &t.path)
        .str("decision", decision(result));
    if let Some(k) = &t.key {
        f.str("key_id", k.id.as_str()).str("key_name", k.name());
    }
    if let Err(r) = result {
        f.i64("code", r.code.as_i64()).str("reason", &r.msg);
    }
    if let Some(q) = &t.quote {
        f.u64("price", q.points.get())
            .objects("breakdown", &q.breakdown, breakdown_item)
            .str("table_version", &q.version);
    }
    if let Some(c) = t.charged {
        f.u64("charged", c.get());
    }
    if let Some(s) = &t.settled {
        f.object("settlement", |o| settlement_fields(o, s))
            .u64("remaining", s.remaining.get());
    }
    if let Some(s) = t.upstream_status {
        f.u64("upstream_status", s.into());
    }
    if let Some(c) = t.upstream_code {
        f.i64("upstream_code", c);
    }
    if let Some(id) = &t.task_id {
        f.str("task_id", id);
    }
    if let Some(n) = &t.note {
        f.str("note", n);
    }
    f.f64("latency_ms", millis(t.started.elapsed()));
    if let Some(u) = t.upstream_latency {
        f.f64("upstream_ms", millis(u));
    }
    if let Err(e) = gate.audit.record_fields(f).await {
        tracing::error!(error = %e, "audit record failed");
    }
}

/// A duration in milliseconds to the microsecond, for records: `2.978`, not
/// `2.9783589999999998`.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A term of a price in a record, as `serde_json` writes a [`pricing::Item`].
fn breakdown_item(o: &mut Fields, item: &pricing::Item) {
    if let Some(d) = &item.detail {
        o.str("detail", d);
    }
    o.str("item", item.item).str("points", &item.points);
}

/// A settlement in a record, as `serde_json` writes a [`Settled`] (its `key` is
/// dropped as a secret field name, as it would be from a `Map`).
fn settlement_fields(o: &mut Fields, s: &Settled) {
    o.str("id", s.id.as_str())
        .str("key", s.key.as_str())
        .str("kind", s.kind.as_str())
        .u64("overage", s.overage.get())
        .u64("points", s.points.get())
        .u64("remaining", s.remaining.get())
        .bool("replay", s.replay);
}

/// One audit record per ledger transition of a request (reserve, commit, void).
#[allow(clippy::too_many_arguments)] // The record's fields, one by one.
async fn audit_transition(
    gate: &Gate,
    key: &KeyId,
    key_name: &str,
    id: &TransferId,
    transition: &'static str,
    points: Points,
    remaining: Points,
) {
    let mut f = gate.audit.fields();
    f.str("event", "ledger")
        .str("key_id", key.as_str())
        .str("key_name", key_name)
        .u64("points", points.get())
        .u64("remaining", remaining.get())
        .str("request_id", id.as_str())
        .str("transition", transition);
    if let Err(e) = gate.audit.record_fields(f).await {
        tracing::error!(error = %e, "audit record failed");
    }
}

/// A request id, which also names the request's ledger transfer: time-ordered
/// (see `TransferId::fresh`).
fn new_request_id() -> String {
    TransferId::fresh().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::SettleKind;
    use serde_json::{Map, Value};

    /// What `serde_json` and `audit::scrub` make of `v` as a record field.
    fn scrubbed(v: impl serde::Serialize) -> Value {
        let mut m = Map::new();
        m.insert("v".into(), serde_json::to_value(v).unwrap_or(Value::Null));
        crate::audit::scrub(&mut m, false);
        m.remove("v").unwrap_or(Value::Null)
    }

    /// The value of the one field `build` adds, as written in a line.
    fn written(build: impl FnOnce(&mut Fields)) -> Value {
        let mut f = Audit::disabled().fields();
        build(&mut f);
        let mut line = f.encode();
        line[0] = b'{';
        line.push(b'}');
        serde_json::from_slice::<Value>(&line).unwrap_or(Value::Null)["v"].take()
    }

    #[test]
    fn durations_in_records_are_milliseconds_to_the_microsecond() {
        assert_eq!(millis(Duration::from_nanos(2_978_358_999)), 2978.358);
        assert_eq!(millis(Duration::from_nanos(2_978_999)), 2.978);
        assert_eq!(
            serde_json::to_string(&millis(Duration::from_nanos(2_978_358))).ok(),
            Some("2.978".into())
        );
    }

    #[test]
    fn the_records_nested_values_are_what_serde_makes_of_their_types() {
        let items = vec![
            pricing::Item {
                item: "base",
                points: "12.00095232".into(),
                detail: Some("768×1024×20×0.000000763".into()),
            },
            pricing::Item {
                item: "rounding",
                points: "-0.00095232".into(),
                detail: None,
            },
        ];
        assert_eq!(
            written(|f| {
                f.objects("v", &items, breakdown_item);
            }),
            scrubbed(&items)
        );
        for (kind, replay) in [(SettleKind::Commit, false), (SettleKind::Refund, true)] {
            let s = Settled {
                key: KeyId("key_a".into()),
                id: TransferId("r1".into()),
                kind,
                points: Points(7),
                overage: Points(2),
                remaining: Points(93),
                replay,
            };
            let w = written(|f| {
                f.object("v", |o| settlement_fields(o, &s));
            });
            assert_eq!(w, scrubbed(&s));
            assert_eq!(w["kind"], Value::from(kind.as_str()));
        }
    }
}
