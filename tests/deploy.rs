//! `deploy/` ships with the gate, so its promises are tested like the gate's own.
//!
//! The systemd unit is checked with systemd's tools (`systemd-analyze verify` and its
//! offline security score) and by running the real binary inside the unit's sandbox
//! as far as a test can build it without systemd as PID 1: a clean environment with
//! the unit's variables, its umask and working directory, an unprivileged user with no
//! capabilities and no new privileges (as `DynamicUser=`), and a mount namespace with
//! `/proc` mounted as `ProtectProc=`/`ProcSubset=` mount it. `strace` records every
//! system call, which is then held against `SystemCallFilter=`,
//! `RestrictAddressFamilies=`, `MemoryDenyWriteExecute=` and `ProtectSystem=strict`
//! (writes only in the state directory). A call the filter would refuse gets `EPERM`
//! in production, where no test would see it.
//!
//! Building the sandbox needs root (CI runs as root); as another user the sandbox
//! test prints `NOT run`. `systemd-analyze`, `strace`, `unshare` and `setpriv` must
//! be installed (`.ci/run` installs what is missing); a missing one fails the test.

mod common;

use chuzhan_gate::upstream::sim::SimConfig;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const UNIT: &str = "deploy/chuzhan-gate.service";
/// The binary's path in the unit (its install comment puts it there).
const UNIT_BINARY: &str = "/usr/local/bin/chuzhan-gate";
/// The user the sandbox runs the gate as: `nobody`, owning nothing but the state
/// directory, as a dynamic user does.
const SANDBOX_UID: u32 = 65534;
/// `systemd-analyze security` exposure, 0 (locked down) to 10; "OK" is below 5.
const MAX_EXPOSURE: f64 = 2.0;
/// Memory mappings the gate may hold after its draws. It holds ~75; when the
/// allocator cannot read `/proc/sys/vm/overcommit_memory` it splits a mapping with
/// every range it gives back and holds hundreds within seconds.
const MAX_MAPPINGS: usize = 150;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool the deploy tests need. A missing tool fails the test.
fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install it (.ci/run does)"))
}

/// The unit's `[Service]` settings in file order (a key may repeat).
fn service_settings() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join(UNIT)).unwrap();
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if let (true, Some((k, v))) = (in_service, line.split_once('=')) {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn values<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    values(settings, key).last().copied()
}

/// A copy of the unit in `dir` whose `ExecStart=` names the binary under test.
fn unit_copy(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(UNIT)).unwrap();
    let exec = format!("ExecStart={UNIT_BINARY} ");
    assert!(
        text.contains(&exec),
        "the unit no longer starts {UNIT_BINARY}"
    );
    let ours = format!("ExecStart={} ", env!("CARGO_BIN_EXE_chuzhan-gate"));
    let copy = dir.join("chuzhan-gate.service");
    std::fs::write(&copy, text.replace(&exec, &ours)).unwrap();
    copy
}

#[test]
fn the_systemd_unit_verifies_clean_and_scores_as_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let unit = unit.to_str().unwrap();

    // verify exits 0 even for a misspelt setting, but says so on stderr.
    let out = run("systemd-analyze", &["verify", unit]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );

    let out = run(
        "systemd-analyze",
        &["security", "--offline=yes", "--no-pager", unit],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let level = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for chuzhan-gate.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} > {MAX_EXPOSURE}:\n{text}"
    );
}

