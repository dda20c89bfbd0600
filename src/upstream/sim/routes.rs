//! The simulator's HTTP surface: the upstream endpoints, the fault injection around
//! them, and the `/sim/...` control routes.

use super::pricing::{self, flag};
use super::tasks::{self, Callback, Kind, NewTask, Refused, Style};
use super::{stopped, Fault, Shared, SimRequest, Submit};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The answer body type: a full buffer, or the broken stream of `ResetMidAnswer`.
pub(super) type Body = BoxBody<Bytes, std::io::Error>;

/// Prompt marker that makes a task end in `fail`.
pub const FAIL_MARKER: &str = "[[sim:fail]]";
/// Prompt marker that makes a submit answer code 1004.
pub const SENSITIVE_MARKER: &str = "[[sim:sensitive]]";

/// Midjourney prices (points): fast and relax modes, describe, upscale.
const MJ_FAST: u64 = 80;
const MJ_RELAX: u64 = 50;
const MJ_DESCRIBE: u64 = 8;
const MJ_UPSCALE: u64 = 6;
/// Points per material image of a training task.
const TRAINING_PER_IMAGE: u64 = 100;
/// Inpaint costs the original task's points plus this.
const INPAINT_EXTRA: u64 = 3;
/// Points per utility-tool run (not documented upstream).
const UTILITY_RUN: u64 = 10;
/// Longest a `waitUtilEnd` request is held.
const LONG_POLL_MAX: Duration = Duration::from_secs(600);
/// How long a `CutLongPoll` request is held before its connection is dropped.
const CUT_AFTER: Duration = Duration::from_millis(200);

const JSON_TYPE: &str = "application/json;charset=UTF-8";

/// A 1×1 PNG, served for every `/sim/img/...` URL in task results.
const PNG: [u8; 70] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0x64, 0x60, 0xf8, 0x5f,
    0x0f, 0x00, 0x02, 0x87, 0x01, 0x80, 0xeb, 0x47, 0xba, 0x92, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// Why a request ends without an answer; hyper closes the connection on it.
#[derive(Debug, thiserror::Error)]
pub(super) enum Dropped {
    #[error("the client's request body could not be read")]
    ClientBody,
    #[error("connection dropped by a simulated fault")]
    Fault,
}

/// How a handler can end other than with `data`.
enum Failure {
    /// A business error: HTTP 200, `code != 0`.
    Reject(i64, String),
    /// `CutLongPoll`: drop the connection.
    Cut,
}

fn reject(code: i64, msg: impl Into<String>) -> Failure {
    Failure::Reject(code, msg.into())
}

/// An answer before faults spoil it.
struct Reply {
    status: StatusCode,
    body: Bytes,
}

/// Every upstream endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    ClientDetail,
    Draw,
    TaskDetail,
    Inpaint,
    Training,
    TrainDetail,
    MjDraw,
    MjDescribe,
    MjUpscale,
    MjZoomout,
    MjVariation,
    MjProgress,
    WorkflowDetail,
    WorkflowRun,
    WorkflowTaskDetail,
    UtilityDetail,
    UtilityRun,
}

impl Route {
    fn find(path: &str) -> Option<Route> {
        Some(match path {
            "/aiapi/v1/client/detail" => Route::ClientDetail,
            "/aiapi/v1/draw" => Route::Draw,
            "/aiapi/v1/task/detail" => Route::TaskDetail,
            "/aiapi/v1/inpaint" => Route::Inpaint,
            "/aiapi/v1/training" => Route::Training,
            "/aiapi/v1/train/detail" => Route::TrainDetail,
            "/aiapi/v1/mj/draw" => Route::MjDraw,
            "/aiapi/v1/mj/describe" => Route::MjDescribe,
            "/aiapi/v1/mj/upscale" => Route::MjUpscale,
            "/aiapi/v1/mj/zoomout" => Route::MjZoomout,
            "/aiapi/v1/mj/variation" => Route::MjVariation,
            "/aiapi/v1/mj/task/progress" => Route::MjProgress,
            "/aiapi/workflow/detail" => Route::WorkflowDetail,
            "/aiapi/workflow/run" => Route::WorkflowRun,
            "/aiapi/workflow/task/detail" => Route::WorkflowTaskDetail,
            "/aiapi/utilityTool/detail" => Route::UtilityDetail,
            "/aiapi/utilityTool/run" => Route::UtilityRun,
            _ => return None,
        })
    }

