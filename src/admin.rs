//! The operators' HTTP API, on its own listener: keys and budgets, the audit log,
//! metrics and health.
//!
//! Auth: `Authorization: Bearer <GATE_ADMIN_TOKEN>`, compared in constant time.
//! Without a configured token the admin routes answer only on a loopback listener
//! (the gate refuses to start a non-loopback admin listener without one).
//! `/metrics`, `/healthz` and `/readyz` need no token.

use crate::audit;
use crate::gate::Gate;
use crate::keys::{self, KeyRecord};
use crate::ledger::{AccountView, Period};
use crate::points::{KeyId, Points};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

/// An admin answer: status and JSON (or text) body.
struct Answer {
    status: StatusCode,
    ctype: &'static str,
    body: Vec<u8>,
}

fn json_answer(status: StatusCode, v: &Value) -> Answer {
    Answer {
        status,
        ctype: "application/json",
        body: serde_json::to_vec(v).unwrap_or_default(),
    }
}

/// A 4xx/5xx with `{"error": msg, "field": field}`.
fn error(status: StatusCode, field: Option<&str>, msg: impl Into<String>) -> Answer {
    json_answer(status, &json!({"error": msg.into(), "field": field}))
}

/// Serve one admin request.
pub async fn handle(gate: Gate, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let a = route(&gate, req).await;
    let mut resp = Response::new(Full::new(Bytes::from(a.body)));
    *resp.status_mut() = a.status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(a.ctype));
    resp
}

async fn route(gate: &Gate, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => json_answer(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(gate).await,
        (&Method::GET, "/metrics") => Answer {
            status: StatusCode::OK,
            ctype: "text/plain; version=0.0.4",
            body: render_metrics(gate).await.into_bytes(),
        },
        _ if path.starts_with("/admin/") => {
            if let Err(a) = authorize(gate, req.headers()) {
                return a;
            }
            let actor = req
                .headers()
                .get("x-gate-actor")
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty() && s.len() <= 64)
                .unwrap_or("admin")
                .to_owned();
            let query = req.uri().query().unwrap_or("").to_owned();
            let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        None,
                        "body too large or unreadable",
                    )
                }
            };
            admin_route(gate, &method, &path, &query, &body, &actor).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            None,
            format!("no route {method} {path}"),
        ),
    }
}

fn authorize(gate: &Gate, headers: &hyper::HeaderMap) -> Result<(), Answer> {
    use subtle::ConstantTimeEq;
    let want = gate.cfg.admin_token.expose();
    if want.is_empty() {
        // Only reachable on a loopback listener: start() refuses anything else.
        return Ok(());
    }
    let got = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(got.as_bytes().ct_eq(want.as_bytes())) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            None,
            "admin token missing or wrong (Authorization: Bearer <GATE_ADMIN_TOKEN>)",
        ))
    }
}

async fn admin_route(
    gate: &Gate,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
    actor: &str,
) -> Answer {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["keys"]) => create_key(gate, body, actor).await,
        (&Method::GET, ["keys"]) => list_keys(gate, query).await,
        (&Method::GET, ["keys", id]) => show_key(gate, id).await,
        (&Method::PATCH, ["keys", id]) => patch_key(gate, id, body, actor).await,
        (&Method::DELETE, ["keys", id]) => disable_key(gate, id, actor).await,
        (&Method::POST, ["keys", id, "top-up"]) => top_up(gate, id, body, actor).await,
        (&Method::POST, ["keys", id, "rotate"]) => rotate(gate, id, actor).await,
        (&Method::GET, ["audit"]) => audit_query(gate, query),
        _ => error(
            StatusCode::NOT_FOUND,
            None,
            format!("no admin route {method} {path}"),
        ),
    }
}

