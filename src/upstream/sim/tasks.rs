//! Simulated tasks: creation (charging the account), the timed walk
//! `in_queue → running → success | fail`, the refund of failed tasks, callbacks with
//! retries, and the detail answers.

use super::{stopped, Shared, Submit};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A 1×1 PNG, base64: the `current_image` preview of running tasks.
pub(super) const PREVIEW_PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// Callback tries in all (the first one plus retries).
const CALLBACK_TRIES: u32 = 5;

/// Share of `task_ms` a task spends `in_queue` before it is `running`.
const QUEUE_SHARE: f64 = 0.25;

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Success,
    Fail,
}

/// The end of a task: how, and when (for forgetting it later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ended {
    pub outcome: Outcome,
    pub at: Instant,
}

/// Where a task is now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Phase {
    InQueue,
    /// Progress 0..1.
    Running(f64),
    Done(Outcome),
}

/// What a task produces, which shapes its detail answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Draw,
    Training,
    Midjourney,
    Describe,
    Workflow,
}

impl Kind {
    /// Midjourney tasks write progress as a percent string, everything else as 0..1.
    fn style(self) -> Style {
        match self {
            Kind::Midjourney | Kind::Describe => Style::Midjourney,
            Kind::Draw | Kind::Training | Kind::Workflow => Style::Draw,
        }
    }
}

/// Where to report the end of a task.
#[derive(Debug, Clone)]
pub(super) struct Callback {
    pub url: String,
    pub nonce: Option<String>,
}

/// One task. The end is published through `done` so long polls can wait on it
/// without holding the map's lock.
#[derive(Debug)]
pub(super) struct Task {
    kind: Kind,
    pub used: u64,
    images: u32,
    created: Instant,
    will_fail: bool,
    callback: Option<Callback>,
    done: watch::Sender<Option<Ended>>,
}

impl Task {
    pub(super) fn phase(&self, task_ms: u64) -> Phase {
        if let Some(ended) = *self.done.borrow() {
            return Phase::Done(ended.outcome);
        }
        let elapsed = self.created.elapsed().as_secs_f64() * 1000.0;
        let total = task_ms.max(1) as f64;
        let share = elapsed / total;
        if share < QUEUE_SHARE {
            Phase::InQueue
        } else {
            // Never 1.0 before the task has really ended: settle on state, not progress.
            Phase::Running(share.min(0.99))
        }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Option<Ended>> {
        self.done.subscribe()
    }

    /// True when the task ended before `deadline`.
    pub(super) fn ended_before(&self, deadline: Instant) -> bool {
        self.done.borrow().is_some_and(|e| e.at < deadline)
    }
}

/// What a submit asks for once it has been validated and priced.
pub(super) struct NewTask {
    pub submit: Submit,
    pub kind: Kind,
    pub used: u64,
    pub images: u32,
    pub will_fail: bool,
    pub callback: Option<Callback>,
}

/// Why a priced submit was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    #[error("concurrent task limit reached: {limit} tasks unfinished")]
    TaskLimit { limit: u32 },
    #[error("insufficient points: this task needs {needed}, balance is {balance}")]
    Balance { needed: u64, balance: u64 },
}

/// Takes a slot under `task_limit` and the points, creates the task and starts its
/// clock. Returns the task id and the balance left.
pub(super) fn create(shared: &Arc<Shared>, new: NewTask) -> Result<(String, u64), Refused> {
    let limit = shared.cfg.task_limit;
    shared
        .in_flight
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limit).then_some(n + 1)
        })
        .map_err(|_| Refused::TaskLimit { limit })?;
    let taken = shared
        .balance
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
            b.checked_sub(new.used)
        });
    let balance = match taken {
        Ok(before) => before - new.used,
        Err(balance) => {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Balance {
                needed: new.used,
                balance,
            });
        }
    };
    shared.charged.fetch_add(new.used, Ordering::SeqCst);
    shared.submits[new.submit as usize].fetch_add(1, Ordering::Relaxed);

    let seq = shared.task_seq.fetch_add(1, Ordering::Relaxed);
    let id = format!("sim{:08x}{:010}", shared.salt, seq);
    let (done, _) = watch::channel(None);
    shared.tasks.insert(
        id.clone(),
        Task {
            kind: new.kind,
            used: new.used,
            images: new.images.max(1),
            created: Instant::now(),
            will_fail: new.will_fail,
            callback: new.callback,
            done,
        },
    );
    let task_ms = shared.cfg.task_ms;
    if task_ms == 0 {
        finish(shared, &id);
    } else {
        let shared = shared.clone();
        let id = id.clone();
        let mut stop = shared.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(task_ms)) => finish(&shared, &id),
                _ = stopped(&mut stop) => {}
            }
        });
    }
    Ok((id, balance))
}