    fn method(self) -> Method {
        if self == Route::ClientDetail {
            Method::GET
        } else {
            Method::POST
        }
    }
}

/// Serves one request: control routes directly; upstream routes recorded, answered,
/// then delayed and spoiled as the current fault says.
pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Dropped> {
    if req.uri().path().starts_with("/sim/") {
        return Ok(control(&shared, req).await);
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|_| Dropped::ClientBody)?
        .to_bytes();
    shared.record(SimRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: header_map(&parts.headers),
        body: body.clone(),
    });

    let fault = shared.fault();
    let delay = shared.cfg.latency_ms
        + match fault {
            Fault::Slow(ms) => ms,
            _ => 0,
        };
    match fault {
        Fault::ResetBeforeAnswer => return Err(Dropped::Fault),
        Fault::Http500 => {
            pause(delay).await;
            let body = envelope(1, "simulated upstream failure (HTTP 500)", Value::Null);
            return Ok(respond(StatusCode::INTERNAL_SERVER_ERROR, body));
        }
        _ => {}
    }
    let reply = match answer(&shared, &parts, &body, fault).await {
        Ok(reply) => reply,
        Err(Cut) => {
            tokio::time::sleep(CUT_AFTER).await;
            return Err(Dropped::Fault);
        }
    };
    pause(delay).await;
    Ok(match fault {
        Fault::InvalidJson => {
            let half = reply.body.len() / 2;
            respond(reply.status, reply.body.slice(..half))
        }
        Fault::Huge => respond(StatusCode::OK, shared.huge_body()),
        Fault::ResetMidAnswer => broken(reply),
        _ => respond(reply.status, reply.body),
    })
}

/// The answer of `CutLongPoll` to a long poll: none.
struct Cut;

