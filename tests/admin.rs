//! Operators: every admin route (auth failures and bad input included), the CLI
//! against a running gate, and changes taking effect on the next request.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::process::Command;

#[tokio::test]
async fn admin_routes_refuse_without_the_token() {
    let env = Env::new().await;
    for (m, p) in [
        (Method::GET, "/admin/keys"),
        (Method::POST, "/admin/keys"),
        (Method::GET, "/admin/audit"),
    ] {
        let r = env
            .http
            .request(m.clone(), env.admin_url(p))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{m} {p}");
        let r = env
            .http
            .request(m.clone(), env.admin_url(p))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{m} {p}");
    }
    // Health and metrics need no token.
    let r = env
        .http
        .get(env.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = env
        .http
        .get(env.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn create_shows_the_secret_once_and_stores_only_a_hash() {
    let env = Env::new().await;
    let (s, v) = env
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({"name": "alice", "budget": 10000, "period": "month", "rate": 1.2, "concurrency": 2, "rps": 5, "note": "first"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let secret = v["key"].as_str().unwrap();
    assert!(secret.starts_with("czg_") && secret.len() >= 4 + 32);
    assert_eq!(v["budget"], 10000);
    assert_eq!(v["period"], "month");
    assert_eq!(v["rate"], 1.2);
    assert!(v["window_start"].is_string());
    let id = v["id"].as_str().unwrap();
    let (_, shown) = env
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert!(shown.get("key").is_none(), "secret shown only at creation");
    assert!(!shown.to_string().contains(secret));
    let (_, list) = env.admin(Method::GET, "/admin/keys", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(secret));
    // At rest: the ledger holds the hash, not the secret.
    let db = std::fs::read(env.dir.path().join("ledger.db")).unwrap_or_default();
    let wal = std::fs::read(env.dir.path().join("ledger.db-wal")).unwrap_or_default();
    let needle = secret.as_bytes();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }
}

#[tokio::test]
async fn malformed_admin_requests_get_400_naming_the_field() {
    let env = Env::new().await;
    for (body, field) in [
        (json!({"budget": 10}), "name"),
        (json!({"name": "a"}), "budget"),
        (json!({"name": "a", "budget": -1}), "budget"),
        (
            json!({"name": "a", "budget": 1, "period": "year"}),
            "period",
        ),
        (json!({"name": "a", "budget": 1, "rate": 0}), "rate"),
        (
            json!({"name": "a", "budget": 1, "expires_at": "tomorrow"}),
            "expires_at",
        ),
        (json!({"name": "a", "budget": 1, "colour": "red"}), "colour"),
    ] {
        let (s, v) = env
            .admin(Method::POST, "/admin/keys", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let r = env
        .http
        .post(env.admin_url("/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, _) = env.admin(Method::GET, "/admin/keys/key_nope", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn top_up_patch_rotate_and_disable_take_effect_on_the_next_request() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 5})).await;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1002);
    let (s, v) = env
        .admin(
            Method::POST,
            &format!("/admin/keys/{id}/top-up"),
            Some(json!({"points": 10, "note": "paid invoice 7"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["budget"], 15);
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["balance"], 3);
    // Budget change.
    let (s, v) = env
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"budget": 100, "rate": 2})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["remaining"], 88);
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["data"]["used"], 24, "the new rate applies at once");
    // Rotate: the old secret stops working, the new one works.
    let (s, v) = env
        .admin(Method::POST, &format!("/admin/keys/{id}/rotate"), None)
        .await;
    assert_eq!(s, 200);
    let new_secret = v["key"].as_str().unwrap().to_owned();
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1001);
    let (_, v, _) = env.post("/aiapi/v1/draw", &new_secret, SEED_768).await;
    assert_eq!(v["code"], 0);
    // Bad patch changes nothing.
    let (s, v) = env
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"budget": 1, "rate": "x"})),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["field"], "rate");
    assert_eq!(env.account(&id).await["budget"], 100);
}

#[tokio::test]
async fn audit_query_returns_decisions_and_admin_actions_as_json_lines() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 15})).await;
    env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    env.gate().gate.audit.flush().await.unwrap();
    let r = env
        .http
        .get(env.admin_url(&format!("/admin/audit?key={id}&decision=budget")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let recs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 1, "{text}");
    assert_eq!(recs[0]["decision"], "budget");
    assert!(!text.contains(&secret));
    let r = env
        .http
        .get(env.admin_url("/admin/audit?since=1h&limit=100"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("\"action\":\"key_create\""), "{text}");
    assert!(text.contains("\"decision\":\"admitted\""));
    let (s, v) = env
        .admin(Method::GET, "/admin/audit?since=yesterday", None)
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["field"], "since");
}

