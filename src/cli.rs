//! The command line: `serve`, `sim`, `demo`, `price`, `ledger verify`, `keys ...`,
//! `audit ...`. Every subcommand that touches the gate's data reads the same config
//! file and environment as `serve`.

use crate::config::{Config, LogFormat};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;

/// chuzhan-gate: a billing gate for the 触站 AI image API.
#[derive(Debug, Parser)]
#[command(name = "chuzhan-gate", version, about)]
pub struct Cli {
    /// Config file (default: $GATE_CONFIG, else built-in defaults).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the gate.
    Serve,
    /// Run the local 触站 API simulator.
    Sim(crate::upstream::sim::SimArgs),
    /// Start a simulator and a gate, create a demo key, print a curl line.
    Demo(DemoArgs),
    /// Price one request body (stdin or FILE) and print the points.
    Price {
        /// Endpoint path.
        #[arg(long)]
        endpoint: Option<String>,
        /// Body file, or - for stdin.
        file: Option<PathBuf>,
    },
    /// Ledger maintenance.
    Ledger {
        /// What to do.
        #[command(subcommand)]
        cmd: LedgerCmd,
    },
    /// Manage client keys through the admin API.
    Keys(AdminArgs<KeysCmd>),
    /// Read and check the audit log.
    Audit(AdminArgs<AuditCmd>),
}

/// `demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Gate listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Simulator listen address.
    #[arg(long, default_value = "127.0.0.1:8181")]
    pub sim_listen: String,
}

/// `ledger` subcommands.
#[derive(Debug, Subcommand)]
pub enum LedgerCmd {
    /// Recompute every account from its transfers; non-zero exit on any mismatch.
    Verify,
}

/// Options shared by the commands that talk to the admin API.
#[derive(Debug, Args)]
pub struct AdminArgs<C: Subcommand> {
    /// Admin API base URL (default: http://<admin_listen from config>).
    #[arg(long, global = true, env = "GATE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub cmd: C,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; prints its secret once.
    Create {
        /// Name (shown to the client as companyName).
        #[arg(long)]
        name: String,
        /// Budget in points.
        #[arg(long)]
        budget: u64,
        /// none, day, week or month.
        #[arg(long)]
        period: Option<String>,
        /// Points the client pays per upstream point (e.g. 1.2).
        #[arg(long)]
        rate: Option<String>,
        /// Tasks in flight at most.
        #[arg(long)]
        concurrency: Option<u32>,
        /// Submits per second.
        #[arg(long)]
        rps: Option<u32>,
        /// Note.
        #[arg(long)]
        note: Option<String>,
    },
    /// List keys.
    List,
    /// Show one key with its account.
    Show {
        /// Key id.
        id: String,
    },
    /// Change a key.
    Set {
        /// Key id.
        id: String,
        /// New budget.
        #[arg(long)]
        budget: Option<u64>,
        /// New period.
        #[arg(long)]
        period: Option<String>,
        /// New rate.
        #[arg(long)]
        rate: Option<String>,
        /// New concurrency limit.
        #[arg(long)]
        concurrency: Option<u32>,
        /// New submit rate limit.
        #[arg(long)]
        rps: Option<u32>,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// Enable the key again.
        #[arg(long)]
        enable: bool,
        /// Note (recorded with the change).
        #[arg(long)]
        note: Option<String>,
    },
    /// Add points to a key's budget.
    TopUp {
        /// Key id.
        id: String,
        /// Points to add.
        points: u64,
        /// Why.
        #[arg(long)]
        note: Option<String>,
    },
    /// Disable a key (history stays).
    Disable {
        /// Key id.
        id: String,
    },
    /// Give a key a new secret; the old one stops working.
    Rotate {
        /// Key id.
        id: String,
    },
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print the newest records; with -f keep printing new ones.
    Tail {
        /// Follow.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many records to start with.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// Query records.
    Query {
        /// Key id.
        #[arg(long)]
        key: Option<String>,
        /// Since (1h, 30m, 2d or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Until.
        #[arg(long)]
        until: Option<String>,
        /// Decision (admitted, budget, auth, ...).
        #[arg(long)]
        decision: Option<String>,
        /// At most this many (newest).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Check the hash chain; no PATH: the log the config points to.
    Verify {
        /// Audit directory or file.
        path: Option<PathBuf>,
        /// For a directory whose older files were archived: the `seq:hash` of a
        /// record an earlier verify printed ("last good record"). The files left
        /// are checked from their first record, and must hold that record.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<crate::audit::Anchor>,
    },
}

/// Run the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let fmt = match cli.log_format.as_deref() {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Text,
        None => cfg.log_format,
    };
    init_logs(fmt);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 2;
        }
    };
    rt.block_on(run(cli.cmd, cfg))
}