async fn readyz(gate: &Gate) -> Answer {
    let ledger = gate.ledger.ping().await;
    let upstream = probe_upstream(gate).await;
    // Records wait in memory while the audit log cannot be written; a replica
    // in that state should take no new traffic until it can.
    let audit = gate.audit.health().failing();
    let ok = ledger.is_ok() && upstream.is_ok() && audit.is_none();
    json_answer(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({
            "ledger": ledger.map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string()),
            "upstream": upstream.map(|_| "ok".to_owned()).unwrap_or_else(|e| e),
            "audit": audit.map_or_else(|| "ok".to_owned(), |e| format!("writes failing: {e}")),
        }),
    )
}

/// Upstream reachability: a TCP connect to its host, which spends nothing.
async fn probe_upstream(gate: &Gate) -> Result<(), String> {
    let base = gate.upstream.base();
    let rest = base
        .strip_prefix("https://")
        .map(|r| (r, 443))
        .or_else(|| base.strip_prefix("http://").map(|r| (r, 80)));
    let Some((rest, default_port)) = rest else {
        return Err("upstream url has no http(s) scheme".into());
    };
    let host = rest.split('/').next().unwrap_or(rest);
    let target = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    };
    match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(&target),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot connect to upstream: {e}")),
        Err(_) => Err("upstream connect timed out".into()),
    }
}

async fn render_metrics(gate: &Gate) -> String {
    use crate::metrics::KeyGauges;
    use std::fmt::Write;
    let mut out = gate.metrics.render();
    let accts = match gate.cfg.metrics.key_gauges {
        KeyGauges::All => gate.ledger.accounts().await,
        KeyGauges::Active => {
            let keys: Vec<KeyId> = gate.metrics.active_keys().into_iter().map(KeyId).collect();
            gate.ledger.accounts_of(&keys).await
        }
        KeyGauges::None => Ok(Vec::new()),
    };
    if let Ok(accts) = accts {
        out.push_str("# TYPE gate_budget_remaining_points gauge\n");
        for a in &accts {
            let _ = writeln!(
                out,
                "gate_budget_remaining_points{{key=\"{}\"}} {}",
                a.key,
                a.remaining.get()
            );
        }
        out.push_str("# TYPE gate_reserved_points gauge\n");
        for a in &accts {
            let _ = writeln!(
                out,
                "gate_reserved_points{{key=\"{}\"}} {}",
                a.key,
                a.reserved.get()
            );
        }
    }
    let g = gate.ledger.group_commits();
    for (name, v) in [
        ("gate_ledger_transactions_total", g.transactions),
        ("gate_ledger_writes_total", g.writes),
        ("gate_ledger_rollbacks_total", g.rollbacks),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# TYPE gate_settlements_held gauge\ngate_settlements_held {}",
        gate.held.len()
    );
    let audit = gate.audit.health();
    let _ = writeln!(
        out,
        "# TYPE gate_audit_failing gauge\ngate_audit_failing {}\n\
         # TYPE gate_audit_write_failures_total counter\ngate_audit_write_failures_total {}",
        u8::from(audit.failing().is_some()),
        audit.failures()
    );
    if let Some(w) = gate.ledger.key_watch() {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            out,
            "# TYPE gate_key_push_connected gauge\ngate_key_push_connected {}",
            u8::from(w.connected.load(Relaxed))
        );
        for (name, v) in [
            ("gate_key_push_connections_total", &w.connections),
            ("gate_key_push_notifications_total", &w.notifications),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
    }
    if let Ok(n) = gate.ledger.pending_count().await {
        let _ = writeln!(
            out,
            "# TYPE gate_reservations_in_flight gauge\ngate_reservations_in_flight {n}"
        );
    }
    out
}

/// The public view of a key: its record (never the hash) and its account.
fn key_view(rec: &KeyRecord, acc: Option<&AccountView>) -> Value {
    let mut v = json!({
        "id": rec.id,
        "name": rec.name,
        "secret_prefix": rec.secret_prefix,
        "rate": rec.rate_milli as f64 / 1000.0,
        "concurrency": rec.concurrency,
        "rps": rec.rps,
        "burst": rec.burst,
        "disabled": rec.disabled,
        "expires_at": rec.expires_at,
        "note": rec.note,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    });
    if let (Some(a), Some(m)) = (acc, v.as_object_mut()) {
        m.insert("budget".into(), json!(a.budget));
        m.insert("spent".into(), json!(a.spent));
        m.insert("reserved".into(), json!(a.reserved));
        m.insert("remaining".into(), json!(a.remaining));
        m.insert("period".into(), json!(a.period));
        m.insert("window_start".into(), json!(a.window_start));
        m.insert("window_end".into(), json!(a.window_end));
    }
    v
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Answer> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            None,
            "body must be a JSON object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            None,
            format!("body is not valid JSON: {e}"),
        )),
    }
}

