//! `chuzhan-gate sim`: a local HTTP simulator of the 触站 upstream API.
//!
//! The gate's tests, benchmarks and demo run against it, and operators use it to try
//! their clients without spending real points. It speaks the upstream's wire format
//! (compact `{"code","success","msg","data"}` envelopes, HTTP 200 for business errors)
//! on every endpoint of `shared/upstream-api.md`, prices draws with its own plain f64
//! reading of the provider's points page (an independent second opinion beside the
//! gate's pricing engine), and runs tasks through `in_queue → running → success | fail`.
//!
//! Choices where the upstream is unknown or where a test needs a handle:
//! - Unknown `taskId` on a detail endpoint answers code `3` ("task not found: ..."); on a
//!   submit that refers to an earlier task (inpaint, mj upscale/zoomout/variation) it is
//!   a bad parameter, code `1003`.
//! - Training reads its material images from `images`, falling back to `imageUrls`.
//! - Midjourney progress is `"45%"` with `progressValue` `45` (a whole percent).
//! - Prompt markers anywhere in a request body: `[[sim:fail]]` makes the task end in
//!   `fail`; `[[sim:sensitive]]` answers code `1004`.
//! - Callbacks to `127.0.0.1` are allowed (the real upstream refuses private addresses).
//! - Routes under `/sim/` are the simulator's own (stats, faults, images): they need no
//!   token, are not counted or recorded, and ignore faults and latency.
//!
//! Concurrency: every counter is an atomic; tasks live in a `DashMap`; the two
//! `std::sync::Mutex`es (current fault, request log) guard a few words of work and are
//! never held across an `.await`, so the zero-latency benchmark mode does not contend.

mod pricing;
mod routes;
mod tasks;

pub use routes::{FAIL_MARKER, SENSITIVE_MARKER};

use bytes::Bytes;
use dashmap::DashMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How many requests [`SimHandle::requests`] keeps (the most recent ones).
pub const REQUEST_LOG_CAPACITY: usize = 1000;

/// The request log also stops at this many body bytes, dropping the oldest first, so
/// a run of multi-MB image uploads does not hold gigabytes.
pub const REQUEST_LOG_MAX_BYTES: usize = 64 * 1024 * 1024;

/// How long [`SimHandle::shutdown`] lets open connections finish before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How the simulator behaves. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The upstream token it accepts, as `Auth-Token: <t>` or `Authorization: Bearer <t>`.
    pub token: String,
    /// The account's points; accepted submits deduct from it, failed tasks give back.
    pub balance: u64,
    /// Milliseconds added before every answer.
    pub latency_ms: u64,
    /// How long a task takes from submit to `success`/`fail`; 0 ends it at once.
    pub task_ms: u64,
    /// Fraction (0..=1) of tasks that end in `fail`.
    pub fail_rate: f64,
    /// Callback retry delays are base, 2×base, 3×base, ... milliseconds.
    pub callback_retry_base_ms: u64,
    /// `taskLimitCount`: more unfinished tasks than this answers code 1005.
    pub task_limit: u32,
    /// Known workflows: `workflowId` → points per run (`consume`).
    pub workflows: Vec<(String, u64)>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            token: "sim-token".to_owned(),
            balance: 1_000_000_000,
            latency_ms: 0,
            task_ms: 600,
            fail_rate: 0.0,
            callback_retry_base_ms: 5000,
            task_limit: 1000,
            workflows: vec![("1001".to_owned(), 30)],
        }
    }
}

/// A misbehaviour of the upstream, applied to requests that arrive after it is set.
///
/// Which faults still *process* the request (create and charge the task) matters to a
/// gate deciding between void and charge: `Slow`, `ResetMidAnswer`, `InvalidJson` and
/// `Huge` process it and spoil only the answer (the upstream did the work);
/// `Http500` and `ResetBeforeAnswer` do not process it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Normal behaviour.
    None,
    /// Every answer is delayed by this many extra milliseconds.
    Slow(u64),
    /// HTTP 500 with an error envelope (code 1); nothing is processed.
    Http500,
    /// Status line, headers (with the full `Content-Length`) and half of the body, then
    /// the TCP connection is dropped.
    ResetMidAnswer,
    /// The request is read completely, then the connection is closed without an answer;
    /// nothing is processed.
    ResetBeforeAnswer,
    /// HTTP 200 with the first half of the real answer: not parseable JSON.
    InvalidJson,
    /// HTTP 200 with a valid 50 MB JSON envelope instead of the real answer.
    Huge,
    /// Detail requests with `waitUtilEnd: true` get their connection dropped after
    /// 200 ms; other requests are unaffected.
    CutLongPoll,
    /// Submits answer code 1004 (sensitive words); other requests are unaffected.
    Sensitive,
}