fn init_logs(fmt: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("GATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match fmt {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

async fn run(cmd: Cmd, cfg: Config) -> i32 {
    match cmd {
        Cmd::Serve => serve(cfg).await,
        Cmd::Sim(args) => crate::upstream::sim::run_cli(args).await,
        Cmd::Demo(args) => demo(cfg, args).await,
        Cmd::Price { endpoint, file } => {
            crate::pricing::cli::run(&cfg.pricing, endpoint.as_deref(), file.as_deref())
        }
        Cmd::Ledger {
            cmd: LedgerCmd::Verify,
        } => crate::ledger::verify_cmd(&cfg.ledger).await,
        Cmd::Keys(a) => {
            let client = AdminClient::new(&cfg, a.admin_url);
            keys_cmd(&client, a.cmd, a.json).await
        }
        Cmd::Audit(a) => match a.cmd {
            AuditCmd::Verify { path, anchor } => {
                crate::audit::verify_cmd(&path.unwrap_or_else(|| cfg.audit_dir()), anchor.as_ref())
            }
            cmd => {
                let client = AdminClient::new(&cfg, a.admin_url);
                audit_cmd(&client, cmd).await
            }
        },
    }
}

async fn serve(cfg: Config) -> i32 {
    if cfg.upstream.token.is_empty() {
        tracing::warn!("GATE_UPSTREAM_TOKEN is not set: the upstream will refuse every request");
    }
    if let Some(w) = crate::memory::overcommit_warning() {
        tracing::warn!("{w}");
    }
    let running = match crate::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    crate::server::shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    0
}

async fn demo(mut cfg: Config, args: DemoArgs) -> i32 {
    let sim_listener = match tokio::net::TcpListener::bind(&args.sim_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.sim_listen);
            return 2;
        }
    };
    let sim_cfg = crate::upstream::sim::SimConfig::default();
    let token = sim_cfg.token.clone();
    let sim = match crate::upstream::sim::spawn(sim_cfg, sim_listener).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: simulator: {e}");
            return 2;
        }
    };
    cfg.upstream.url = sim.url();
    cfg.upstream.token = crate::config::Secret::new(token);
    match args.listen.parse() {
        Ok(a) => cfg.listen = a,
        Err(_) => {
            eprintln!("error: --listen {} is not HOST:PORT", args.listen);
            return 2;
        }
    }
    if std::env::var_os("GATE_DATA_DIR").is_none() && cli_default_data_dir(&cfg) {
        cfg.data_dir =
            std::env::temp_dir().join(format!("chuzhan-gate-demo-{}", std::process::id()));
        cfg.ledger.path = Some(cfg.data_dir.join("ledger.db"));
        cfg.audit.dir = Some(cfg.data_dir.join("audit"));
    }
    let running = match crate::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let client = AdminClient {
        base: format!("http://{}", running.admin_addr),
        token: running.gate.cfg.admin_token.expose().to_owned(),
        http: reqwest::Client::new(),
    };
    let key = match client
        .call(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"name": "demo", "budget": 1000, "note": "created by chuzhan-gate demo"})),
        )
        .await
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: creating the demo key: {e}");
            return 2;
        }
    };
    let secret = key["key"].as_str().unwrap_or_default();
    println!("simulator : {}", sim.url());
    println!("gate      : http://{}", running.addr);
    println!("admin     : http://{}", running.admin_addr);
    println!(
        "demo key  : {secret}  (id {}, budget 1000 points)",
        key["id"].as_str().unwrap_or_default()
    );
    println!();
    println!("Draw through the gate (costs 12 points):");
    println!(
        "  curl -s http://{}/aiapi/v1/draw -H 'Auth-Token: {secret}' -H 'Content-Type: application/json' -d '{{\"prompt\":\"one boy\",\"modelStyleId\":1,\"width\":768,\"height\":1024}}'",
        running.addr
    );
    println!("See the balance:");
    println!(
        "  curl -s http://{}/aiapi/v1/client/detail -H 'Auth-Token: {secret}'",
        running.addr
    );
    println!();
    println!("Press ctrl-c to stop.");
    crate::server::shutdown_signal().await;
    running.shutdown().await;
    sim.shutdown().await;
    0
}