/// Field readers that name the field in their error.
mod field {
    use super::*;

    pub fn bad(field: &str, rule: &str) -> Answer {
        error(
            StatusCode::BAD_REQUEST,
            Some(field),
            format!("{field}: {rule}"),
        )
    }

    pub fn points(m: &Map<String, Value>, f: &str) -> Result<Option<Points>, Answer> {
        match m.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(Points(n)))
                .ok_or_else(|| bad(f, "must be a whole number of points, 0 or more")),
        }
    }

    pub fn string(m: &Map<String, Value>, f: &str, max: usize) -> Result<Option<String>, Answer> {
        match m.get(f) {
            None => Ok(None),
            Some(Value::String(s)) if s.chars().count() <= max => Ok(Some(s.clone())),
            Some(_) => Err(bad(
                f,
                &format!("must be a string of at most {max} characters"),
            )),
        }
    }

    pub fn period(m: &Map<String, Value>) -> Result<Option<Period>, Answer> {
        match m.get("period") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => s
                .parse::<Period>()
                .map(Some)
                .map_err(|_| bad("period", "must be one of none, day, week, month")),
            Some(_) => Err(bad("period", "must be one of none, day, week, month")),
        }
    }

    pub fn rate(m: &Map<String, Value>) -> Result<Option<u64>, Answer> {
        match m.get("rate") {
            None => Ok(None),
            Some(v) => {
                // The rate is parsed from its decimal text so 1.2 is exactly 1200‰.
                let text = match v {
                    Value::Number(n) => n.to_string(),
                    Value::String(s) => s.clone(),
                    _ => return Err(bad("rate", "must be a number greater than 0")),
                };
                parse_milli(&text)
                    .filter(|r| *r > 0 && *r <= 1_000_000)
                    .map(Some)
                    .ok_or_else(|| {
                        bad("rate", "must be a number greater than 0 and at most 1000, with at most 3 decimals")
                    })
            }
        }
    }

    /// `None` = absent; `Some(None)` = null (clear); `Some(Some(n))` = set.
    pub fn opt_u32(m: &Map<String, Value>, f: &str) -> Result<Option<Option<u32>>, Answer> {
        match m.get(f) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(|n| Some(Some(n)))
                .ok_or_else(|| bad(f, "must be a whole number from 1 to 4294967295, or null")),
        }
    }

    pub fn time(m: &Map<String, Value>, f: &str) -> Result<Option<Option<DateTime<Utc>>>, Answer> {
        match m.get(f) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
                .map(|t| Some(Some(t.with_timezone(&Utc))))
                .map_err(|_| {
                    bad(
                        f,
                        "must be an RFC 3339 time like 2026-12-31T00:00:00Z, or null",
                    )
                }),
            Some(_) => Err(bad(
                f,
                "must be an RFC 3339 time like 2026-12-31T00:00:00Z, or null",
            )),
        }
    }

    pub fn boolean(m: &Map<String, Value>, f: &str) -> Result<Option<bool>, Answer> {
        match m.get(f) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(f, "must be true or false")),
        }
    }

    pub fn only(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), Answer> {
        match m.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(bad(
                k,
                &format!("unknown field (allowed: {})", allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }
}

/// `"1.2"` → 1200. At most three decimals; no exponent.
fn parse_milli(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || frac.len() > 3 || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut f = frac.to_owned();
    while f.len() < 3 {
        f.push('0');
    }
    int.parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(f.parse::<u64>().ok()?)
}

const CREATE_FIELDS: [&str; 10] = [
    "name",
    "budget",
    "period",
    "rate",
    "concurrency",
    "rps",
    "burst",
    "expires_at",
    "note",
    "disabled",
];

async fn create_key(gate: &Gate, body: &[u8], actor: &str) -> Answer {
    let r = async {
        let m = parse_object(body)?;
        field::only(&m, &CREATE_FIELDS[..9])?;
        let name = field::string(&m, "name", 200)?
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| field::bad("name", "is required: a non-empty string"))?;
        let budget = field::points(&m, "budget")?
            .ok_or_else(|| field::bad("budget", "is required: a whole number of points"))?;
        let period = field::period(&m)?.unwrap_or(Period::None);
        let now = gate.clock.now();
        let secret = keys::new_secret();
        let rec = KeyRecord {
            id: keys::new_key_id(),
            name,
            secret_hash: keys::hash_secret(&secret),
            secret_prefix: keys::secret_prefix(&secret),
            rate_milli: field::rate(&m)?.unwrap_or(1000),
            concurrency: field::opt_u32(&m, "concurrency")?
                .flatten()
                .or(gate.cfg.limits.default_concurrency),
            rps: field::opt_u32(&m, "rps")?
                .flatten()
                .or(gate.cfg.limits.default_rps),
            burst: field::opt_u32(&m, "burst")?.flatten(),
            disabled: false,
            expires_at: field::time(&m, "expires_at")?.flatten(),
            note: field::string(&m, "note", 2000)?.unwrap_or_default(),
            created_at: now,
            updated_at: now,
        };
        let acc = gate
            .ledger
            .open_account(&rec.id, budget, period, actor, "key created")
            .await
            .map_err(internal)?;
        store_key(gate, &rec).await?;
        admin_audit(
            gate,
            actor,
            "key_create",
            &rec.id,
            json!({"budget": budget, "period": period}),
        )
        .await;
        let mut v = key_view(&rec, Some(&acc));
        if let Some(o) = v.as_object_mut() {
            o.insert("key".into(), Value::from(secret));
        }
        Ok::<_, Answer>(json_answer(StatusCode::CREATED, &v))
    };
    r.await.unwrap_or_else(|a| a)
}

fn internal(e: impl std::fmt::Display) -> Answer {
    tracing::error!(error = %e, "admin action failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string())
}

async fn find_key(gate: &Gate, id: &str) -> Result<KeyRecord, Answer> {
    gate.ledger
        .key_by_id(&KeyId(id.to_owned()))
        .await
        .map_err(internal)?
        .map(|(rec, _)| rec)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, Some("id"), format!("no key {id}")))
}

