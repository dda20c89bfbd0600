//! Following every charged task to its end.
//!
//! The upstream does not charge tasks that end in `fail`, so neither may the gate.
//! Each task the gate charged is registered (in the ledger's store, so it survives
//! restarts and replicas share it). The gate learns how a task ended from three
//! sources — a detail/progress answer passing through it, the upstream's callback,
//! or its own background check — and whichever comes first ends the task with one
//! conditional update ([`crate::ledger::Ledger::end_task`]); only that caller
//! refunds, and the refund itself is an idempotent ledger transition. Duplicates,
//! concurrent polls and replicas therefore cannot refund twice.

use crate::envelope::{self, Code};
use crate::gate::Gate;
use crate::json_edit;
use crate::points::{KeyId, Points, TransferId};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// Where a task is in its life, as far as the gate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Submitted, not yet seen to end.
    Open,
    /// Ended in `success`: the charge stands.
    Success,
    /// Ended in `fail`: the charge is refunded (stored as `refund_due` until the
    /// refund is recorded).
    Fail,
}

impl TaskState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Open => "open",
            TaskState::Success => "success",
            TaskState::Fail => "fail",
        }
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(TaskState::Open),
            "success" => Ok(TaskState::Success),
            // Failed, its refund not yet recorded (the ledger's `REFUND_DUE`).
            "fail" | "refund_due" => Ok(TaskState::Fail),
            other => Err(format!("unknown task state {other:?}")),
        }
    }
}

/// One task the gate charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The upstream's task id (`paintingSign`).
    pub task_id: String,
    /// The key that submitted it (the only one that may read it).
    pub key: KeyId,
    /// The submit path (decides the detail endpoint used to check it).
    pub endpoint: String,
    /// The ledger chain that charged it (refunded on `fail`).
    pub transfer: TransferId,
    /// What the upstream charged (its `used`), the base of an inpaint's price.
    pub upstream_points: Points,
    /// What the client was charged.
    pub charged: Points,
    /// Where it is.
    pub state: TaskState,
    /// The client's own callback URL, when the gate stands in for it.
    pub client_callback: Option<String>,
    /// The client's own nonce, restored when its callback is forwarded.
    pub client_nonce: Option<String>,
    /// The gate's nonce given to the upstream, checked on the upstream's callback.
    pub gate_nonce: Option<String>,
    /// Submit time.
    pub created_at: DateTime<Utc>,
}

/// Task settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// How often open tasks nobody polls are checked upstream.
    pub check_interval_secs: u64,
    /// Upstream checks in flight at once (the upstream has its own limits).
    pub check_concurrency: usize,
    /// Tasks listed at a time by the check (a full list is followed by the next).
    pub check_batch: usize,
    /// First delay between tries of a client callback; grows by itself each try.
    pub callback_retry_base_ms: u64,
    /// Tries of a client callback.
    pub callback_tries: u32,
    /// Operator-wide cap on tasks in flight (keep it below the upstream account's
    /// `taskLimitCount`); none by default.
    pub global_concurrency: Option<u32>,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            check_interval_secs: 30,
            check_concurrency: 4,
            check_batch: 256,
            callback_retry_base_ms: 5_000,
            callback_tries: 5,
            global_concurrency: None,
        }
    }
}

/// Hot cache of task ownership: `task_id → record`. Ownership never changes, so a
/// cached record answers "whose task is this" without a store read per poll.
#[derive(Default)]
pub struct TaskCache {
    by_id: DashMap<String, Arc<TaskRecord>>,
}

impl TaskCache {
    fn get(&self, id: &str) -> Option<Arc<TaskRecord>> {
        self.by_id.get(id).map(|r| r.clone())
    }
    fn put(&self, rec: TaskRecord) {
        self.by_id.insert(rec.task_id.clone(), Arc::new(rec));
    }
    fn forget(&self, id: &str) {
        self.by_id.remove(id);
    }
}