fn cli_default_data_dir(cfg: &Config) -> bool {
    cfg.data_dir == std::path::Path::new("data")
}

/// A small client of the admin API for the `keys` and `audit` commands.
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    fn new(cfg: &Config, url: Option<String>) -> AdminClient {
        AdminClient {
            base: url
                .unwrap_or_else(|| format!("http://{}", cfg.admin_listen))
                .trim_end_matches('/')
                .to_owned(),
            token: cfg.admin_token.expose().to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<String, String> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach the admin API at {}: {e}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(format!("{status}: {msg}"));
        }
        Ok(text)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let text = self.raw(method, path, body).await?;
        serde_json::from_str(&text).map_err(|e| format!("bad answer from the admin API: {e}"))
    }
}

/// Every key in order of creation, as `GET /admin/keys` without parameters
/// answers, but fetched a page at a time so that the gate never builds the
/// whole list in its memory (tens of MB with 100,000 keys).
async fn list_keys(c: &AdminClient) -> Result<Value, String> {
    let mut keys = Vec::new();
    let mut path = "/admin/keys?limit=1000".to_owned();
    loop {
        let page = c.call(reqwest::Method::GET, &path, None).await?;
        if page.is_array() {
            // A gate from before paging answers every key at once.
            return Ok(page);
        }
        if let Some(Value::Array(more)) = page.get("keys") {
            keys.extend(more.iter().cloned());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/keys?limit=1000&after={next}"),
            None => break,
        }
    }
    let created = |k: &Value| {
        k["created_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    keys.sort_by(|a, b| {
        created(a)
            .cmp(&created(b))
            .then_with(|| a["id"].as_str().cmp(&b["id"].as_str()))
    });
    Ok(Value::Array(keys))
}