/// Writes a key to the store, then to this gate's cache under the version the
/// store gave it (so no older read of the key can replace it there).
async fn store_key(gate: &Gate, rec: &KeyRecord) -> Result<(), Answer> {
    let version = gate.ledger.put_key(rec).await.map_err(internal)?;
    gate.keys.put(rec, version);
    Ok(())
}

/// A page of key records, without their versions.
async fn key_page(
    gate: &Gate,
    after: Option<&KeyId>,
    limit: usize,
) -> Result<Vec<KeyRecord>, Answer> {
    let page = gate
        .ledger
        .keys_page(after, limit)
        .await
        .map_err(internal)?;
    Ok(page.into_iter().map(|(rec, _)| rec).collect())
}

/// Keys per page at most, and without `limit`.
const PAGE_MAX: usize = 1000;
const PAGE_DEFAULT: usize = 100;

/// `GET /admin/keys`. Without parameters: every key, as one JSON array ordered
/// by creation (the original answer; about 350 bytes a key). With `limit`
/// and/or `after`: one page in id order, `{"keys": [...], "next": id|null}`;
/// pass `next` as `after` for the following page. Ids never change, so pages
/// are stable while keys are added (a new key shows up on the page its id
/// sorts into).
async fn list_keys(gate: &Gate, query: &str) -> Answer {
    let mut limit = None;
    let mut after = None;
    for (k, v) in query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
    {
        match k {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=PAGE_MAX).contains(&n) => limit = Some(n),
                _ => {
                    return field::bad(
                        "limit",
                        &format!("must be a whole number from 1 to {PAGE_MAX}"),
                    )
                }
            },
            "after" => {
                let id = percent_decode(v);
                if id.is_empty() {
                    return field::bad("after", "must be a key id (the `next` of a page)");
                }
                after = Some(KeyId(id));
            }
            other => return field::bad(other, "unknown parameter (limit, after)"),
        }
    }
    let r = async {
        if limit.is_none() && after.is_none() {
            return list_all_keys(gate).await;
        }
        let limit = limit.unwrap_or(PAGE_DEFAULT);
        // One more than asked, to know whether a next page exists.
        let mut recs = key_page(gate, after.as_ref(), limit + 1).await?;
        let more = recs.len() > limit;
        recs.truncate(limit);
        let next = recs.last().filter(|_| more).map(|r| r.id.clone());
        // Written view by view (a serde_json Value per key would cost several
        // times the answer): {"keys": [...], "next": ...}.
        let views = key_views(gate, &recs).await?;
        let mut body = b"{\"keys\":".to_vec();
        push_json_array(&mut body, views.iter().map(Vec::as_slice));
        body.extend_from_slice(b",\"next\":");
        serde_json::to_writer(&mut body, &next).map_err(internal)?;
        body.push(b'}');
        Ok::<_, Answer>(Answer {
            status: StatusCode::OK,
            ctype: "application/json",
            body,
        })
    };
    r.await.unwrap_or_else(|a| a)
}