async fn answer(
    shared: &Arc<Shared>,
    parts: &Parts,
    body: &Bytes,
    fault: Fault,
) -> Result<Reply, Cut> {
    let Some(route) = Route::find(parts.uri.path()) else {
        return Ok(Reply {
            status: StatusCode::NOT_FOUND,
            body: envelope(3, "no such endpoint", Value::Null),
        });
    };
    if parts.method != route.method() {
        return Ok(Reply {
            status: StatusCode::METHOD_NOT_ALLOWED,
            body: envelope(3, "method not allowed", Value::Null),
        });
    }
    let result = if !authorized(&parts.headers, &shared.cfg.token) {
        Err(reject(
            1001,
            "authentication failed: missing or wrong token",
        ))
    } else if route == Route::ClientDetail {
        Ok(client_detail(shared))
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(req)) => dispatch(shared, route, &req, body, fault).await,
            _ => Err(reject(1003, "the body must be a JSON object")),
        }
    };
    match result {
        Ok(data) => Ok(Reply {
            status: StatusCode::OK,
            body: envelope(0, "success", data),
        }),
        Err(Failure::Cut) => Err(Cut),
        Err(Failure::Reject(code, msg)) => {
            *shared.rejections.entry(code).or_insert(0) += 1;
            Ok(Reply {
                status: StatusCode::OK,
                body: envelope(code, &msg, Value::Null),
            })
        }
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    route: Route,
    req: &Map<String, Value>,
    raw: &[u8],
    fault: Fault,
) -> Result<Value, Failure> {
    let mj_type = || mj_price(req);
    match route {
        Route::ClientDetail => Ok(client_detail(shared)),
        Route::Draw => {
            let est = pricing::price_draw(req).map_err(|m| reject(1003, m))?;
            if flag(req.get("predictConsume")) {
                return Ok(json!({"estimateUsed": est.used, "consumeDetail": est.detail}));
            }
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::Draw,
                Kind::Draw,
                est.used,
                est.images,
            )
        }
        Route::Inpaint => {
            let used = earlier_task_points(shared, req)? + INPAINT_EXTRA;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::Inpaint,
                Kind::Draw,
                used,
                1,
            )
        }
        Route::Training => {
            let images = training_images(req)?;
            let used = TRAINING_PER_IMAGE * images;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::Training,
                Kind::Training,
                used,
                1,
            )
        }
        Route::MjDraw => {
            required_text(req, "prompt")?;
            let used = mj_type()?;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::MjDraw,
                Kind::Midjourney,
                used,
                4,
            )
        }
        Route::MjDescribe => {
            required_text(req, "imageUrl")?;
            let used = MJ_DESCRIBE;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::MjDescribe,
                Kind::Describe,
                used,
                1,
            )
        }
        Route::MjUpscale => {
            earlier_task_points(shared, req)?;
            grid_position(req)?;
            let used = MJ_UPSCALE;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::MjUpscale,
                Kind::Midjourney,
                used,
                1,
            )
        }
        Route::MjZoomout => {
            earlier_task_points(shared, req)?;
            let used = mj_type()?;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::MjZoomout,
                Kind::Midjourney,
                used,
                4,
            )
        }
        Route::MjVariation => {
            earlier_task_points(shared, req)?;
            grid_position(req)?;
            let used = mj_type()?;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::MjVariation,
                Kind::Midjourney,
                used,
                4,
            )
        }
        Route::WorkflowDetail => {
            let (id, consume) = workflow(shared, req)?;
            Ok(json!({
                "workflowId": id,
                "name": format!("simulated workflow {id}"),
                "consume": consume,
                "versions": [{"versionId": "1", "name": "v1"}],
                "presets": [{"presetId": "1", "name": "default"}],
                "fields": [
                    {"fieldName": "prompt", "fieldType": "text", "required": true},
                    {"fieldName": "image", "fieldType": "image", "required": false}
                ]
            }))
        }
        Route::WorkflowRun => {
            let (_, used) = workflow(shared, req)?;
            let kind = Kind::Workflow;
            submit(shared, req, raw, fault, Submit::WorkflowRun, kind, used, 1)
        }
        Route::UtilityDetail => {
            let id = id_field(req, "utilityToolId")?;
            Ok(json!({
                "utilityToolId": id,
                "name": format!("simulated utility tool {id}"),
                "consume": UTILITY_RUN,
                "presets": [{"presetId": "1", "name": "default"}],
                "options": [
                    {"optionId": "1", "name": "remove background"},
                    {"optionId": "2", "name": "white background"}
                ]
            }))
        }
        Route::UtilityRun => {
            id_field(req, "utilityToolId")?;
            let kind = Kind::Workflow;
            submit(
                shared,
                req,
                raw,
                fault,
                Submit::UtilityRun,
                kind,
                UTILITY_RUN,
                1,
            )
        }
        Route::TaskDetail | Route::TrainDetail | Route::WorkflowTaskDetail => {
            detail(shared, req, fault, Style::Draw).await
        }
        Route::MjProgress => detail(shared, req, fault, Style::Midjourney).await,
    }
}

/// The common end of every submit: sensitive words, callback fields, then the task
/// (which checks the task limit and the balance).
#[allow(clippy::too_many_arguments)] // One call per endpoint; a struct would only rename them.
fn submit(
    shared: &Arc<Shared>,
    req: &Map<String, Value>,
    raw: &[u8],
    fault: Fault,
    submit: Submit,
    kind: Kind,
    used: u64,
    images: u32,
) -> Result<Value, Failure> {
    if fault == Fault::Sensitive || contains(raw, SENSITIVE_MARKER) {
        return Err(reject(1004, "the prompt contains sensitive words"));
    }
    let callback = callback(req)?;
    let fail_rate = shared.cfg.fail_rate;
    let will_fail =
        contains(raw, FAIL_MARKER) || (fail_rate > 0.0 && rand::random::<f64>() < fail_rate);
    let new = NewTask {
        submit,
        kind,
        used,
        images,
        will_fail,
        callback,
    };
    let (id, balance) = tasks::create(shared, new).map_err(|e| match e {
        Refused::TaskLimit { .. } => reject(1005, e.to_string()),
        Refused::Balance { .. } => reject(1002, e.to_string()),
    })?;
    Ok(json!({
        "paintingSign": id,
        "used": used,
        "balance": balance,
        "taskLimitCount": shared.cfg.task_limit
    }))
}