/// The detail endpoint that reports on a task submitted at `submit_path`.
pub fn detail_path(submit_path: &str) -> &'static str {
    if submit_path.starts_with("/aiapi/v1/mj/") {
        "/aiapi/v1/mj/task/progress"
    } else if submit_path.starts_with("/aiapi/workflow/")
        || submit_path.starts_with("/aiapi/utilityTool/")
    {
        "/aiapi/workflow/task/detail"
    } else if submit_path == "/aiapi/v1/training" {
        "/aiapi/v1/train/detail"
    } else {
        "/aiapi/v1/task/detail"
    }
}

/// The answer for a task the client may not see: the same as for one that does not exist.
pub fn not_found_body() -> Vec<u8> {
    envelope::error_body(Code::NotFound, "task does not exist")
}

/// Find a task the key owns. `None` both when it does not exist and when another
/// key submitted it: a client cannot tell the two apart.
pub async fn owned(
    gate: &Gate,
    key: &KeyId,
    task_id: &str,
) -> Result<Option<Arc<TaskRecord>>, crate::ledger::LedgerError> {
    let rec = match gate.tasks.get(task_id) {
        Some(r) => r,
        None => match gate.ledger.task(task_id).await? {
            Some(r) => {
                gate.tasks.put(r.clone());
                Arc::new(r)
            }
            None => return Ok(None),
        },
    };
    Ok((rec.key == *key).then_some(rec))
}

/// The `data.state` of a detail answer (`success`, `fail`, `running`, ...).
pub fn answer_state(body: &[u8]) -> Option<TaskState> {
    #[derive(Deserialize)]
    struct Env<'a> {
        code: Option<i64>,
        #[serde(borrow)]
        data: Option<Data<'a>>,
    }
    #[derive(Deserialize)]
    struct Data<'a> {
        #[serde(borrow)]
        state: Option<&'a str>,
    }
    let env: Env = serde_json::from_slice(body).ok()?;
    if env.code != Some(0) {
        return None;
    }
    state_from_word(env.data?.state?)
}

fn state_from_word(s: &str) -> Option<TaskState> {
    match s {
        "success" => Some(TaskState::Success),
        "fail" => Some(TaskState::Fail),
        _ => None,
    }
}

/// A task was seen to end (from `source`: "poll", "callback", "check"). Ends it
/// once; on `fail` refunds the charge once; frees its concurrency slot once.
pub async fn observe_end(gate: &Gate, rec: &TaskRecord, end: TaskState, source: &'static str) {
    let first = match gate.ledger.end_task(&rec.task_id, end).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, task = %rec.task_id, "cannot record the end of a task");
            return;
        }
    };
    if !first {
        return;
    }
    gate.limits.release(&rec.key);
    gate.tasks.forget(&rec.task_id);
    let mut m = task_audit(rec, "task_end", source);
    m.insert("state".into(), Value::from(end.as_str()));
    if end == TaskState::Fail {
        let _ = refund(gate, rec, &mut m).await;
    } else {
        m.insert("decision".into(), Value::from("task_success"));
    }
    if let Err(e) = gate.audit.record(m).await {
        tracing::error!(error = %e, "audit record failed");
    }
}

/// The start of an audit record about a task: what happened, to which task
/// and key, learned how.
fn task_audit(rec: &TaskRecord, event: &str, source: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("event".into(), Value::from(event));
    m.insert("task_id".into(), Value::from(rec.task_id.as_str()));
    m.insert("key_id".into(), Value::from(rec.key.as_str()));
    m.insert("endpoint".into(), Value::from(rec.endpoint.as_str()));
    m.insert("source".into(), Value::from(source));
    m
}