/// Every key, ordered by creation then id. Built a page of records at a time,
/// each key's view serialized at once into one buffer (large buffers go back
/// to the OS when freed; 100,000 small ones would stay with the allocator),
/// then copied into the answer in order.
async fn list_all_keys(gate: &Gate) -> Result<Answer, Answer> {
    // (created, id's range in `ids`, view's range in `views`)
    type Span = std::ops::Range<usize>;
    let mut order: Vec<(DateTime<Utc>, Span, Span)> = Vec::new();
    let (mut ids, mut views) = (String::new(), Vec::new());
    let mut after: Option<KeyId> = None;
    loop {
        let recs = key_page(gate, after.as_ref(), PAGE_MAX).await?;
        for (rec, view) in recs.iter().zip(key_views(gate, &recs).await?) {
            let id = ids.len()..ids.len() + rec.id.as_str().len();
            ids.push_str(rec.id.as_str());
            let start = views.len();
            views.extend_from_slice(&view);
            order.push((rec.created_at, id, start..views.len()));
        }
        match recs.last() {
            Some(last) if recs.len() == PAGE_MAX => after = Some(last.id.clone()),
            _ => break,
        }
    }
    order.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| ids[a.1.clone()].cmp(&ids[b.1.clone()]))
    });
    let mut body = Vec::with_capacity(views.len() + order.len() + 2);
    push_json_array(&mut body, order.iter().map(|(_, _, v)| &views[v.clone()]));
    Ok(Answer {
        status: StatusCode::OK,
        ctype: "application/json",
        body,
    })
}

/// Appends `[a,b,...]` made of already serialized JSON values.
fn push_json_array<'a>(body: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>) {
    body.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.push(b']');
}

/// The public views of `recs` as JSON, in the same order, with their accounts.
async fn key_views(gate: &Gate, recs: &[KeyRecord]) -> Result<Vec<Vec<u8>>, Answer> {
    let ids: Vec<KeyId> = recs.iter().map(|r| r.id.clone()).collect();
    let accts = gate.ledger.accounts_of(&ids).await.map_err(internal)?;
    let by_key: std::collections::HashMap<&KeyId, &AccountView> =
        accts.iter().map(|a| (&a.key, a)).collect();
    recs.iter()
        .map(|r| serde_json::to_vec(&key_view(r, by_key.get(&r.id).copied())).map_err(internal))
        .collect()
}

