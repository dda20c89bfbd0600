//! Configuration: one TOML file, then environment overrides that beat it.
//!
//! Every subcommand (`serve`, `ledger verify`, `audit verify`, `price`) loads the
//! configuration the same way, so they all see the same ledger and audit paths.
//! Secrets (upstream token, admin token) come only from the environment, never from
//! the file, so a config file can be committed or mounted as a ConfigMap.

use crate::audit::AuditConfig;
use crate::ledger::{BackendKind, LedgerConfig};
use crate::metrics::MetricsConfig;
use crate::pricing::PriceTable;
use crate::tasks::TasksConfig;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path tried.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {msg}")]
    Parse {
        /// The path read.
        path: PathBuf,
        /// What is wrong, with the field.
        msg: String,
    },
    /// An environment variable has a value that does not parse.
    #[error("invalid value for {var}: {msg}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong.
        msg: String,
    },
}

/// How rejections are sent: HTTP 200 like the upstream, or a matching status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RejectStatus {
    /// HTTP 200 with the business code in the body (what existing clients handle).
    #[default]
    Upstream,
    /// 401 / 402 / 400 / 429.
    Semantic,
}

/// What to do with a charge whose upstream outcome is unknown (the request was sent,
/// then the connection was lost or the answer could not be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownOutcome {
    /// Charge the reservation: the upstream may have run (and billed) the task.
    #[default]
    Charge,
    /// Void it: the client is not charged, the operator carries the risk.
    Void,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The upstream connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, without a trailing slash.
    pub url: String,
    /// TCP/TLS connect timeout.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout; long polls (`waitUtilEnd`) are held this long.
    pub timeout_secs: u64,
    /// Idle pooled connections kept per host.
    pub pool_max_idle: usize,
    /// Largest upstream answer the gate will buffer, in bytes.
    pub max_answer_bytes: usize,
    /// What to do when a billable request was sent and its outcome is unknown.
    pub unknown_outcome: UnknownOutcome,
    /// The upstream token (from `GATE_UPSTREAM_TOKEN` only; never from the file).
    #[serde(skip)]
    pub token: Secret,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "https://ai.huashi6.com".into(),
            connect_timeout_ms: 5_000,
            timeout_secs: 120,
            pool_max_idle: 256,
            max_answer_bytes: 64 << 20,
            unknown_outcome: UnknownOutcome::Charge,
            token: Secret::default(),
        }
    }
}

/// Limits on what clients may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body, in bytes (over it: 413 with the envelope, nothing charged).
    pub body_bytes: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout_secs: u64,
    /// Time a client has to send its whole body.
    pub body_read_timeout_secs: u64,
    /// How long shutdown waits for in-flight requests.
    pub drain_secs: u64,
    /// Default concurrency limit for keys created without one (`None` = no limit).
    pub default_concurrency: Option<u32>,
    /// Default submits per second for keys created without one (`None` = no limit).
    pub default_rps: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            body_bytes: 20 << 20,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 60,
            drain_secs: 30,
            default_concurrency: None,
            default_rps: None,
        }
    }
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(<empty>)")
        } else {
            f.write_str("Secret(<redacted>)")
        }
    }
}

/// The whole configuration of a gate.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Admin listener (admin API, metrics, health).
    pub admin_listen: SocketAddr,
    /// Where the embedded ledger and the audit log live.
    pub data_dir: PathBuf,
    /// The gate's public base URL, used for upstream callbacks.
    pub public_url: Option<String>,
    /// Status codes of rejections.
    pub reject_status: RejectStatus,
    /// Log format.
    pub log_format: LogFormat,
    /// Extra paths passed through for free (otherwise unknown paths are refused).
    pub passthrough: Vec<String>,
    /// Upstream connection.
    pub upstream: UpstreamConfig,
    /// Client limits.
    pub limits: LimitsConfig,
    /// The ledger.
    pub ledger: LedgerConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// The price table.
    pub pricing: PriceTable,
    /// Following tasks to their end.
    pub tasks: TasksConfig,
    /// What `/metrics` shows.
    pub metrics: MetricsConfig,
    /// The admin token (from `GATE_ADMIN_TOKEN` only).
    #[serde(skip)]
    pub admin_token: Secret,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            data_dir: PathBuf::from("data"),
            public_url: None,
            reject_status: RejectStatus::default(),
            log_format: LogFormat::default(),
            passthrough: Vec::new(),
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            ledger: LedgerConfig::default(),
            audit: AuditConfig::default(),
            pricing: PriceTable::default(),
            tasks: TasksConfig::default(),
            metrics: MetricsConfig::default(),
            admin_token: Secret::default(),
        }
    }
}