impl Fault {
    /// The name used by `POST /sim/fault` (`{"fault":"reset_mid_answer"}`).
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Slow(_) => "slow",
            Fault::Http500 => "http500",
            Fault::ResetMidAnswer => "reset_mid_answer",
            Fault::ResetBeforeAnswer => "reset_before_answer",
            Fault::InvalidJson => "invalid_json",
            Fault::Huge => "huge",
            Fault::CutLongPoll => "cut_long_poll",
            Fault::Sensitive => "sensitive",
        }
    }

    /// Parses a fault name, ignoring case, `_` and `-` (`"ResetMidAnswer"` works too).
    /// `slow_ms` is the delay for `slow` (default 1000 ms).
    pub fn from_name(name: &str, slow_ms: Option<u64>) -> Option<Fault> {
        let norm: String = name
            .chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect();
        Some(match norm.as_str() {
            "none" => Fault::None,
            "slow" => Fault::Slow(slow_ms.unwrap_or(1000)),
            "http500" => Fault::Http500,
            "resetmidanswer" => Fault::ResetMidAnswer,
            "resetbeforeanswer" => Fault::ResetBeforeAnswer,
            "invalidjson" => Fault::InvalidJson,
            "huge" => Fault::Huge,
            "cutlongpoll" => Fault::CutLongPoll,
            "sensitive" => Fault::Sensitive,
            _ => return None,
        })
    }
}

/// What the simulator has seen and done, also served as JSON by `GET /sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Requests received on upstream routes (everything but `/sim/...`).
    pub requests: u64,
    /// Accepted submits by endpoint path (e.g. `"/aiapi/v1/draw"`).
    pub submits: BTreeMap<String, u64>,
    /// Points charged: `used` of accepted tasks minus those that failed.
    pub points_charged: u64,
    /// The account's points left.
    pub balance: u64,
    /// Tasks by state, now.
    pub tasks: TaskCounts,
    /// Answers with a business error, by code (`"1001"`, `"1002"`, ...).
    pub rejections: BTreeMap<String, u64>,
    /// Callback POSTs made (each try counts).
    pub callbacks_attempted: u64,
    /// Callbacks answered with HTTP 200.
    pub callbacks_delivered: u64,
    /// Callbacks given up after the last try.
    pub callbacks_abandoned: u64,
}

/// Tasks by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Waiting to start.
    pub in_queue: u64,
    /// Started, not finished.
    pub running: u64,
    /// Ended in `success`.
    pub success: u64,
    /// Ended in `fail` (and refunded).
    pub fail: u64,
}

/// One request as the simulator received it, for byte-for-byte forwarding checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The URI path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Headers by lower-case name; repeated headers are joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The raw body bytes.
    pub body: Bytes,
}

impl SimRequest {
    /// A header's value by name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// The endpoints that create (and charge) a task, in a fixed order for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submit {
    Draw,
    Inpaint,
    Training,
    MjDraw,
    MjDescribe,
    MjUpscale,
    MjZoomout,
    MjVariation,
    WorkflowRun,
    UtilityRun,
}

impl Submit {
    const ALL: [Submit; 10] = [
        Submit::Draw,
        Submit::Inpaint,
        Submit::Training,
        Submit::MjDraw,
        Submit::MjDescribe,
        Submit::MjUpscale,
        Submit::MjZoomout,
        Submit::MjVariation,
        Submit::WorkflowRun,
        Submit::UtilityRun,
    ];

    fn path(self) -> &'static str {
        match self {
            Submit::Draw => "/aiapi/v1/draw",
            Submit::Inpaint => "/aiapi/v1/inpaint",
            Submit::Training => "/aiapi/v1/training",
            Submit::MjDraw => "/aiapi/v1/mj/draw",
            Submit::MjDescribe => "/aiapi/v1/mj/describe",
            Submit::MjUpscale => "/aiapi/v1/mj/upscale",
            Submit::MjZoomout => "/aiapi/v1/mj/zoomout",
            Submit::MjVariation => "/aiapi/v1/mj/variation",
            Submit::WorkflowRun => "/aiapi/workflow/run",
            Submit::UtilityRun => "/aiapi/utilityTool/run",
        }
    }
}

/// The most recent requests and the size of their bodies.
#[derive(Default)]
struct RequestLog {
    entries: VecDeque<SimRequest>,
    bytes: usize,
}