async fn show_key(gate: &Gate, id: &str) -> Answer {
    let r = async {
        let rec = find_key(gate, id).await?;
        let acc = gate.ledger.account(&rec.id).await.map_err(internal)?;
        Ok::<_, Answer>(json_answer(StatusCode::OK, &key_view(&rec, Some(&acc))))
    };
    r.await.unwrap_or_else(|a| a)
}

async fn patch_key(gate: &Gate, id: &str, body: &[u8], actor: &str) -> Answer {
    let r = async {
        let m = parse_object(body)?;
        field::only(&m, &CREATE_FIELDS)?;
        let mut rec = find_key(gate, id).await?;
        // Validate everything before changing anything.
        let name = field::string(&m, "name", 200)?;
        if name.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(field::bad("name", "must be a non-empty string"));
        }
        let budget = field::points(&m, "budget")?;
        let period = field::period(&m)?;
        let rate = field::rate(&m)?;
        let concurrency = field::opt_u32(&m, "concurrency")?;
        let rps = field::opt_u32(&m, "rps")?;
        let burst = field::opt_u32(&m, "burst")?;
        let expires = field::time(&m, "expires_at")?;
        let note = field::string(&m, "note", 2000)?;
        let disabled = field::boolean(&m, "disabled")?;
        if let Some(n) = name {
            rec.name = n;
        }
        if let Some(r) = rate {
            rec.rate_milli = r;
        }
        if let Some(c) = concurrency {
            rec.concurrency = c;
        }
        if let Some(r) = rps {
            rec.rps = r;
        }
        if let Some(b) = burst {
            rec.burst = b;
        }
        if let Some(e) = expires {
            rec.expires_at = e;
        }
        if let Some(n) = note.clone() {
            rec.note = n;
        }
        if let Some(d) = disabled {
            rec.disabled = d;
        }
        rec.updated_at = gate.clock.now();
        let why = note.unwrap_or_else(|| "admin change".into());
        if let Some(b) = budget {
            gate.ledger
                .set_budget(&rec.id, b, actor, &why)
                .await
                .map_err(internal)?;
        }
        if let Some(p) = period {
            gate.ledger
                .set_period(&rec.id, p, actor, &why)
                .await
                .map_err(internal)?;
        }
        store_key(gate, &rec).await?;
        let acc = gate.ledger.account(&rec.id).await.map_err(internal)?;
        admin_audit(gate, actor, "key_update", &rec.id, Value::Object(m)).await;
        Ok::<_, Answer>(json_answer(StatusCode::OK, &key_view(&rec, Some(&acc))))
    };
    r.await.unwrap_or_else(|a| a)
}

async fn disable_key(gate: &Gate, id: &str, actor: &str) -> Answer {
    let r = async {
        let mut rec = find_key(gate, id).await?;
        rec.disabled = true;
        rec.updated_at = gate.clock.now();
        store_key(gate, &rec).await?;
        admin_audit(gate, actor, "key_disable", &rec.id, Value::Null).await;
        let acc = gate.ledger.account(&rec.id).await.map_err(internal)?;
        Ok::<_, Answer>(json_answer(StatusCode::OK, &key_view(&rec, Some(&acc))))
    };
    r.await.unwrap_or_else(|a| a)
}

async fn top_up(gate: &Gate, id: &str, body: &[u8], actor: &str) -> Answer {
    let r = async {
        let m = parse_object(body)?;
        field::only(&m, &["points", "note"])?;
        let points = field::points(&m, "points")?
            .filter(|p| p.get() > 0)
            .ok_or_else(|| field::bad("points", "is required: a whole number greater than 0"))?;
        let note = field::string(&m, "note", 2000)?.unwrap_or_else(|| "top-up".into());
        let rec = find_key(gate, id).await?;
        let acc = gate
            .ledger
            .top_up(&rec.id, points, actor, &note)
            .await
            .map_err(internal)?;
        admin_audit(
            gate,
            actor,
            "top_up",
            &rec.id,
            json!({"points": points, "note": note}),
        )
        .await;
        Ok::<_, Answer>(json_answer(StatusCode::OK, &key_view(&rec, Some(&acc))))
    };
    r.await.unwrap_or_else(|a| a)
}