/// The system calls `SystemCallFilter=` lets through: the unit's first line is an
/// allow-list, later `~` lines take calls out of it; systemd always allows a few
/// more (systemd.exec(5)).
fn allowed_syscalls(settings: &[(String, String)]) -> BTreeSet<String> {
    let lines = values(settings, "SystemCallFilter");
    assert!(
        lines.first().is_some_and(|l| !l.starts_with('~')),
        "the test reads an allow-list unit: {lines:?}"
    );
    let mut allowed: BTreeSet<String> = [
        "execve",
        "exit",
        "exit_group",
        "getrlimit",
        "rt_sigreturn",
        "sigreturn",
        "clock_getres",
        "clock_gettime",
        "clock_nanosleep",
        "gettimeofday",
        "nanosleep",
        "time",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for line in lines {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        for item in list.split_whitespace() {
            let calls = expand(item);
            if deny {
                allowed.retain(|c| !calls.contains(c));
            } else {
                allowed.extend(calls);
            }
        }
    }
    allowed
}

/// A system call, or every call of a `@group` (groups nest), as systemd lists it.
fn expand(item: &str) -> BTreeSet<String> {
    if !item.starts_with('@') {
        return BTreeSet::from([item.to_owned()]);
    }
    let out = run("systemd-analyze", &["syscall-filter", "--no-pager", item]);
    assert!(out.status.success(), "syscall-filter {item}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut calls = BTreeSet::new();
    for entry in text.lines().skip(1).map(str::trim) {
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        calls.extend(expand(entry));
    }
    assert!(!calls.is_empty(), "systemd knows no group {item}");
    calls
}

/// The `-o hidepid=..,subset=..` of the `/proc` the unit's service sees.
fn proc_mount_options(settings: &[(String, String)]) -> String {
    let mut opts = Vec::new();
    match one(settings, "ProtectProc") {
        None | Some("default") => {}
        Some(v) => opts.push(format!("hidepid={v}")),
    }
    if one(settings, "ProcSubset") == Some("pid") {
        opts.push("subset=pid".into());
    }
    if opts.is_empty() {
        opts.push("defaults".into());
    }
    opts.join(",")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One line of `strace -f` output: the call's name and the rest, or `None` for
/// signals, exits and resumptions (their call was counted where it started).
fn traced_call(line: &str) -> Option<(&str, &str)> {
    let (_pid, rest) = line.split_once(' ')?;
    let rest = rest.trim_start();
    if rest.starts_with("<...") || rest.starts_with("+++") || rest.starts_with("---") {
        return None;
    }
    let open = rest.find('(')?;
    Some((&rest[..open], &rest[open + 1..]))
}

/// The absolute paths quoted in a traced call's arguments.
fn quoted_paths(args: &str) -> Vec<&str> {
    args.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with('/'))
        .collect()
}

const WRITING_CALLS: &[&str] = &[
    "mkdir",
    "mkdirat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "symlink",
    "symlinkat",
    "link",
    "linkat",
    "truncate",
    "chmod",
    "fchmodat",
    "chown",
    "fchownat",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_keeps_to_the_systemd_units_sandbox() {
    if !is_root() {
        eprintln!("NOT run: building the unit's sandbox needs root (CI runs as root)");
        return;
    }
    let settings = service_settings();
    assert_eq!(one(&settings, "DynamicUser"), Some("yes"));
    let allowed = allowed_syscalls(&settings);
    let families: BTreeSet<&str> = values(&settings, "RestrictAddressFamilies")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert_eq!(one(&settings, "ProtectSystem"), Some("strict"));
    assert_eq!(one(&settings, "MemoryDenyWriteExecute"), Some("yes"));

    let sim = common::start_sim(SimConfig::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let set_mode = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(tmp.path(), 0o755);
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(SANDBOX_UID), Some(SANDBOX_UID)).unwrap();
    let state_mode = one(&settings, "StateDirectoryMode").unwrap_or("0755");
    set_mode(&state, u32::from_str_radix(state_mode, 8).unwrap());
    // The install comment copies config/gate.toml to where ExecStart reads it.
    let config = tmp.path().join("gate.toml");
    std::fs::copy(repo().join("config/gate.toml"), &config).unwrap();
    set_mode(&config, 0o644);
    let trace = tmp.path().join("trace");

    // ExecStart, with the binary under test and the copied config.
    let exec = one(&settings, "ExecStart").unwrap();
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some(UNIT_BINARY));
    let gate_bin = env!("CARGO_BIN_EXE_chuzhan-gate");
    let gate_args: Vec<String> = words
        .map(|w| match w {
            "/etc/chuzhan-gate/gate.toml" => config.display().to_string(),
            w => w.to_owned(),
        })
        .collect();

    let (addr, admin) = (common::free_addr(), common::free_addr());
    let admin_token = "deploy-test-admin-token-0123456789";
    // On one CPU, as a small machine gives it: the gate then also puts its
    // writer threads under SCHED_BATCH (src/sched.rs), a call the filter must let
    // through.
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &common::first_allowed_cpu(), "strace"])
        .args(["-f", "-qq", "-s", "4096", "-o"])
        .arg(&trace)
        .args(["--", "unshare", "--mount", "--propagation", "private", "--"])
        .args(["sh", "-c"])
        .arg(
            r#"umask "$1" && mount -t proc -o "$2" proc /proc && cd "$3" && shift 3 &&
               exec setpriv --reuid="$UID_" --regid="$UID_" --clear-groups --no-new-privs \
                    --inh-caps=-all --bounding-set=-all -- "$@""#,
        )
        .arg("sh")
        .arg(one(&settings, "UMask").unwrap_or("0022"))
        .arg(proc_mount_options(&settings))
        .arg(&state)
        .arg(gate_bin)
        .args(&gate_args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("UID_", SANDBOX_UID.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for v in values(&settings, "Environment") {
        let (k, v) = v.split_once('=').unwrap();
        match k {
            "GATE_DATA_DIR" => cmd.env(k, &state),
            _ => cmd.env(k, v),
        };
    }
    // What EnvironmentFile= holds, and the addresses an operator would put in the
    // config file.
    cmd.env("GATE_UPSTREAM_TOKEN", SimConfig::default().token)
        .env("GATE_ADMIN_TOKEN", admin_token)
        .env("GATE_UPSTREAM_URL", sim.url())
        .env("GATE_LISTEN", addr.to_string())
        .env("GATE_ADMIN_LISTEN", admin.to_string());
    let mut strace = cmd
        .spawn()
        .expect("cannot run strace: install it (.ci/run does)");

    let http = reqwest::Client::new();
    if let Err(st) = common::until_healthy(&mut strace, admin, Duration::from_secs(60)).await {
        let mut err = String::new();
        std::io::Read::read_to_string(strace.stderr.as_mut().unwrap(), &mut err).unwrap();
        panic!("the gate exited in the sandbox at start: {st}\n{err}");
    }
    let gate_pid = common::only_child(strace.id());

    let body = json!({"name": "sandboxed", "budget": 1_000_000});
    let (_, secret) = common::create_key(&http, admin, admin_token, body).await;

    // Draws in waves, so the allocator frees and gives back memory between them.
    let mut draws = 0;
    for wave in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..32 {
            let (http, secret) = (http.clone(), secret.clone());
            tasks.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                for j in 0..8 {
                    let body = common::draw_body(&format!("wave {wave} caller {i} draw {j}"));
                    let v = common::post_as(
                        &http,
                        &format!("http://{addr}/aiapi/v1/draw"),
                        &secret,
                        &body,
                    )
                    .await;
                    codes.push(v["code"].clone());
                }
                codes
            }));
        }
        for t in tasks {
            for code in t.await.unwrap() {
                assert_eq!(code, 0, "a draw in the sandbox failed");
                draws += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(draws, 3 * 32 * 8);
    let bad = common::post_as(
        &http,
        &format!("http://{addr}/aiapi/v1/draw"),
        &secret,
        r#"{"prompt":"x","width":99999}"#,
    )
    .await;
    assert_eq!(bad["code"], 1003, "{bad}");

    let mappings = std::fs::read_to_string(format!("/proc/{gate_pid}/maps"))
        .unwrap()
        .lines()
        .count();
    eprintln!("{mappings} memory mappings after {draws} draws");

    // SIGTERM, as systemd stops the unit (KillSignal=).
    assert_eq!(one(&settings, "KillSignal"), Some("SIGTERM"));
    // SAFETY: kill sends a signal to a pid we started; no memory is involved.
    assert_eq!(unsafe { libc::kill(gate_pid as i32, libc::SIGTERM) }, 0);
    let status = common::exit_of(&mut strace, Duration::from_secs(60)).await;
    let mut err = String::new();
    std::io::Read::read_to_string(strace.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        status.success(),
        "the gate's exit after SIGTERM: {status}\n{err}"
    );
    assert!(
        mappings <= MAX_MAPPINGS,
        "{mappings} memory mappings after the draws (the allocator splits them when \
         /proc/sys/vm/overcommit_memory is hidden from it)"
    );

    let text = std::fs::read_to_string(&trace).unwrap();
    let start = text
        .lines()
        .position(|l| l.contains(&format!("execve(\"{gate_bin}\"")) && l.ends_with("= 0"))
        .expect("the gate's execve in the trace");
    let state_dir = state.to_str().unwrap();
    let mut seen = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let mut problems = Vec::new();
    for line in text.lines().skip(start) {
        let Some((call, args)) = traced_call(line) else {
            continue;
        };
        seen.insert(call.to_owned());
        if !allowed.contains(call) {
            refused.insert(call.to_owned());
        }
        if call == "socket" || call == "socketpair" {
            let family = args.split(',').next().unwrap_or("");
            if !families.contains(family) {
                problems.push(format!(
                    "address family outside RestrictAddressFamilies: {line}"
                ));
            }
        }
        if (call == "mmap" || call == "mprotect" || call == "pkey_mprotect")
            && args.contains("PROT_WRITE")
            && args.contains("PROT_EXEC")
        {
            problems.push(format!("writable and executable memory: {line}"));
        }
        let writes = WRITING_CALLS.contains(&call)
            || ((call == "open" || call == "openat")
                && ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                    .iter()
                    .any(|f| args.contains(f)));
        if writes {
            for p in quoted_paths(args) {
                if !p.starts_with(state_dir) {
                    problems.push(format!("a write outside the state directory: {line}"));
                }
            }
        }
        if (call == "open" || call == "openat")
            && quoted_paths(args).iter().any(|p| p.starts_with("/proc/"))
            && line.contains(" = -1 ")
        {
            problems.push(format!("a /proc file the unit hides: {line}"));
        }
    }
    for needed in [
        "accept4",
        "fsync",
        "fdatasync",
        "writev",
        "sched_setscheduler",
    ] {
        assert!(seen.contains(needed), "the trace has no {needed}: {seen:?}");
    }
    assert!(
        refused.is_empty(),
        "calls SystemCallFilter= refuses (EPERM in production): {refused:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- the deployment files against the gate's configuration and each other ----------

use chuzhan_gate::config::Config;
use chuzhan_gate::ledger::BackendKind;
use std::collections::BTreeMap;
use yaml_rust2::{Yaml, YamlLoader};

/// Variables read outside the configuration: the log filter (`cli::init_logs`) and
/// the admin CLI's address (`keys ...`).
const CLI_VARIABLES: &[&str] = &["GATE_LOG", "GATE_ADMIN_URL"];

/// Every `GATE_*` variable the gate reads: those the configuration asks for, found
/// by loading it with an environment that records the names, and the CLI's.
fn gate_variables() -> BTreeSet<String> {
    let asked = std::sync::Mutex::new(BTreeSet::new());
    Config::load_with_env(None, |k| {
        asked.lock().unwrap().insert(k.to_owned());
        None
    })
    .unwrap();
    let mut names = asked.into_inner().unwrap();
    names.extend(CLI_VARIABLES.iter().map(|s| s.to_string()));
    assert!(names.contains("GATE_LEDGER_URL"), "{names:?}");
    names
}

fn yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    let mut docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

fn text(y: &Yaml, what: &str) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        _ => panic!("{what}: not a string: {y:?}"),
    }
}

fn int(y: &Yaml, what: &str) -> u64 {
    y.as_i64()
        .and_then(|i| u64::try_from(i).ok())
        .unwrap_or_else(|| panic!("{what}: not a count: {y:?}"))
}

/// Seconds in a compose duration such as `45s` or `1m30s`.
fn seconds(d: &str) -> u64 {
    let (mut total, mut n) = (0, 0);
    for c in d.chars() {
        match c {
            '0'..='9' => n = n * 10 + u64::from(c.to_digit(10).unwrap()),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("a duration {d:?}"),
        }
    }
    total + n
}

/// The configuration a deployment file makes: its config file (if any) and its
/// environment, loaded as the gate loads them.
fn config_of(toml: Option<&str>, env: &BTreeMap<String, String>, what: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let file = toml.map(|t| {
        let p = dir.path().join("gate.toml");
        std::fs::write(&p, t).unwrap();
        p
    });
    let known = gate_variables();
    for name in env.keys().filter(|n| n.starts_with("GATE_")) {
        assert!(
            known.contains(name),
            "{what} sets {name}, which the gate never reads"
        );
    }
    let env = env.clone();
    let cfg = Config::load_with_env(file.as_deref(), move |k| {
        // A file named by GATE_CONFIG is the one given here.
        (k != "GATE_CONFIG").then(|| env.get(k).cloned()).flatten()
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    // server::start refuses an admin listener off loopback without a token.
    assert!(
        cfg.admin_listen.ip().is_loopback() || !cfg.admin_token.is_empty(),
        "{what}: the admin listener {} needs GATE_ADMIN_TOKEN",
        cfg.admin_listen
    );
    cfg
}

/// `ENV` settings and `EXPOSE`d ports, `USER` and `VOLUME` of the Dockerfile.
struct Dockerfile {
    env: BTreeMap<String, String>,
    expose: BTreeSet<u16>,
    user: String,
    volume: String,
}

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    // Join continued lines, drop comments.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        match l.strip_suffix('\\') {
            Some(head) => cur.push_str(head),
            None => {
                cur.push_str(l);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let runtime = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    let mut d = Dockerfile {
        env: BTreeMap::new(),
        expose: BTreeSet::new(),
        user: String::new(),
        volume: String::new(),
    };
    for l in &lines[runtime..] {
        let (word, rest) = l.split_once(' ').unwrap_or((l, ""));
        match word {
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV NAME=VALUE");
                    d.env.insert(k.into(), v.into());
                }
            }
            "EXPOSE" => d
                .expose
                .extend(rest.split_whitespace().map(|p| p.parse::<u16>().unwrap())),
            "USER" => d.user = rest.trim().into(),
            "VOLUME" => d.volume = rest.trim().trim_matches(['[', ']', '"']).into(),
            _ => {}
        }
    }
    d
}

#[test]
fn the_dockerfile_makes_a_gate_that_serves_on_its_exposed_ports() {
    let d = dockerfile();
    let cfg = config_of(None, &d.env, "deploy/Dockerfile");
    assert!(d.expose.contains(&cfg.listen.port()), "{:?}", d.expose);
    assert!(
        d.expose.contains(&cfg.admin_listen.port()),
        "{:?}",
        d.expose
    );
    assert!(
        cfg.listen.ip().is_unspecified(),
        "clients reach {}",
        cfg.listen
    );
    assert_eq!(cfg.data_dir, PathBuf::from(&d.volume));
    assert_eq!(cfg.ledger.backend, BackendKind::Sqlite);
    let uid = d.user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {}: numeric and not root, for runAsNonRoot",
        d.user
    );
}