#[tokio::test]
async fn metrics_count_requests_by_endpoint_and_decision() {
    let env = Env::new().await;
    let (_, secret) = env.key(json!({"name": "a", "budget": 15})).await;
    env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    let text = metrics_text(&env).await;
    assert!(
        text.contains("gate_requests_total{endpoint=\"draw\",decision=\"admitted\"} 1"),
        "{text}"
    );
    assert!(text.contains("gate_requests_total{endpoint=\"draw\",decision=\"budget\"} 1"));
    assert!(text.contains("gate_budget_remaining_points{key="));
    assert!(text.contains("gate_overhead_seconds_bucket"));
    assert!(
        text.contains("gate_ledger_commit_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains(",kind=\"charged\"} 12"), "{text}");
    assert!(text.contains(",kind=\"reserved\"} 12"), "{text}");
    assert!(text.contains("gate_reservations_in_flight 0"));
    assert!(text.contains("gate_price_drift_requests_total 0"));
    // The ledger's group commits: the admitted draw alone wrote its reservation,
    // its commit and its task; the refused one wrote nothing.
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let (transactions, writes) = (
        counter("gate_ledger_transactions_total"),
        counter("gate_ledger_writes_total"),
    );
    assert!(writes >= 3, "{text}");
    assert!((1..=writes).contains(&transactions), "{text}");
    assert_eq!(counter("gate_ledger_rollbacks_total"), 0);
}

#[tokio::test]
async fn refuses_a_non_loopback_admin_listener_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gate_config(dir.path(), "http://127.0.0.1:1", "t");
    cfg.admin_listen = "0.0.0.0:0".parse().unwrap();
    cfg.admin_token = chuzhan_gate::config::Secret::default();
    match chuzhan_gate::server::start(cfg).await {
        Err(e) => assert!(e.to_string().contains("GATE_ADMIN_TOKEN"), "{e}"),
        Ok(_) => panic!("must refuse"),
    }
}

#[tokio::test]
async fn every_ledger_transition_of_a_request_is_audited() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let (_, v, headers) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 0);
    let rid = headers["x-request-id"].to_str().unwrap().to_owned();
    env.gate().gate.audit.flush().await.unwrap();
    let recs = chuzhan_gate::audit::query(
        &env.gate().gate.cfg.audit_dir(),
        &chuzhan_gate::audit::Filter {
            key: Some(id),
            ..Default::default()
        },
    )
    .unwrap();
    let of_request: Vec<&Value> = recs
        .iter()
        .filter(|r| r["request_id"] == rid.as_str())
        .collect();
    let transitions: Vec<&str> = of_request
        .iter()
        .filter_map(|r| r["transition"].as_str())
        .collect();
    assert_eq!(transitions, ["reserve", "commit"]);
    let decision = of_request.iter().find(|r| r["event"] == "request").unwrap();
    assert_eq!(decision["decision"], "admitted");
    assert_eq!(decision["charged"], 12);
    assert_eq!(decision["table_version"], "2026-11-default");
    assert_eq!(decision["key_name"], "a");
    assert!(decision["task_id"].is_string());
    assert_eq!(decision["upstream_status"], 200);
}