/// State shared by every connection; one per simulator.
struct Shared {
    cfg: SimConfig,
    /// `http://127.0.0.1:PORT`, for image URLs.
    base_url: String,
    balance: AtomicU64,
    charged: AtomicU64,
    /// Unfinished tasks, checked against `task_limit`.
    in_flight: AtomicU32,
    fault: Mutex<Fault>,
    requests_total: AtomicU64,
    log: Mutex<RequestLog>,
    submits: [AtomicU64; Submit::ALL.len()],
    rejections: DashMap<i64, u64>,
    tasks: DashMap<String, tasks::Task>,
    task_seq: AtomicU64,
    /// Makes task ids of different simulator runs differ.
    salt: u32,
    callbacks_attempted: AtomicU64,
    callbacks_delivered: AtomicU64,
    callbacks_abandoned: AtomicU64,
    /// Tasks ended, counted apart from the map because finished tasks are forgotten.
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// For callbacks. Built once: connection pooling, and no per-callback TLS setup.
    http: reqwest::Client,
    /// Turns true on shutdown; task timers and callbacks stop on it.
    stop: watch::Receiver<bool>,
    huge: OnceLock<Bytes>,
}

impl Shared {
    fn fault(&self) -> Fault {
        // A poisoned lock only means a panic elsewhere; the Fault inside is still valid.
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    fn record(&self, req: SimRequest) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        while log.entries.len() >= REQUEST_LOG_CAPACITY
            || (!log.entries.is_empty() && log.bytes + req.body.len() > REQUEST_LOG_MAX_BYTES)
        {
            if let Some(old) = log.entries.pop_front() {
                log.bytes -= old.body.len();
            }
        }
        log.bytes += req.body.len();
        log.entries.push_back(req);
    }

    fn stats(&self) -> SimStats {
        // Ended counts first: a task ending during the scan is then never counted twice.
        let mut counts = TaskCounts {
            success: self.succeeded.load(Ordering::SeqCst),
            fail: self.failed.load(Ordering::SeqCst),
            ..TaskCounts::default()
        };
        for t in self.tasks.iter() {
            match t.phase(self.cfg.task_ms) {
                tasks::Phase::InQueue => counts.in_queue += 1,
                tasks::Phase::Running(_) => counts.running += 1,
                tasks::Phase::Done(_) => {}
            }
        }
        SimStats {
            requests: self.requests_total.load(Ordering::Relaxed),
            submits: Submit::ALL
                .iter()
                .zip(self.submits.iter())
                .map(|(s, n)| (s.path().to_owned(), n.load(Ordering::Relaxed)))
                .collect(),
            points_charged: self.charged.load(Ordering::SeqCst),
            balance: self.balance.load(Ordering::SeqCst),
            tasks: counts,
            rejections: self
                .rejections
                .iter()
                .map(|e| (e.key().to_string(), *e.value()))
                .collect(),
            callbacks_attempted: self.callbacks_attempted.load(Ordering::Relaxed),
            callbacks_delivered: self.callbacks_delivered.load(Ordering::Relaxed),
            callbacks_abandoned: self.callbacks_abandoned.load(Ordering::Relaxed),
        }
    }

    /// The 50 MB answer of [`Fault::Huge`], built on first use and shared after.
    fn huge_body(&self) -> Bytes {
        self.huge
            .get_or_init(|| {
                const PAD: usize = 50 * 1024 * 1024;
                let head = br#"{"code":0,"success":true,"msg":"success","data":{"pad":""#;
                let tail = br#""}}"#;
                let mut v = Vec::with_capacity(head.len() + PAD + tail.len());
                v.extend_from_slice(head);
                v.resize(head.len() + PAD, b'a');
                v.extend_from_slice(tail);
                Bytes::from(v)
            })
            .clone()
    }
}

/// A running simulator. Dropping it stops accepting connections; [`SimHandle::shutdown`]
/// also waits for open connections (bounded).
pub struct SimHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl SimHandle {
    /// The base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Counters and task states, now.
    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// The last [`REQUEST_LOG_CAPACITY`] requests received on upstream routes, oldest
    /// first (fewer when their bodies pass [`REQUEST_LOG_MAX_BYTES`]).
    pub fn requests(&self) -> Vec<SimRequest> {
        let log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        log.entries.iter().cloned().collect()
    }

    /// Forgets the recorded requests (counters stay).
    pub fn clear_requests(&self) {
        *self.shared.log.lock().unwrap_or_else(|p| p.into_inner()) = RequestLog::default();
    }