async fn rotate(gate: &Gate, id: &str, actor: &str) -> Answer {
    let r = async {
        let mut rec = find_key(gate, id).await?;
        let secret = keys::new_secret();
        rec.secret_hash = keys::hash_secret(&secret);
        rec.secret_prefix = keys::secret_prefix(&secret);
        rec.updated_at = gate.clock.now();
        store_key(gate, &rec).await?;
        admin_audit(gate, actor, "key_rotate", &rec.id, Value::Null).await;
        let acc = gate.ledger.account(&rec.id).await.map_err(internal)?;
        let mut v = key_view(&rec, Some(&acc));
        if let Some(o) = v.as_object_mut() {
            o.insert("key".into(), Value::from(secret));
        }
        Ok::<_, Answer>(json_answer(StatusCode::OK, &v))
    };
    r.await.unwrap_or_else(|a| a)
}

/// `since=1h`, `since=30m`, `since=2d` or an RFC 3339 time.
pub fn parse_when(s: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let (num, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: i64 = num.parse().ok()?;
    let d = match unit {
        "s" => chrono::Duration::seconds(n),
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => return None,
    };
    Some(now - d)
}

fn audit_query(gate: &Gate, query: &str) -> Answer {
    let mut f = audit::Filter::default();
    let now = gate.clock.now();
    for (k, v) in query
        .split('&')
        .filter(|s| !s.is_empty())
        .filter_map(|kv| kv.split_once('='))
    {
        let v = percent_decode(v);
        match k {
            "key" => f.key = Some(v),
            "decision" => f.decision = Some(v),
            "since" => match parse_when(&v, now) {
                Some(t) => f.since = Some(t),
                None => return field::bad("since", "must be like 1h, 30m, 2d or an RFC 3339 time"),
            },
            "until" => match parse_when(&v, now) {
                Some(t) => f.until = Some(t),
                None => return field::bad("until", "must be like 1h, 30m, 2d or an RFC 3339 time"),
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) => f.limit = Some(n),
                Err(_) => return field::bad("limit", "must be a whole number"),
            },
            other => {
                return field::bad(
                    other,
                    "unknown parameter (key, since, until, decision, limit)",
                )
            }
        }
    }
    match audit::query(&gate.cfg.audit_dir(), &f) {
        Ok(recs) => {
            let mut body = Vec::new();
            for r in recs {
                if serde_json::to_writer(&mut body, &r).is_ok() {
                    body.push(b'\n');
                }
            }
            Answer {
                status: StatusCode::OK,
                ctype: "application/x-ndjson",
                body,
            }
        }
        Err(e) => internal(e),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn admin_audit(gate: &Gate, actor: &str, action: &str, key: &KeyId, detail: Value) {
    let mut m = Map::new();
    m.insert("event".into(), Value::from("admin"));
    m.insert("action".into(), Value::from(action));
    m.insert("actor".into(), Value::from(actor));
    m.insert("key_id".into(), Value::from(key.as_str()));
    m.insert("decision".into(), Value::from("admin"));
    m.insert("detail".into(), detail);
    if let Err(e) = gate.audit.record(m).await {
        tracing::error!(error = %e, "audit record failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_exactly() {
        assert_eq!(parse_milli("1.2"), Some(1200));
        assert_eq!(parse_milli("1"), Some(1000));
        assert_eq!(parse_milli("0.001"), Some(1));
        assert_eq!(parse_milli("1.2345"), None);
        assert_eq!(parse_milli("-1"), None);
        assert_eq!(parse_milli("1e3"), None);
    }

    #[test]
    fn parses_relative_times() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_when("1h", now).unwrap(),
            now - chrono::Duration::hours(1)
        );
        assert!(parse_when("1y", now).is_none());
        assert!(parse_when("", now).is_none());
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(
            percent_decode("2026-11-23T12%3A00%3A00Z"),
            "2026-11-23T12:00:00Z"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