/// Refunds a failed task's charge and records that it is made, filling in the
/// audit record `m`. A refund that fails stays due: [`refund_due`] makes it later.
/// Returns whether the ledger made it (`Some(false)`), replayed one made before
/// (`Some(true)`), or made none (`None`).
async fn refund(gate: &Gate, rec: &TaskRecord, m: &mut Map<String, Value>) -> Option<bool> {
    match gate.ledger.refund(&rec.transfer).await {
        Ok(s) => {
            if !s.replay {
                gate.metrics
                    .points(rec.key.as_str(), "refunded", s.points.get());
            }
            m.insert("decision".into(), Value::from("refund"));
            m.insert("points".into(), Value::from(s.points.get()));
            m.insert("remaining".into(), Value::from(s.remaining.get()));
            m.insert("replay".into(), Value::from(s.replay));
            if let Err(e) = gate.ledger.refund_recorded(&rec.task_id).await {
                // Still listed as due: the sweep replays the refund (a no-op) and
                // records it then.
                tracing::warn!(error = %e, task = %rec.task_id, "cannot record a refund as made");
            }
            Some(s.replay)
        }
        Err(e) => {
            m.insert("decision".into(), Value::from("refund_failed"));
            m.insert("reason".into(), Value::from(e.to_string()));
            if matches!(e, crate::ledger::LedgerError::Storage(_)) {
                tracing::error!(error = %e, task = %rec.task_id, "refund failed; it stays due");
                return None;
            }
            // The ledger answered, and no refund can be made (the transfer is
            // not a committed charge): trying again would answer the same.
            tracing::error!(error = %e, task = %rec.task_id, "refund refused by the ledger");
            if let Err(e) = gate.ledger.refund_recorded(&rec.task_id).await {
                tracing::warn!(error = %e, task = %rec.task_id, "cannot record a refused refund");
            }
            None
        }
    }
}

/// How long after a task's failure was recorded its refund counts as cut off:
/// the gate that recorded it refunds at once, so anything older was
/// interrupted (a crash, a ledger error) and is made by the sweep.
pub const REFUND_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The refund sweep: makes the refunds of failed tasks whose refund was never
/// recorded, `grace` after their failure was. Every refund is idempotent by id,
/// so one that was made but not recorded is only confirmed (no points move, no
/// audit record), and replicas sweeping together refund once. Returns how many
/// refunds moved points.
pub async fn refund_due(gate: &Gate, grace: std::time::Duration) -> usize {
    let before = gate.clock.now() - chrono::Duration::from_std(grace).unwrap_or_default();
    let Some(due) = list_due(gate, crate::ledger::Due::Refund, before, REFUND_BATCH).await else {
        return 0;
    };
    let mut made = 0;
    for rec in due {
        let mut m = task_audit(&rec, "task_refund", "sweep");
        match refund(gate, &rec, &mut m).await {
            Some(true) => continue,
            Some(false) => {
                made += 1;
                tracing::warn!(task = %rec.task_id, "made a refund that was cut off");
            }
            None => {}
        }
        if let Err(e) = gate.audit.record(m).await {
            tracing::error!(error = %e, "audit record failed");
        }
    }
    made
}

/// Failed tasks looked at per sweep.
const REFUND_BATCH: usize = 256;

/// A detail/progress answer passed through the gate: settle the task if it ended.
pub async fn observe_answer(gate: &Gate, rec: &TaskRecord, body: &[u8]) {
    if let Some(end) = answer_state(body) {
        observe_end(gate, rec, end, "poll").await;
    }
}

/// What the client sent about callbacks, and what the upstream gets instead.
pub struct CallbackPlan {
    /// The body to send upstream (callback and nonce replaced).
    pub body: bytes::Bytes,
    /// The client's callback URL.
    pub client_callback: String,
    /// The client's nonce, if any.
    pub client_nonce: Option<String>,
    /// The gate's nonce.
    pub gate_nonce: String,
}