    /// Sets the fault for subsequent requests.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.set_fault(fault);
    }

    /// The account's points left.
    pub fn balance(&self) -> u64 {
        self.shared.balance.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets open connections finish for up to 2 s, then cuts them;
    /// pending task timers and callback retries stop.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts a simulator on `listener` and returns at once; it serves until shut down.
pub async fn spawn(cfg: SimConfig, listener: TcpListener) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(std::io::Error::other)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        base_url: format!("http://{addr}"),
        balance: AtomicU64::new(cfg.balance),
        charged: AtomicU64::new(0),
        in_flight: AtomicU32::new(0),
        fault: Mutex::new(Fault::None),
        requests_total: AtomicU64::new(0),
        log: Mutex::new(RequestLog::default()),
        submits: Default::default(),
        rejections: DashMap::new(),
        tasks: DashMap::new(),
        task_seq: AtomicU64::new(0),
        salt: rand::random(),
        callbacks_attempted: AtomicU64::new(0),
        callbacks_delivered: AtomicU64::new(0),
        callbacks_abandoned: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        http,
        stop: stop_rx.clone(),
        huge: OnceLock::new(),
        cfg,
    });
    tokio::spawn(tasks::reap(shared.clone()));
    let server = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
    Ok(SimHandle {
        addr,
        shared,
        stop: stop_tx,
        server: Some(server),
    })
}

/// Accepts connections until `stop` turns true, then drains them (bounded).
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Small answers must not wait for Nagle: the benchmark measures latency.
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_connection(stream, shared.clone(), stop.clone()));
                while conns.try_join_next().is_some() {}
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| routes::handle(shared.clone(), req));
    // Idle keep-alive connections are never closed by the simulator: a close racing a
    // pooled client's next POST would make tests flaky. (A real server does close them,
    // typically after 60-75 s; the gate's pool idle timeout should stay below that.)
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Resolves once `stop` is true. The borrow guard of `wait_for` is dropped inside,
/// so futures awaiting this stay `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Flags of `chuzhan-gate sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8181")]
    pub listen: SocketAddr,
    /// The upstream token the simulator accepts.
    #[arg(long, default_value = "sim-token")]
    pub token: String,
    /// Milliseconds added to every answer.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Milliseconds a task takes to finish (0: at once).
    #[arg(long, default_value_t = 600)]
    pub task_ms: u64,
    /// Fraction (0..=1) of tasks that end in `fail`.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// The account's starting points.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub balance: u64,
    /// Concurrent unfinished tasks allowed (taskLimitCount).
    #[arg(long, default_value_t = 1000)]
    pub task_limit: u32,
    /// First callback retry delay in ms (then 2×, 3×, ...).
    #[arg(long, default_value_t = 5000)]
    pub callback_retry_base_ms: u64,
    /// A workflow as `ID=CONSUME`; repeatable. Without any, workflow `1001` costs 30.
    #[arg(long = "workflow", value_parser = parse_workflow)]
    pub workflows: Vec<(String, u64)>,
}

fn parse_workflow(s: &str) -> Result<(String, u64), String> {
    let (id, consume) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ID=CONSUME, got {s:?}"))?;
    let consume = consume
        .trim()
        .parse()
        .map_err(|_| format!("consume must be a whole number, got {consume:?}"))?;
    Ok((id.trim().to_owned(), consume))
}

impl SimArgs {
    /// The simulator configuration these flags describe.
    pub fn to_config(&self) -> Result<SimConfig, String> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(format!(
                "--fail-rate must be between 0 and 1, got {}",
                self.fail_rate
            ));
        }
        let mut cfg = SimConfig {
            token: self.token.clone(),
            balance: self.balance,
            latency_ms: self.latency_ms,
            task_ms: self.task_ms,
            fail_rate: self.fail_rate,
            callback_retry_base_ms: self.callback_retry_base_ms,
            task_limit: self.task_limit,
            ..SimConfig::default()
        };
        if !self.workflows.is_empty() {
            cfg.workflows = self.workflows.clone();
        }
        Ok(cfg)
    }
}

/// Runs `chuzhan-gate sim` until ctrl-c or SIGTERM; returns the process exit code
/// (0 after a clean stop, 2 for bad flags, 1 when it cannot listen).
pub async fn run_cli(args: SimArgs) -> i32 {
    let cfg = match args.to_config() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("chuzhan-gate sim: {e}");
            return 2;
        }
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chuzhan-gate sim: cannot listen on {}: {e}", args.listen);
            return 1;
        }
    };
    let handle = match spawn(cfg, listener).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("chuzhan-gate sim: cannot start: {e}");
            return 1;
        }
    };
    println!("chuzhan-gate sim listening on {}", handle.url());
    wait_for_stop_signal().await;
    handle.shutdown().await;
    0
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
