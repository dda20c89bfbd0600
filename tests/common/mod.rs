//! Shared fixtures for the integration tests: a simulator on a random port and a
//! gate in front of it, both in-process, with a real SQLite ledger in a temp dir.
#![allow(dead_code)]

use chuzhan_gate::config::{Config, Secret};
use chuzhan_gate::ledger::BackendKind;
use chuzhan_gate::server::{self, Running};
use chuzhan_gate::upstream::sim::{self, SimConfig, SimHandle};
use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub struct Env {
    pub sim: SimHandle,
    pub gate: Option<Running>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

pub async fn start_sim(cfg: SimConfig) -> SimHandle {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::spawn(cfg, l).await.unwrap()
}

pub fn gate_config(dir: &std::path::Path, upstream: &str, token: &str) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        admin_token: Secret::new(ADMIN_TOKEN),
        ..Config::default()
    };
    cfg.ledger.path = Some(dir.join("ledger.db"));
    cfg.audit.dir = Some(dir.join("audit"));
    cfg.upstream.url = upstream.to_owned();
    cfg.upstream.token = Secret::new(token);
    cfg.upstream.timeout_secs = 10;
    cfg
}

impl Env {
    pub async fn new() -> Env {
        Self::with(SimConfig::default(), |_| {}).await
    }

    pub async fn with(sim_cfg: SimConfig, tweak: impl FnOnce(&mut Config)) -> Env {
        let token = sim_cfg.token.clone();
        let sim = start_sim(sim_cfg).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = gate_config(dir.path(), &sim.url(), &token);
        tweak(&mut cfg);
        let gate = server::start(cfg).await.unwrap();
        Env {
            sim,
            gate: Some(gate),
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn gate(&self) -> &Running {
        self.gate.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gate().addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.gate().admin_addr, path)
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Create a key and return (id, secret).
    pub async fn key(&self, body: Value) -> (String, String) {
        let (s, v) = self
            .admin(reqwest::Method::POST, "/admin/keys", Some(body))
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn post(
        &self,
        path: &str,
        secret: &str,
        body: &str,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = self
            .http
            .post(self.url(path))
            .header("Auth-Token", secret)
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    pub async fn account(&self, id: &str) -> Value {
        let (s, v) = self
            .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }
}

pub const SEED_768: &str = r#"{"prompt":"one boy","modelStyleId":1,"width":768,"height":1024}"#;

/// POSTs `body` to `url` with the key in `Auth-Token` and returns the JSON
/// answer: for spawned tasks and fresh clients, which cannot borrow a fixture.
pub async fn post_as(http: &reqwest::Client, url: &str, secret: &str, body: &str) -> Value {
    http.post(url)
        .header("Auth-Token", secret)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The text of a gate's `/metrics` (on its admin listener).
pub async fn metrics_of(http: &reqwest::Client, gate: &Running) -> String {
    http.get(format!("http://{}/metrics", gate.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn draw_body(prompt: &str) -> String {
    json!({"prompt": prompt, "modelStyleId": 1, "width": 768, "height": 1024}).to_string()
}

/// `GATE_TEST_POSTGRES_URL`, or `None` with a loud line saying that `what` was
/// NOT run. When it is set, the tests that use it fail if the server is
/// unreachable.
pub fn postgres_url(what: &str) -> Option<String> {
    match std::env::var("GATE_TEST_POSTGRES_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("GATE_TEST_POSTGRES_URL is not set: {what} were NOT run");
            None
        }
    }
}

/// A gate replica on the PostgreSQL ledger at `url`, in `schema`.
pub async fn pg_replica(
    sim: &SimHandle,
    url: &str,
    schema: &str,
    dir: &std::path::Path,
    instance: &str,
    tweak: &dyn Fn(&mut Config),
) -> Result<Running, server::StartError> {
    let mut cfg = gate_config(dir, &sim.url(), "sim-token");
    tweak(&mut cfg);
    cfg.ledger.backend = BackendKind::Postgres;
    cfg.ledger.url = Some(url.to_owned());
    cfg.ledger.schema = Some(schema.to_owned());
    cfg.ledger.instance = Some(instance.to_owned());
    server::start(cfg).await
}

/// Drops a test's PostgreSQL schema from anywhere, a `Drop` included: on a
/// thread of its own with a runtime of its own, as `Drop` cannot wait on the
/// test's. Panics if the schema could not be dropped, unless the thread is
/// already panicking (a failed test must show its own failure).
pub fn drop_schema_now(url: &str, schema: &str) {
    let (url, name) = (url.to_owned(), schema.to_owned());
    let dropped = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to drop the test schema")
            .block_on(drop_schema(&url, &name));
    })
    .join();
    if dropped.is_err() && !std::thread::panicking() {
        panic!("the test schema {schema} could not be dropped");
    }
}

/// Drops a test's PostgreSQL schema.
pub async fn drop_schema(url: &str, schema: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to GATE_TEST_POSTGRES_URL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop the test schema");
}

/// Creates a key through the admin API at `admin`: its id and secret.
pub async fn create_key(
    http: &reqwest::Client,
    admin: std::net::SocketAddr,
    token: &str,
    body: Value,
) -> (String, String) {
    let (status, v, _) = admin_call(
        http,
        admin,
        token,
        reqwest::Method::POST,
        "/admin/keys",
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

/// An admin API call with the bearer `token`: status, JSON body (or the text as a
/// string), and the headers and text for messages.
pub async fn admin_call(
    http: &reqwest::Client,
    admin: std::net::SocketAddr,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, String) {
    let mut req = http
        .request(method, format!("http://{admin}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let head = format!("{:?}", resp.headers());
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    (status, v, format!("{head}\n{text}"))
}

/// A free loopback address (bound, then released) for a child process to listen on.
pub fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Waits until a child gate's admin listener answers `/healthz` with 200;
/// `Err` with its exit status if it exited first. Panics after `limit`.
pub async fn until_healthy(
    child: &mut std::process::Child,
    admin: std::net::SocketAddr,
    limit: std::time::Duration,
) -> Result<(), std::process::ExitStatus> {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Err(st);
        }
        let url = format!("http://{admin}/healthz");
        if http.get(url).send().await.is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gate never became healthy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Waits for a child to exit; panics after `limit`.
pub async fn exit_of(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The first CPU this process may run on (`Cpus_allowed_list`), for `taskset`.
pub fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status");
    list.trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}

/// The pid of `parent`'s one child (a gate run under `strace`).
pub fn only_child(parent: u32) -> u32 {
    let path = format!("/proc/{parent}/task/{parent}/children");
    let text = std::fs::read_to_string(&path).unwrap();
    let kids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 1, "{path}: {text}");
    kids[0]
}