/// When the client gives a `callback` and the gate has a public URL, stand in for
/// the client: the upstream calls the gate, with the gate's own nonce.
pub fn plan_callback(public_url: Option<&str>, body: &[u8]) -> Option<CallbackPlan> {
    let base = public_url?.trim_end_matches('/');
    let cb = json_edit::find_path(body, &["callback"])?;
    let client_callback: String = serde_json::from_slice(&body[cb.value.clone()]).ok()?;
    if client_callback.is_empty() {
        return None;
    }
    let nonce_span = json_edit::find_path(body, &["nonce"]);
    let client_nonce: Option<String> = nonce_span
        .as_ref()
        .and_then(|n| serde_json::from_slice::<String>(&body[n.value.clone()]).ok());
    let gate_nonce = {
        use rand::RngCore;
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        hex::encode(b) // 32 characters, the upstream's limit
    };
    let url = serde_json::to_vec(&format!("{base}/gate/callback")).ok()?;
    let nonce_json = serde_json::to_vec(&gate_nonce).ok()?;
    let mut edits = vec![(cb.value, url)];
    let out = match nonce_span {
        Some(n) => {
            edits.push((n.value, nonce_json));
            json_edit::splice(body, edits)
        }
        None => {
            let spliced = json_edit::splice(body, edits);
            let root = 0..spliced.len();
            json_edit::insert_member(&spliced, root, "nonce", &nonce_json)?
        }
    };
    Some(CallbackPlan {
        body: bytes::Bytes::from(out),
        client_callback,
        client_nonce,
        gate_nonce,
    })
}

/// The upstream's callback (`POST /gate/callback`): check task and nonce, settle
/// or refund, then forward to the client's callback with its own nonce restored.
/// Returns the HTTP status and body for the upstream.
pub async fn handle_callback(gate: &Gate, body: &[u8]) -> (u16, Vec<u8>) {
    #[derive(Deserialize)]
    struct Cb {
        #[serde(rename = "taskId")]
        task_id: Option<Value>,
        nonce: Option<String>,
        state: Option<String>,
    }
    let refuse = |why: &str| (403u16, envelope::error_body(Code::Auth, why));
    let Ok(cb) = serde_json::from_slice::<Cb>(body) else {
        audit_callback(
            gate,
            None,
            "callback_refused",
            "body is not a JSON callback",
        )
        .await;
        return (
            400,
            envelope::error_body(Code::Invalid, "callback body is not JSON"),
        );
    };
    let task_id = match &cb.task_id {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            audit_callback(gate, None, "callback_refused", "no taskId").await;
            return refuse("unknown task");
        }
    };
    let rec = match gate.ledger.task(&task_id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            audit_callback(gate, Some(&task_id), "callback_refused", "unknown task").await;
            return refuse("unknown task");
        }
        Err(e) => {
            tracing::error!(error = %e, "task lookup failed");
            // Not 200: the upstream will try again.
            return (503, envelope::error_body(Code::Internal, "try again"));
        }
    };
    let nonce_ok = match (&rec.gate_nonce, &cb.nonce) {
        (Some(want), Some(got)) => {
            use subtle::ConstantTimeEq;
            bool::from(want.as_bytes().ct_eq(got.as_bytes()))
        }
        _ => false,
    };
    if !nonce_ok {
        audit_callback(gate, Some(&task_id), "callback_refused", "wrong nonce").await;
        return refuse("wrong nonce");
    }
    if let Some(end) = cb.state.as_deref().and_then(state_from_word) {
        observe_end(gate, &rec, end, "callback").await;
    }
    if let Some(url) = rec.client_callback.clone() {
        let nonce = rec.client_nonce.clone().unwrap_or_default();
        let fwd = match json_edit::find_path(body, &["nonce"]) {
            Some(n) => json_edit::splice(
                body,
                vec![(n.value, serde_json::to_vec(&nonce).unwrap_or_default())],
            ),
            None => body.to_vec(),
        };
        let g = gate.clone();
        tokio::spawn(async move { deliver(&g, &url, fwd, &task_id).await });
    }
    (200, envelope::ok_body(&Value::Null))
}

async fn audit_callback(gate: &Gate, task: Option<&str>, decision: &str, why: &str) {
    let mut m = Map::new();
    m.insert("event".into(), Value::from("callback"));
    m.insert("decision".into(), Value::from(decision));
    m.insert("reason".into(), Value::from(why));
    if let Some(t) = task {
        m.insert("task_id".into(), Value::from(t));
    }
    if let Err(e) = gate.audit.record(m).await {
        tracing::error!(error = %e, "audit record failed");
    }
}