async fn keys_cmd(c: &AdminClient, cmd: KeysCmd, as_json: bool) -> i32 {
    use reqwest::Method;
    let r = match cmd {
        KeysCmd::Create {
            name,
            budget,
            period,
            rate,
            concurrency,
            rps,
            note,
        } => {
            let mut b = json!({"name": name, "budget": budget});
            set_opt(&mut b, "period", period.map(Value::from));
            set_opt(&mut b, "rate", rate.map(Value::from));
            set_opt(&mut b, "concurrency", concurrency.map(Value::from));
            set_opt(&mut b, "rps", rps.map(Value::from));
            set_opt(&mut b, "note", note.map(Value::from));
            c.call(Method::POST, "/admin/keys", Some(b)).await
        }
        KeysCmd::List => list_keys(c).await,
        KeysCmd::Show { id } => {
            c.call(Method::GET, &format!("/admin/keys/{id}"), None)
                .await
        }
        KeysCmd::Set {
            id,
            budget,
            period,
            rate,
            concurrency,
            rps,
            name,
            enable,
            note,
        } => {
            let mut b = json!({});
            set_opt(&mut b, "budget", budget.map(Value::from));
            set_opt(&mut b, "period", period.map(Value::from));
            set_opt(&mut b, "rate", rate.map(Value::from));
            set_opt(&mut b, "concurrency", concurrency.map(Value::from));
            set_opt(&mut b, "rps", rps.map(Value::from));
            set_opt(&mut b, "name", name.map(Value::from));
            set_opt(&mut b, "note", note.map(Value::from));
            if enable {
                set_opt(&mut b, "disabled", Some(Value::from(false)));
            }
            c.call(Method::PATCH, &format!("/admin/keys/{id}"), Some(b))
                .await
        }
        KeysCmd::TopUp { id, points, note } => {
            let mut b = json!({"points": points});
            set_opt(&mut b, "note", note.map(Value::from));
            c.call(Method::POST, &format!("/admin/keys/{id}/top-up"), Some(b))
                .await
        }
        KeysCmd::Disable { id } => {
            c.call(Method::DELETE, &format!("/admin/keys/{id}"), None)
                .await
        }
        KeysCmd::Rotate { id } => {
            c.call(Method::POST, &format!("/admin/keys/{id}/rotate"), None)
                .await
        }
    };
    match r {
        Ok(v) if as_json => {
            println!("{v}");
            0
        }
        Ok(v) => {
            print_keys(&v);
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn set_opt(b: &mut Value, k: &str, v: Option<Value>) {
    if let (Some(v), Some(o)) = (v, b.as_object_mut()) {
        o.insert(k.into(), v);
    }
}

fn print_keys(v: &Value) {
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    println!(
        "{:<22} {:<16} {:>10} {:>10} {:>10} {:>10} {:<6} {:>5} {:<8}",
        "ID", "NAME", "BUDGET", "SPENT", "RESERVED", "REMAINING", "PERIOD", "RATE", "STATE"
    );
    for r in &rows {
        println!(
            "{:<22} {:<16} {:>10} {:>10} {:>10} {:>10} {:<6} {:>5} {:<8}",
            r["id"].as_str().unwrap_or("-"),
            r["name"].as_str().unwrap_or("-"),
            r["budget"],
            r["spent"],
            r["reserved"],
            r["remaining"],
            r["period"].as_str().unwrap_or("-"),
            r["rate"],
            if r["disabled"].as_bool().unwrap_or(false) {
                "disabled"
            } else {
                "active"
            }
        );
    }
    for r in &rows {
        if let Some(k) = r["key"].as_str() {
            println!(
                "\nsecret for {} (shown once): {k}",
                r["id"].as_str().unwrap_or("-")
            );
        }
    }
}

async fn audit_cmd(c: &AdminClient, cmd: AuditCmd) -> i32 {
    use reqwest::Method;
    match cmd {
        AuditCmd::Query {
            key,
            since,
            until,
            decision,
            limit,
        } => {
            let mut q = Vec::new();
            for (k, v) in [
                ("key", key),
                ("since", since),
                ("until", until),
                ("decision", decision),
                ("limit", limit.map(|n| n.to_string())),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", encode(&v)));
                }
            }
            match c
                .raw(Method::GET, &format!("/admin/audit?{}", q.join("&")), None)
                .await
            {
                Ok(t) => {
                    print!("{t}");
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        AuditCmd::Tail { follow, lines } => {
            let mut last_seq: Option<u64> = None;
            let mut first = true;
            loop {
                let path = if first {
                    format!("/admin/audit?limit={lines}")
                } else {
                    "/admin/audit?since=5m".to_owned()
                };
                match c.raw(Method::GET, &path, None).await {
                    Ok(t) => {
                        for line in t.lines() {
                            let seq = serde_json::from_str::<Value>(line)
                                .ok()
                                .and_then(|v| v["seq"].as_u64());
                            if let (Some(s), Some(l)) = (seq, last_seq) {
                                if s <= l {
                                    continue;
                                }
                            }
                            if seq.is_some() {
                                last_seq = seq;
                            }
                            println!("{line}");
                        }
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return 1;
                    }
                }
                first = false;
                if !follow {
                    return 0;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        AuditCmd::Verify { .. } => 2,
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