#[tokio::test]
async fn readyz_reports_ledger_and_upstream() {
    let env = Env::new().await;
    let r = env.http.get(env.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Point a gate at a dead upstream: not ready.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let env2 = Env::with(Default::default(), |c| c.upstream.url = dead).await;
    let r = env2
        .http
        .get(env2.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

fn cli(env: &Env, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chuzhan-gate"))
        .args(args)
        .env(
            "GATE_ADMIN_URL",
            format!("http://{}", env.gate().admin_addr),
        )
        .env("GATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("GATE_DATA_DIR", env.dir.path())
        .env_remove("GATE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_keys_against_a_running_gate() {
    let env = Env::new().await;
    let env_ref = &env;
    let (code, out, err) = tokio::task::block_in_place(|| {
        cli(
            env_ref,
            &[
                "keys", "create", "--name", "alice", "--budget", "10000", "--period", "month",
                "--rate", "1.2", "--json",
            ],
        )
    });
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(v["key"].as_str().unwrap().starts_with("czg_"));
    let (code, out, _) = tokio::task::block_in_place(|| cli(env_ref, &["keys", "list"]));
    assert_eq!(code, 0);
    assert!(out.contains("alice") && out.contains(&id), "{out}");
    let (code, _, err) =
        tokio::task::block_in_place(|| cli(env_ref, &["keys", "top-up", &id, "500"]));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) =
        tokio::task::block_in_place(|| cli(env_ref, &["keys", "show", &id, "--json"]));
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["budget"], 10500);
    let (code, _, _) =
        tokio::task::block_in_place(|| cli(env_ref, &["keys", "set", &id, "--budget", "20"]));
    assert_eq!(code, 0);
    assert_eq!(env.account(&id).await["budget"], 20);
    let (code, out, _) =
        tokio::task::block_in_place(|| cli(env_ref, &["keys", "rotate", &id, "--json"]));
    assert_eq!(code, 0);
    assert!(out.contains("czg_"));
    let (code, _, _) = tokio::task::block_in_place(|| cli(env_ref, &["keys", "disable", &id]));
    assert_eq!(code, 0);
    assert_eq!(env.account(&id).await["disabled"], true);
    // Errors: non-zero exit with a clear message.
    let (code, _, err) =
        tokio::task::block_in_place(|| cli(env_ref, &["keys", "show", "key_nope"]));
    assert_ne!(code, 0);
    assert!(err.contains("404") || err.contains("no key"), "{err}");
    env.gate().gate.audit.flush().await.unwrap();
    let (code, out, _) =
        tokio::task::block_in_place(|| cli(env_ref, &["audit", "query", "--key", &id]));
    assert_eq!(code, 0);
    assert!(out.contains("key_rotate"), "{out}");
    let (code, out, err) = tokio::task::block_in_place(|| cli(env_ref, &["audit", "verify"]));
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_an_unreachable_admin_api() {
    let env = Env::new().await;
    let out = Command::new(env!("CARGO_BIN_EXE_chuzhan-gate"))
        .args(["keys", "list", "--admin-url", "http://127.0.0.1:1"])
        .env("GATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    drop(env);
}

#[test]
fn price_command_prints_points_and_exits_by_validity() {
    use std::io::Write;
    let run = |body: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chuzhan-gate"))
            .args(["price"])
            .env_remove("GATE_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(SEED_768);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["points"], 12);
    let (code, out) = run(r#"{"width":"abc"}"#);
    assert_eq!(code, Some(2));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["code"], 1003);
}

#[test]
fn shipped_config_file_parses() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gate.toml");
    chuzhan_gate::config::Config::from_file(&p).unwrap();
}

/// The fleet's gate.toml, embedded in the Kubernetes ConfigMap, parses too (the
/// config sections refuse unknown fields, so a stale name there would stop pods).
#[test]
fn the_kubernetes_configmap_gate_toml_parses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("deploy/k8s/configmap.yaml")).unwrap();
    let (_, block) = yaml
        .split_once("gate.toml: |\n")
        .expect("a gate.toml block");
    let toml: String = block
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[ledger]"), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gate.toml");
    std::fs::write(&p, toml).unwrap();
    let cfg = chuzhan_gate::config::Config::from_file(&p).unwrap();
    assert_eq!(
        cfg.ledger.backend,
        chuzhan_gate::ledger::BackendKind::Postgres
    );
}

#[tokio::test]
async fn lists_keys_a_page_at_a_time_in_id_order() {
    let env = Env::new().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            env.key(json!({"name": format!("k{i}"), "budget": 10 + i}))
                .await
                .0,
        );
    }
    // Without parameters: every key, in order of creation, as before.
    let (s, all) = env.admin(Method::GET, "/admin/keys", None).await;
    assert_eq!(s, 200, "{all}");
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]);
    // Pages of 3 in id order, each key once, with its account.
    let mut seen = Vec::new();
    let mut path = "/admin/keys?limit=3".to_owned();
    loop {
        let (s, page) = env.admin(Method::GET, &path, None).await;
        assert_eq!(s, 200, "{page}");
        let keys = page["keys"].as_array().unwrap();
        assert!(keys.len() <= 3);
        for k in keys {
            assert!(k["budget"].is_u64() && k.get("key").is_none(), "{k}");
            seen.push(k["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/keys?limit=3&after={next}"),
            None => break,
        }
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
    // The last page says there is no next one, even when it is full.
    for query in [
        format!("after={}", sorted[0]),
        format!("limit=6&after={}", sorted[0]),
    ] {
        let (_, last) = env
            .admin(Method::GET, &format!("/admin/keys?{query}"), None)
            .await;
        assert_eq!(last["keys"].as_array().unwrap().len(), 6, "{query}");
        assert!(last["next"].is_null(), "{query}: {last}");
    }
}

#[tokio::test]
async fn refuses_a_bad_page_request_naming_the_parameter() {
    let env = Env::new().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=", "after"),
        ("offset=5", "offset"),
    ] {
        let (s, v) = env
            .admin(Method::GET, &format!("/admin/keys?{query}"), None)
            .await;
        assert_eq!(s, 400, "{query}: {v}");
        assert_eq!(v["field"], field, "{query}: {v}");
    }
}