/// POST a callback body to the client, retrying with growing delays until it
/// answers 200 or the tries run out. Duplicates are the client's to tolerate, as
/// with the upstream's own callbacks.
async fn deliver(gate: &Gate, url: &str, body: Vec<u8>, task_id: &str) {
    let cfg = &gate.cfg.tasks;
    let client = gate.callback_client.clone();
    for attempt in 1..=cfg.callback_tries.max(1) {
        let r = client
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().as_u16() == 200 => return,
            Ok(resp) => tracing::warn!(
                task = task_id,
                status = resp.status().as_u16(),
                attempt,
                "client callback refused"
            ),
            Err(e) => tracing::warn!(task = task_id, error = %e, attempt, "client callback failed"),
        }
        if attempt < cfg.callback_tries {
            tokio::time::sleep(Duration::from_millis(
                cfg.callback_retry_base_ms * u64::from(attempt),
            ))
            .await;
        }
    }
    audit_callback(
        gate,
        Some(task_id),
        "callback_undelivered",
        "client callback gave no 200 after all tries",
    )
    .await;
}

/// The tasks due for `what` whose last check is before `before`, oldest first;
/// `None` (logged) when the store cannot list them.
async fn list_due(
    gate: &Gate,
    what: crate::ledger::Due,
    before: DateTime<Utc>,
    limit: usize,
) -> Option<Vec<TaskRecord>> {
    match gate.ledger.due_tasks(what, before, limit).await {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!(error = %e, due = ?what, "listing due tasks failed");
            None
        }
    }
}

/// One round of the background check: ask the upstream about the open tasks
/// that nobody had asked about for `check_interval_secs` when the round began,
/// `check_concurrency` at a time. They are listed `check_batch` at a time,
/// oldest check first; a full list is followed by the next at once, so a
/// backlog (tasks that ended upstream unpolled, with no callback) is worked off
/// in one round instead of `check_batch` per interval. Each check marks its
/// task checked before asking, so the round ends once the tasks due at its
/// start are done; a task listed again (its mark failed to write) ends it too.
pub async fn check_due(gate: &Gate) {
    use futures_util::stream::{self, StreamExt};
    let cfg = &gate.cfg.tasks;
    let batch = cfg.check_batch.max(1);
    let before = gate.clock.now() - chrono::Duration::seconds(cfg.check_interval_secs as i64);
    let mut seen = std::collections::HashSet::new();
    loop {
        let Some(due) = list_due(gate, crate::ledger::Due::Check, before, batch).await else {
            return;
        };
        let full = due.len() >= batch;
        let fresh: Vec<TaskRecord> = due
            .into_iter()
            .filter(|rec| seen.insert(rec.task_id.clone()))
            .collect();
        if fresh.is_empty() {
            return;
        }
        stream::iter(fresh)
            .for_each_concurrent(cfg.check_concurrency.max(1), |rec| async move {
                check_one(gate, &rec).await;
            })
            .await;
        if !full {
            return;
        }
    }
}

async fn check_one(gate: &Gate, rec: &TaskRecord) {
    let _ = gate.ledger.touch_task(&rec.task_id).await;
    let body = serde_json::to_vec(&serde_json::json!({"taskId": rec.task_id, "preview": false}))
        .unwrap_or_default();
    let headers = json_headers();
    match gate
        .upstream
        .send(
            false,
            detail_path(&rec.endpoint),
            &headers,
            bytes::Bytes::from(body),
        )
        .await
    {
        Ok(a) => {
            if let Some(end) = answer_state(&a.body) {
                observe_end(gate, rec, end, "check").await;
            }
        }
        Err(e) => tracing::warn!(error = %e, task = %rec.task_id, "task check failed"),
    }
}