/// Ends a task once: publishes the outcome, frees its slot, refunds a failure (the
/// upstream does not charge failed tasks) and starts the callback.
fn finish(shared: &Arc<Shared>, id: &str) {
    let (outcome, used, callback) = {
        let Some(task) = shared.tasks.get(id) else {
            return;
        };
        let outcome = if task.will_fail {
            Outcome::Fail
        } else {
            Outcome::Success
        };
        let first = task.done.send_if_modified(|o| {
            if o.is_some() {
                return false;
            }
            *o = Some(Ended {
                outcome,
                at: Instant::now(),
            });
            true
        });
        if !first {
            return;
        }
        let callback = task.callback.clone().map(|cb| {
            (
                cb,
                end_fields(shared, id, &task, task.kind.style(), outcome),
            )
        });
        (outcome, task.used, callback)
    };
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    match outcome {
        Outcome::Success => {
            shared.succeeded.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Fail => {
            shared.balance.fetch_add(used, Ordering::SeqCst);
            shared.charged.fetch_sub(used, Ordering::SeqCst);
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some((cb, mut fields)) = callback {
        fields.insert(
            "nonce".to_owned(),
            cb.nonce.map(Value::String).unwrap_or(Value::Null),
        );
        let shared = shared.clone();
        tokio::spawn(async move { deliver(&shared, &cb.url, Value::Object(fields)).await });
    }
}

/// POSTs a callback; anything but HTTP 200 is retried after base, 2×base, ... ms.
async fn deliver(shared: &Arc<Shared>, url: &str, payload: Value) {
    let payload = serde_json::to_vec(&payload).unwrap_or_default();
    let base = shared.cfg.callback_retry_base_ms;
    let mut stop = shared.stop.clone();
    for attempt in 1..=CALLBACK_TRIES {
        shared.callbacks_attempted.fetch_add(1, Ordering::Relaxed);
        let ok = matches!(
            shared
                .http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(payload.clone())
                .send()
                .await,
            Ok(resp) if resp.status() == reqwest::StatusCode::OK
        );
        if ok {
            shared.callbacks_delivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if attempt == CALLBACK_TRIES {
            break;
        }
        let delay = Duration::from_millis(base.saturating_mul(u64::from(attempt)));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return,
        }
    }
    shared.callbacks_abandoned.fetch_add(1, Ordering::Relaxed);
}

/// How a detail endpoint writes progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Style {
    /// `progress` a number 0..1.
    Draw,
    /// `progress` a string `"45%"` plus `progressValue` 45.
    Midjourney,
}

/// The fields of a callback and of a finished task's detail: `taskId`, `state`,
/// `progress`, `audit`, `imgUrl`, `images` (and kind-specific extras).
fn end_fields(
    shared: &Shared,
    id: &str,
    task: &Task,
    style: Style,
    outcome: Outcome,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("taskId".into(), json!(id));
    match outcome {
        Outcome::Success => {
            m.insert("state".into(), json!("success"));
            put_progress(&mut m, style, 1.0);
            m.insert("audit".into(), json!(1));
            let urls: Vec<String> = (0..task.images)
                .map(|i| format!("{}/sim/img/{id}_{i}.png", shared.base_url))
                .collect();
            m.insert("imgUrl".into(), json!(urls.first()));
            m.insert(
                "images".into(),
                Value::Array(
                    urls.iter()
                        .map(|u| json!({"imageUrl": u, "audit": 1}))
                        .collect(),
                ),
            );
            match task.kind {
                Kind::Describe => {
                    m.insert(
                        "prompts".into(),
                        json!([
                            "1️⃣ a simulated picture, soft light",
                            "2️⃣ a simulated picture, oil painting",
                            "3️⃣ a simulated picture, watercolor",
                            "4️⃣ a simulated picture, photograph"
                        ]),
                    );
                }
                Kind::Training => {
                    m.insert("modelId".into(), json!(format!("model-{id}")));
                }
                Kind::Draw | Kind::Midjourney | Kind::Workflow => {}
            }
        }
        Outcome::Fail => {
            m.insert("state".into(), json!("fail"));
            put_progress(&mut m, style, 0.0);
            m.insert("audit".into(), Value::Null);
            m.insert("imgUrl".into(), Value::Null);
            m.insert("images".into(), json!([]));
            m.insert("failReason".into(), json!("simulated failure"));
        }
    }
    m
}

fn put_progress(m: &mut Map<String, Value>, style: Style, share: f64) {
    match style {
        Style::Draw => {
            m.insert("progress".into(), json!((share * 100.0).round() / 100.0));
        }
        Style::Midjourney => {
            let pct = (share * 100.0).floor() as u64;
            m.insert("progress".into(), json!(format!("{pct}%")));
            m.insert("progressValue".into(), json!(pct));
        }
    }
}

/// The `data` of a detail answer for a task, now.
pub(super) fn detail(shared: &Shared, id: &str, task: &Task, style: Style, preview: bool) -> Value {
    let m = match task.phase(shared.cfg.task_ms) {
        Phase::Done(outcome) => end_fields(shared, id, task, style, outcome),
        Phase::InQueue => {
            let mut m = Map::new();
            m.insert("taskId".into(), json!(id));
            m.insert("state".into(), json!("in_queue"));
            put_progress(&mut m, style, 0.0);
            m
        }
        Phase::Running(share) => {
            let mut m = Map::new();
            m.insert("taskId".into(), json!(id));
            m.insert("state".into(), json!("running"));
            put_progress(&mut m, style, share);
            if preview {
                m.insert("current_image".into(), json!(PREVIEW_PNG_BASE64));
            }
            m
        }
    };
    Value::Object(m)
}

/// Finished tasks are forgotten after this long (result URLs upstream live about as long).
const TASK_TTL: Duration = Duration::from_secs(30 * 60);
/// Above this many stored tasks (a load benchmark), finished ones go after `SHORT_TTL`.
const TASKS_SOFT_MAX: usize = 100_000;
const SHORT_TTL: Duration = Duration::from_secs(5);
const REAP_EVERY: Duration = Duration::from_secs(2);

/// Forgets finished tasks so a long benchmark does not grow the simulator without
/// bound. Detail requests for a forgotten task answer "task not found".
pub(super) async fn reap(shared: Arc<Shared>) {
    let mut stop = shared.stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REAP_EVERY) => {}
            _ = stopped(&mut stop) => return,
        }
        let ttl = if shared.tasks.len() > TASKS_SOFT_MAX {
            SHORT_TTL
        } else {
            TASK_TTL
        };
        if let Some(deadline) = Instant::now().checked_sub(ttl) {
            shared.tasks.retain(|_, t| !t.ended_before(deadline));
        }
    }
}