impl Config {
    /// Load from `path` (or `GATE_CONFIG`, or defaults when neither names a file),
    /// then apply the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |k| std::env::var(k).ok())
    }

    /// As [`Config::load`], with the environment given as a function (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.map(Path::to_path_buf).or_else(|| {
            env("GATE_CONFIG")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let mut cfg = match file {
            Some(p) => Self::from_file(&p)?,
            None => Config::default(),
        };
        cfg.apply_env(&env)?;
        cfg.resolve_paths();
        Ok(cfg)
    }

    /// Parse one TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(v) = get("GATE_LISTEN") {
            self.listen = parse_addr("GATE_LISTEN", &v)?;
        }
        if let Some(v) = get("GATE_ADMIN_LISTEN") {
            self.admin_listen = parse_addr("GATE_ADMIN_LISTEN", &v)?;
        }
        if let Some(v) = get("GATE_UPSTREAM_URL") {
            self.upstream.url = v;
        }
        if let Some(v) = get("GATE_UPSTREAM_TOKEN") {
            self.upstream.token = Secret::new(v);
        }
        if let Some(v) = get("GATE_ADMIN_TOKEN") {
            self.admin_token = Secret::new(v);
        }
        if let Some(v) = get("GATE_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
            // The variable names where the embedded files live, and the environment
            // beats the file, so paths the file gave are dropped too.
            self.ledger.path = None;
            self.audit.dir = None;
        }
        if let Some(v) = get("GATE_LEDGER_URL") {
            if v.starts_with("postgres://") || v.starts_with("postgresql://") {
                self.ledger.backend = BackendKind::Postgres;
                self.ledger.url = Some(v);
            } else if let Some(p) = v.strip_prefix("sqlite://") {
                self.ledger.backend = BackendKind::Sqlite;
                self.ledger.path = Some(PathBuf::from(p));
            } else {
                return Err(ConfigError::Env {
                    var: "GATE_LEDGER_URL",
                    msg: "expected a postgres:// or sqlite:// URL".into(),
                });
            }
        }
        while self.upstream.url.ends_with('/') {
            self.upstream.url.pop();
        }
        Ok(())
    }

    fn resolve_paths(&mut self) {
        if self.ledger.path.is_none() {
            self.ledger.path = Some(self.data_dir.join("ledger.db"));
        }
        if self.audit.dir.is_none() {
            self.audit.dir = Some(self.data_dir.join("audit"));
        }
    }

    /// The audit directory (always set after loading).
    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit"))
    }
}

fn parse_addr(var: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| ConfigError::Env {
        var,
        msg: format!("expected HOST:PORT, got {v:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn works_with_only_environment_variables() {
        let cfg = Config::load_with_env(
            None,
            env(&[
                ("GATE_LISTEN", "0.0.0.0:8000"),
                ("GATE_UPSTREAM_URL", "http://127.0.0.1:1/"),
                ("GATE_UPSTREAM_TOKEN", "tok-123"),
                ("GATE_DATA_DIR", "/tmp/gd"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 8000);
        assert_eq!(cfg.upstream.url, "http://127.0.0.1:1");
        assert_eq!(cfg.upstream.token.expose(), "tok-123");
        assert_eq!(
            cfg.ledger.path.as_deref(),
            Some(Path::new("/tmp/gd/ledger.db"))
        );
        assert_eq!(cfg.audit.dir.as_deref(), Some(Path::new("/tmp/gd/audit")));
        assert!(!format!("{cfg:?}").contains("tok-123"));
    }

    #[test]
    fn environment_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gate.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:7000\"\n[upstream]\nurl = \"http://file\"\ntimeout_secs = 7\n",
        )
        .unwrap();
        let cfg = Config::load_with_env(
            Some(&p),
            env(&[
                ("GATE_UPSTREAM_URL", "http://env"),
                ("GATE_LEDGER_URL", "postgres://x/y"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.upstream.url, "http://env");
        assert_eq!(cfg.upstream.timeout_secs, 7);
        assert_eq!(cfg.ledger.backend, BackendKind::Postgres);
    }

    #[test]
    fn gate_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:7001\"\n").unwrap();
        let cfg =
            Config::load_with_env(None, env(&[("GATE_CONFIG", p.to_str().unwrap())])).unwrap();
        assert_eq!(cfg.listen.port(), 7001);
    }

    #[test]
    fn unknown_field_in_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, "lisen = \"127.0.0.1:7001\"\n").unwrap();
        let err = Config::load_with_env(Some(&p), env(&[])).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn ledger_durability_is_read_and_a_misspelt_ledger_field_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        let cfg = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(cfg.ledger.durability, crate::ledger::Durability::PowerLoss);
        std::fs::write(&p, "[ledger]\ndurability = \"process-crash\"\n").unwrap();
        let cfg = Config::load_with_env(Some(&p), env(&[])).unwrap();
        assert_eq!(
            cfg.ledger.durability,
            crate::ledger::Durability::ProcessCrash
        );
        std::fs::write(&p, "[ledger]\ndurability = \"none\"\n").unwrap();
        let err = Config::load_with_env(Some(&p), env(&[])).unwrap_err();
        assert!(err.to_string().contains("durability"), "{err}");
        // A typo must not silently leave a setting at its default.
        std::fs::write(&p, "[ledger]\npending_polcy = \"void\"\n").unwrap();
        let err = Config::load_with_env(Some(&p), env(&[])).unwrap_err();
        assert!(err.to_string().contains("pending_polcy"), "{err}");
        std::fs::write(&p, "[audit]\nlog_prompt = true\n").unwrap();
        let err = Config::load_with_env(Some(&p), env(&[])).unwrap_err();
        assert!(err.to_string().contains("log_prompt"), "{err}");
    }

    #[test]
    fn bad_listen_env_is_an_error() {
        let err = Config::load_with_env(None, env(&[("GATE_LISTEN", "nope")])).unwrap_err();
        assert!(err.to_string().contains("GATE_LISTEN"));
    }
}