async fn detail(
    shared: &Arc<Shared>,
    req: &Map<String, Value>,
    fault: Fault,
    style: Style,
) -> Result<Value, Failure> {
    let id = id_field(req, "taskId")?;
    // `waitUtilEnd` is the upstream's spelling; the corrected one is accepted too.
    if flag(req.get("waitUtilEnd")) || flag(req.get("waitUntilEnd")) {
        if fault == Fault::CutLongPoll {
            return Err(Failure::Cut);
        }
        // Subscribe, then let go of the map before waiting.
        let rx = shared.tasks.get(&id).map(|t| t.subscribe());
        if let Some(mut rx) = rx {
            let mut stop = shared.stop.clone();
            tokio::select! {
                _ = tokio::time::timeout(LONG_POLL_MAX, async {
                    // Drop the borrow guard at once: it must not live across an await.
                    let _ = rx.wait_for(Option::is_some).await;
                }) => {}
                _ = stopped(&mut stop) => {}
            }
        }
    }
    let preview = !is_false(req.get("preview"));
    let task = shared
        .tasks
        .get(&id)
        .ok_or_else(|| reject(3, format!("task not found: {id}")))?;
    Ok(tasks::detail(shared, &id, &task, style, preview))
}

fn client_detail(shared: &Shared) -> Value {
    use std::sync::atomic::Ordering;
    json!({
        "companyName": "chuzhan-gate simulator",
        "balance": shared.balance.load(Ordering::SeqCst),
        "used": shared.charged.load(Ordering::SeqCst),
        "taskLimitCount": shared.cfg.task_limit
    })
}

/// The points of the task named by `taskId` (inpaint and Midjourney follow-ups).
fn earlier_task_points(shared: &Shared, req: &Map<String, Value>) -> Result<u64, Failure> {
    let id = id_field(req, "taskId")?;
    shared
        .tasks
        .get(&id)
        .map(|t| t.used)
        .ok_or_else(|| reject(1003, format!("taskId does not name a task: {id}")))
}

fn training_images(req: &Map<String, Value>) -> Result<u64, Failure> {
    let list = match (req.get("images"), req.get("imageUrls")) {
        (Some(Value::Array(a)), _) => a,
        (None | Some(Value::Null), Some(Value::Array(a))) => a,
        _ => return Err(reject(1003, "images must be an array of material images")),
    };
    let usable = list
        .iter()
        .filter(|v| matches!(v, Value::String(s) if !s.is_empty()) || v.is_object())
        .count();
    if usable == 0 || usable != list.len() {
        return Err(reject(
            1003,
            "images must be a non-empty array of material images",
        ));
    }
    Ok(usable as u64)
}

fn mj_price(req: &Map<String, Value>) -> Result<u64, Failure> {
    match req.get("type") {
        None | Some(Value::Null) => Ok(MJ_RELAX),
        Some(Value::String(t)) => match t.trim() {
            "" | "relax" => Ok(MJ_RELAX),
            "fast" => Ok(MJ_FAST),
            other => Err(reject(
                1003,
                format!("type must be fast or relax, got {other:?}"),
            )),
        },
        Some(_) => Err(reject(1003, "type must be fast or relax")),
    }
}

fn grid_position(req: &Map<String, Value>) -> Result<(), Failure> {
    match pricing::number(req, "position") {
        Ok(Some(p)) if (1.0..=4.0).contains(&p) && p.fract() == 0.0 => Ok(()),
        _ => Err(reject(1003, "position must be 1, 2, 3 or 4")),
    }
}

fn workflow(shared: &Shared, req: &Map<String, Value>) -> Result<(String, u64), Failure> {
    let id = id_field(req, "workflowId")?;
    shared
        .cfg
        .workflows
        .iter()
        .find(|(w, _)| *w == id)
        .map(|(w, c)| (w.clone(), *c))
        .ok_or_else(|| reject(1003, format!("unknown workflowId: {id}")))
}