async fn metrics_text(env: &Env) -> String {
    metrics_of(&env.http, env.gate()).await
}

#[tokio::test]
async fn per_key_gauges_cover_active_keys_unless_configured_otherwise() {
    let env = Env::new().await;
    let (busy, secret) = env.key(json!({"name": "busy", "budget": 100})).await;
    let (idle, _) = env.key(json!({"name": "idle", "budget": 100})).await;
    env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    let text = metrics_text(&env).await;
    assert!(
        text.contains(&format!(
            "gate_budget_remaining_points{{key=\"{busy}\"}} 88"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("gate_reserved_points{{key=\"{busy}\"}} 0")));
    assert!(!text.contains(&idle), "{text}");

    for (gauges, busy_shown, idle_shown) in [("all", true, true), ("none", false, false)] {
        let env = Env::with(Default::default(), |c| {
            c.metrics.key_gauges = serde_json::from_value(json!(gauges)).unwrap();
        })
        .await;
        let (busy, secret) = env.key(json!({"name": "busy", "budget": 100})).await;
        let (idle, _) = env.key(json!({"name": "idle", "budget": 100})).await;
        env.post("/aiapi/v1/draw", &secret, SEED_768).await;
        let text = metrics_text(&env).await;
        let gauge = |k: &str| format!("gate_budget_remaining_points{{key=\"{k}\"}}");
        assert_eq!(text.contains(&gauge(&busy)), busy_shown, "{gauges}: {text}");
        assert_eq!(text.contains(&gauge(&idle)), idle_shown, "{gauges}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_more_than_a_page_of_keys_in_creation_order() {
    let env = Env::new().await;
    let mut made = Vec::new();
    for chunk in 0..17 {
        let batch = futures_util::future::join_all(
            (0..59).map(|i| env.key(json!({"name": format!("c{chunk}-{i}"), "budget": 1}))),
        )
        .await;
        made.extend(batch.into_iter().map(|(id, _)| id));
    }
    assert!(made.len() > 1000);
    let env_ref = &env;
    let (code, out, err) =
        tokio::task::block_in_place(|| cli(env_ref, &["keys", "list", "--json"]));
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(out.trim()).unwrap();
    let (_, direct) = env.admin(Method::GET, "/admin/keys", None).await;
    assert_eq!(listed, direct);
    assert_eq!(listed.as_array().unwrap().len(), made.len());
}