#[test]
fn the_compose_file_wires_the_gate_to_its_database_and_ports() {
    let c = yaml("deploy/docker-compose.yml");
    let gate = &c["services"]["gate"];
    let mut env = BTreeMap::new();
    for (k, v) in gate["environment"].as_hash().expect("a map of variables") {
        // ${NAME:-default} takes the default, ${NAME:?why} stands for the operator's value.
        let mut v = text(v, "a variable");
        while let Some(start) = v.find("${") {
            let end = start + v[start..].find('}').unwrap();
            let inner = &v[start + 2..end];
            let value = match (inner.split_once(":-"), inner.split_once(":?")) {
                (Some((_, default)), _) => default.to_owned(),
                (None, Some(_)) => "operator-value-0123456789".to_owned(),
                _ => panic!("${{{inner}}} has no default"),
            };
            v.replace_range(start..=end, &value);
        }
        env.insert(text(k, "a name"), v);
    }
    let cfg = config_of(None, &env, "deploy/docker-compose.yml");
    assert_eq!(cfg.ledger.backend, BackendKind::Postgres);

    // The ledger URL names the db service, its user and database.
    let url = cfg.ledger.url.clone().unwrap();
    let db = &c["services"]["db"]["environment"];
    let user = text(&db["POSTGRES_USER"], "POSTGRES_USER");
    let name = text(&db["POSTGRES_DB"], "POSTGRES_DB");
    assert!(url.starts_with(&format!("postgres://{user}:")), "{url}");
    assert!(url.ends_with(&format!("@db:5432/{name}")), "{url}");
    let depends = &gate["depends_on"]["db"]["condition"];
    assert_eq!(depends.as_str(), Some("service_healthy"));

    let published: Vec<u16> = gate["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            text(p, "a port")
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(published.contains(&cfg.listen.port()), "{published:?}");
    assert!(
        published.contains(&cfg.admin_listen.port()),
        "{published:?}"
    );
    let mounts: Vec<String> = gate["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| text(v, "a volume").split(':').nth(1).unwrap().to_owned())
        .collect();
    assert!(
        mounts.contains(&cfg.data_dir.display().to_string()),
        "the data directory {} is not a volume: {mounts:?}",
        cfg.data_dir.display()
    );
    let grace = seconds(&text(&gate["stop_grace_period"], "stop_grace_period"));
    assert!(grace > cfg.limits.drain_secs, "stop_grace_period {grace} s");
}

#[test]
fn the_kubernetes_manifests_agree_with_the_gate_and_each_other() {
    let dir = repo().join("deploy/k8s");
    let kustom = yaml("deploy/k8s/kustomization.yaml");
    let listed: BTreeSet<String> = kustom["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|r| text(r, "a resource"))
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources");

    let cm = yaml("deploy/k8s/configmap.yaml");
    let secret = yaml("deploy/k8s/secret.yaml");
    let dep = yaml("deploy/k8s/deployment.yaml");
    let svc = yaml("deploy/k8s/service.yaml");
    let pod = &dep["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(int(&dep["spec"]["replicas"], "replicas") >= 2, "a fleet");

    // Environment, with the Secret's values.
    let secret_name = text(&secret["metadata"]["name"], "Secret name");
    let mut env = BTreeMap::new();
    for e in c["env"].as_vec().unwrap() {
        let name = text(&e["name"], "env name");
        let value = match (&e["value"], &e["valueFrom"]["secretKeyRef"]) {
            (Yaml::BadValue, r) => {
                assert_eq!(text(&r["name"], "secretKeyRef name"), secret_name);
                let key = text(&r["key"], "secretKeyRef key");
                text(
                    &secret["stringData"][key.as_str()],
                    &format!("Secret key {key}"),
                )
            }
            (v, _) => text(v, &name),
        };
        env.insert(name, value);
    }

    // The config file: GATE_CONFIG in the ConfigMap's volume.
    let mounts: BTreeMap<String, String> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| {
            (
                text(&m["name"], "mount"),
                text(&m["mountPath"], "mountPath"),
            )
        })
        .collect();
    let config_path = PathBuf::from(env.get("GATE_CONFIG").expect("GATE_CONFIG"));
    assert_eq!(
        config_path.parent().unwrap(),
        Path::new(&mounts["config"]),
        "GATE_CONFIG is not in the config volume"
    );
    let volumes = pod["volumes"].as_vec().unwrap();
    let config_volume = volumes
        .iter()
        .find(|v| v["name"].as_str() == Some("config"))
        .expect("a config volume");
    assert_eq!(
        text(&config_volume["configMap"]["name"], "configMap"),
        text(&cm["metadata"]["name"], "ConfigMap name")
    );
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let toml = text(&cm["data"][file], "the ConfigMap's gate.toml");
    let cfg = config_of(Some(&toml), &env, "deploy/k8s");
    assert_eq!(cfg.ledger.backend, BackendKind::Postgres);
    assert_eq!(cfg.data_dir, PathBuf::from(&mounts["data"]));

    // Ports, probes and the Service.
    let ports: BTreeMap<String, u16> = c["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            let n = int(&p["containerPort"], "containerPort");
            (text(&p["name"], "port name"), u16::try_from(n).unwrap())
        })
        .collect();
    assert_eq!(ports.get("http"), Some(&cfg.listen.port()));
    assert_eq!(ports.get("admin"), Some(&cfg.admin_listen.port()));
    assert!(cfg.listen.ip().is_unspecified() && cfg.admin_listen.ip().is_unspecified());
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("admin"), "{probe}");
    }
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        text(&annotations["prometheus.io/port"], "prometheus.io/port"),
        cfg.admin_listen.port().to_string()
    );
    for p in svc["spec"]["ports"].as_vec().unwrap() {
        let target = text(&p["targetPort"], "targetPort");
        assert!(ports.contains_key(&target), "the Service targets {target}");
    }
    assert_eq!(
        svc["spec"]["selector"], dep["spec"]["selector"]["matchLabels"],
        "the Service selects the Deployment's pods"
    );

    // Stopping: the preStop pause and the drain fit in the grace period.
    let pause = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_vec()
        .and_then(|cmd| cmd.get(1))
        .map(|s| text(s, "sleep").parse::<u64>().unwrap())
        .unwrap_or(0);
    let grace = int(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    assert!(
        grace > pause + cfg.limits.drain_secs,
        "grace {grace} s, preStop {pause} s, drain {} s",
        cfg.limits.drain_secs
    );

    // The image's user.
    let d = dockerfile();
    let uid = int(&pod["securityContext"]["runAsUser"], "runAsUser");
    assert_eq!(d.user.split(':').next(), Some(uid.to_string().as_str()));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
}

#[test]
fn the_systemd_unit_keeps_its_state_and_outlasts_the_drain() {
    let s = service_settings();
    let mut env = BTreeMap::new();
    for v in values(&s, "Environment") {
        let (k, v) = v.split_once('=').unwrap();
        env.insert(k.to_owned(), v.to_owned());
    }
    let toml = std::fs::read_to_string(repo().join("config/gate.toml")).unwrap();
    let cfg = config_of(Some(&toml), &env, UNIT);
    let state = one(&s, "StateDirectory").expect("StateDirectory=");
    assert_eq!(cfg.data_dir, Path::new("/var/lib").join(state));
    assert_eq!(
        one(&s, "WorkingDirectory").map(PathBuf::from),
        Some(cfg.data_dir.clone())
    );
    let stop = seconds(one(&s, "TimeoutStopSec").expect("TimeoutStopSec="));
    assert!(stop > cfg.limits.drain_secs, "TimeoutStopSec {stop} s");
}