fn required_text(req: &Map<String, Value>, field: &str) -> Result<(), Failure> {
    match req.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(()),
        _ => Err(reject(1003, format!("{field} is required"))),
    }
}

/// An id that may arrive as a string or a number.
fn id_field(req: &Map<String, Value>, field: &str) -> Result<String, Failure> {
    match req.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(reject(1003, format!("{field} is required"))),
    }
}

fn callback(req: &Map<String, Value>) -> Result<Option<Callback>, Failure> {
    let url = match req.get("callback") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) if s.starts_with("http://") || s.starts_with("https://") => s,
        Some(_) => return Err(reject(1003, "callback must be an http(s) URL")),
    };
    let nonce = match req.get("nonce") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if n.chars().count() <= 32 => Some(n.clone()),
        Some(_) => {
            return Err(reject(
                1003,
                "nonce must be a string of at most 32 characters",
            ))
        }
    };
    Ok(Some(Callback {
        url: url.clone(),
        nonce,
    }))
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let given = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if given("auth-token").is_some_and(|t| !t.is_empty() && t == token) {
        return true;
    }
    given("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !t.is_empty() && t.trim() == token)
}

fn is_false(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => !b,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => matches!(s.trim(), "false" | "False" | "FALSE" | "0"),
        _ => false,
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// The upstream's compact envelope. serde_json never escapes `/`.
/// A struct rather than `json!` so the fields keep the upstream's order.
fn envelope(code: i64, msg: &str, data: Value) -> Bytes {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        code: i64,
        success: bool,
        msg: &'a str,
        data: Value,
    }
    let body = Envelope {
        code,
        success: code == 0,
        msg,
        data,
    };
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

async fn pause(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn full(body: Bytes) -> Body {
    Full::new(body).map_err(|never| match never {}).boxed()
}

fn respond(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_TYPE));
    resp
}

/// `ResetMidAnswer`: the full `Content-Length`, half the body, then a body error,
/// on which hyper drops the connection. The pause lets hyper flush the half first.
fn broken(reply: Reply) -> Response<Body> {
    let len = reply.body.len();
    let half = reply.body.slice(..len / 2);
    let frames = futures_util::stream::unfold(0u8, move |step| {
        let half = half.clone();
        async move {
            match step {
                0 => Some((Ok(Frame::data(half)), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let err = std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "simulated reset mid-answer",
                    );
                    Some((Err(err), 2))
                }
                _ => None,
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    *resp.status_mut() = reply.status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_TYPE));
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// `/sim/stats`, `/sim/fault` and the result images.
async fn control(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let json_answer = |status: StatusCode, v: Value| {
        respond(
            status,
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
        )
    };
    match (method, path.as_str()) {
        (Method::GET, "/sim/stats") => {
            let stats = serde_json::to_value(shared.stats()).unwrap_or(Value::Null);
            json_answer(StatusCode::OK, stats)
        }
        (Method::GET, "/sim/fault") => json_answer(StatusCode::OK, fault_json(shared.fault())),
        (Method::POST, "/sim/fault") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let parsed = serde_json::from_slice::<Value>(&body).ok();
            let fault = parsed.as_ref().and_then(|v| {
                let name = v.get("fault")?.as_str()?;
                Fault::from_name(name, v.get("ms").and_then(Value::as_u64))
            });
            match fault {
                Some(f) => {
                    shared.set_fault(f);
                    json_answer(StatusCode::OK, fault_json(f))
                }
                None => json_answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "expected {\"fault\":\"none|slow|http500|reset_mid_answer|reset_before_answer|invalid_json|huge|cut_long_poll|sensitive\",\"ms\":N}"}),
                ),
            }
        }
        (Method::GET, p) if p.starts_with("/sim/img/") => {
            let mut resp = Response::new(full(Bytes::from_static(&PNG)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("image/png"));
            resp
        }
        _ => json_answer(StatusCode::NOT_FOUND, json!({"error": "no such sim route"})),
    }
}

fn fault_json(f: Fault) -> Value {
    match f {
        Fault::Slow(ms) => json!({"fault": f.name(), "ms": ms}),
        _ => json!({"fault": f.name()}),
    }
}