/// Headers of a request the gate itself sends upstream.
fn json_headers() -> hyper::HeaderMap {
    let mut headers = hyper::HeaderMap::new();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    headers
}

/// The workflow's `consume` (points per run) from `/aiapi/workflow/detail`,
/// fetched once per workflow and cached.
pub async fn workflow_consume(gate: &Gate, workflow_id: &str) -> Option<Points> {
    if let Some(p) = gate.workflows.get(workflow_id) {
        return Some(*p);
    }
    let body = serde_json::to_vec(&serde_json::json!({"workflowId": workflow_id})).ok()?;
    let headers = json_headers();
    let a = gate
        .upstream
        .send(
            false,
            "/aiapi/workflow/detail",
            &headers,
            bytes::Bytes::from(body),
        )
        .await
        .ok()?;
    let v: Value = serde_json::from_slice(&a.body).ok()?;
    if v["code"].as_i64() != Some(0) {
        return None;
    }
    let c = &v["data"]["consume"];
    let n = c
        .as_u64()
        .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))?;
    gate.workflows.insert(workflow_id.to_owned(), Points(n));
    Some(Points(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_plan_replaces_url_and_nonce_and_keeps_the_rest() {
        let body = br#"{"prompt":"x","callback":"https://client.example/cb","nonce":"mine","seed":18446744073709551615}"#;
        let p = plan_callback(Some("https://gate.example/"), body).unwrap();
        assert_eq!(p.client_callback, "https://client.example/cb");
        assert_eq!(p.client_nonce.as_deref(), Some("mine"));
        assert_eq!(p.gate_nonce.len(), 32);
        let want = format!(
            r#"{{"prompt":"x","callback":"https://gate.example/gate/callback","nonce":"{}","seed":18446744073709551615}}"#,
            p.gate_nonce
        );
        assert_eq!(std::str::from_utf8(&p.body).unwrap(), want);
    }

    #[test]
    fn callback_plan_adds_a_nonce_when_the_client_gave_none() {
        let body = br#"{"callback":"http://c/cb"}"#;
        let p = plan_callback(Some("http://g"), body).unwrap();
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["nonce"], p.gate_nonce.as_str());
        assert_eq!(v["callback"], "http://g/gate/callback");
        assert!(p.client_nonce.is_none());
    }

    #[test]
    fn no_plan_without_a_public_url_or_a_callback() {
        assert!(plan_callback(None, br#"{"callback":"http://c"}"#).is_none());
        assert!(plan_callback(Some("http://g"), br#"{"prompt":"x"}"#).is_none());
        assert!(plan_callback(Some("http://g"), br#"{"callback":""}"#).is_none());
    }

    #[test]
    fn reads_end_states_only_from_successful_answers() {
        assert_eq!(
            answer_state(br#"{"code":0,"data":{"state":"fail"}}"#),
            Some(TaskState::Fail)
        );
        assert_eq!(
            answer_state(br#"{"code":0,"data":{"state":"success","progress":1}}"#),
            Some(TaskState::Success)
        );
        assert_eq!(
            answer_state(br#"{"code":0,"data":{"state":"running"}}"#),
            None
        );
        assert_eq!(answer_state(br#"{"code":3,"data":{"state":"fail"}}"#), None);
    }

    #[test]
    fn detail_paths_follow_the_submit_family() {
        assert_eq!(detail_path("/aiapi/v1/draw"), "/aiapi/v1/task/detail");
        assert_eq!(detail_path("/aiapi/v1/inpaint"), "/aiapi/v1/task/detail");
        assert_eq!(
            detail_path("/aiapi/v1/mj/draw"),
            "/aiapi/v1/mj/task/progress"
        );
        assert_eq!(
            detail_path("/aiapi/workflow/run"),
            "/aiapi/workflow/task/detail"
        );
        assert_eq!(
            detail_path("/aiapi/utilityTool/run"),
            "/aiapi/workflow/task/detail"
        );
        assert_eq!(detail_path("/aiapi/v1/training"), "/aiapi/v1/train/detail");
    }
}
