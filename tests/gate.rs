//! The gate end to end: a real simulator on a local port, a real gate in front of
//! it with a SQLite ledger, real HTTP clients.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn charges_the_seed_price_and_rewrites_used_and_balance() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "alice", "budget": 100})).await;
    let (status, v, headers) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(status, 200);
    assert_eq!(v["code"], 0, "{v}");
    assert!(v["data"]["paintingSign"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(v["data"]["used"], 12);
    assert_eq!(v["data"]["balance"], 88);
    assert!(headers.contains_key("x-request-id"));
    let acc = env.account(&id).await;
    assert_eq!(acc["spent"], 12);
    assert_eq!(acc["reserved"], 0);
    assert_eq!(acc["remaining"], 88);
}

#[tokio::test]
async fn client_detail_shows_the_clients_own_account_not_the_operators() {
    let env = Env::new().await;
    let (_, secret) = env
        .key(json!({"name": "bob's shop", "budget": 50, "concurrency": 3}))
        .await;
    env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    let resp = env
        .http
        .get(env.url("/aiapi/v1/client/detail"))
        .header("Authorization", format!("Bearer {secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.starts_with(r#"{"code":0,"success":true,"msg":"success","data":{"companyName":"bob's shop","balance":38,"#),
        "compact, in the upstream's field order: {text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["code"], 0);
    assert_eq!(v["data"]["balance"], 38);
    assert_eq!(v["data"]["used"], 12);
    assert_eq!(v["data"]["taskLimitCount"], 3);
    assert_eq!(v["data"]["companyName"], "bob's shop");
}

#[tokio::test]
async fn refuses_missing_empty_unknown_and_disabled_keys_with_1001() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    // Missing.
    let resp = env
        .http
        .post(env.url("/aiapi/v1/draw"))
        .body(SEED_768)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["code"], 1001);
    assert_eq!(v["success"], false);
    assert_eq!(v["data"], Value::Null);
    // Empty Auth-Token.
    let (_, v, _) = env.post("/aiapi/v1/draw", "", SEED_768).await;
    assert_eq!(v["code"], 1001);
    // Unknown.
    let (_, v, _) = env
        .post("/aiapi/v1/draw", "czg_000000000000000000000000", SEED_768)
        .await;
    assert_eq!(v["code"], 1001);
    // Disabled: takes effect on the very next request.
    let (s, _) = env
        .admin(Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(s, 200);
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1001);
    assert!(v["msg"].as_str().unwrap().contains("disabled"));
    assert_eq!(env.sim.stats().requests, 0, "nothing reached the upstream");
}

#[tokio::test]
async fn semantic_reject_status_uses_401_402_400() {
    let env = Env::with(Default::default(), |c| {
        c.reject_status = chuzhan_gate::config::RejectStatus::Semantic
    })
    .await;
    let (_, secret) = env.key(json!({"name": "a", "budget": 5})).await;
    let (s, v, _) = env.post("/aiapi/v1/draw", "nope", SEED_768).await;
    assert_eq!((s, v["code"].as_i64()), (401, Some(1001)));
    let (s, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!((s, v["code"].as_i64()), (402, Some(1002)));
    let (s, v, _) = env
        .post("/aiapi/v1/draw", &secret, r#"{"prompt":"x","width":"abc"}"#)
        .await;
    assert_eq!((s, v["code"].as_i64()), (400, Some(1003)));
}

#[tokio::test]
async fn insufficient_budget_is_1002_with_price_and_remaining_and_never_forwarded() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 5})).await;
    let (s, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"code":1002,"success":false,"msg":"insufficient budget: this request costs 12 points, 5 remain","data":null})
    );
    assert_eq!(env.sim.stats().requests, 0);
    let acc = env.account(&id).await;
    assert_eq!(
        (acc["spent"].as_u64(), acc["reserved"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn invalid_body_is_1003_naming_the_field_and_nothing_is_charged() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    for body in [
        r#"{"prompt":"x","width":-5}"#,
        r#"{"prompt":"x","width":"abc"}"#,
        r#"{"prompt":"x","hrScale":4}"#,
        r#"not json"#,
    ] {
        let (_, v, _) = env.post("/aiapi/v1/draw", &secret, body).await;
        assert_eq!(v["code"], 1003, "{body}: {v}");
        assert!(!v["msg"].as_str().unwrap().is_empty());
    }
    let (_, v, _) = env
        .post("/aiapi/v1/draw", &secret, r#"{"prompt":"x","width":"abc"}"#)
        .await;
    assert!(v["msg"].as_str().unwrap().contains("width"), "{v}");
    assert_eq!(env.sim.stats().requests, 0);
    assert_eq!(env.account(&id).await["spent"], 0);
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_refused() {
    let env = Env::new().await;
    let (_, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let (_, v, _) = env.post("/aiapi/v1/secret-admin", &secret, "{}").await;
    assert_eq!(v["code"], 1003);
    assert!(v["msg"].as_str().unwrap().contains("unknown endpoint"));
    let resp = env
        .http
        .get(env.url("/aiapi/v1/draw"))
        .header("Auth-Token", &secret)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["code"], 1003);
    assert_eq!(env.sim.stats().requests, 0);
}

#[tokio::test]
async fn oversized_body_is_413_in_the_envelope_and_not_charged() {
    let env = Env::with(Default::default(), |c| c.limits.body_bytes = 64 * 1024).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let big = format!(
        r#"{{"prompt":"x","modelStyleId":1,"img":"{}"}}"#,
        "A".repeat(100 * 1024)
    );
    let (s, v, _) = env.post("/aiapi/v1/draw", &secret, &big).await;
    assert_eq!(s, 413);
    assert_eq!(v["code"], 1003);
    assert!(v["msg"].as_str().unwrap().contains("too large"));
    assert_eq!(env.account(&id).await["spent"], 0);
}

#[tokio::test]
async fn large_base64_images_within_the_limit_are_forwarded_intact() {
    let env = Env::new().await;
    let (_, secret) = env.key(json!({"name": "a", "budget": 1000})).await;
    let img: String = (0..3 * 1024 * 1024)
        .map(|i| {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[i % 64] as char
        })
        .collect();
    let body = format!(r#"{{"prompt":"x","modelStyleId":1,"img":"{img}"}}"#);
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, &body).await;
    assert_eq!(v["code"], 0, "{v}");
    let last = env.sim.requests().pop().unwrap();
    assert_eq!(last.body.as_ref() as &[u8], body.as_bytes());
}

#[tokio::test]
async fn bodies_reach_the_upstream_byte_for_byte_with_the_operators_token() {
    let env = Env::new().await;
    let (_, secret) = env.key(json!({"name": "a", "budget": 1000})).await;
    let body = "{\n  \"prompt\" : \"\\u4e00\\u4e2a\\u7537\\u5b69 one boy\",\n  \"modelStyleId\": 1,\n  \"modelId\": 18446744073709551615,\n  \"seed\": 9007199254740993,\n  \"width\": \"512\",\n  \"clientExtra\": {\"a\": [1, 2.50, null]}\n}";
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, body).await;
    assert_eq!(v["code"], 0, "{v}");
    let last = env.sim.requests().pop().unwrap();
    assert_eq!(last.body.as_ref() as &[u8], body.as_bytes());
    let token = last
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("auth-token"))
        .map(|(_, v)| v.clone());
    assert_eq!(token.as_deref(), Some("sim-token"));
    assert!(
        !last.headers.iter().any(|(_, v)| v.contains(&secret)),
        "the client's key never reaches the upstream"
    );
}

#[tokio::test]
async fn free_endpoints_pass_through_without_a_charge() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    let task = v["data"]["paintingSign"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        let (_, d, _) = env
            .post(
                "/aiapi/v1/task/detail",
                &secret,
                &json!({"taskId": task}).to_string(),
            )
            .await;
        assert_eq!(d["code"], 0, "{d}");
        assert!(d["data"]["state"].is_string());
    }
    assert_eq!(env.account(&id).await["spent"], 12);
}

#[tokio::test]
async fn predict_consume_is_free() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let body = r#"{"prompt":"x","modelStyleId":1,"width":768,"height":1024,"predictConsume":true}"#;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, body).await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(env.account(&id).await["spent"], 0);
}

#[tokio::test]
async fn upstream_business_error_voids_and_is_forwarded_as_sent() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let body = r#"{"prompt":"[[sim:sensitive]]","modelStyleId":1}"#;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, body).await;
    assert_eq!(v["code"], 1004, "{v}");
    let acc = env.account(&id).await;
    assert_eq!(
        (acc["spent"].as_u64(), acc["reserved"].as_u64()),
        (Some(0), Some(0))
    );
}

async fn fault_case(fault: chuzhan_gate::upstream::sim::Fault) -> (Value, Value) {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    env.sim.set_fault(fault);
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    let acc = env.account(&id).await;
    assert_eq!(acc["reserved"], 0, "no reservation left pending");
    let report = env.gate().gate.ledger.verify().await.unwrap();
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    (v, acc)
}

#[tokio::test]
async fn upstream_http_500_voids() {
    let (_, acc) = fault_case(chuzhan_gate::upstream::sim::Fault::Http500).await;
    assert_eq!(acc["spent"], 0);
}

#[tokio::test]
async fn connection_reset_after_sending_charges_by_default() {
    let (v, acc) = fault_case(chuzhan_gate::upstream::sim::Fault::ResetMidAnswer).await;
    assert_eq!(v["code"], 1, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains("answer was lost"), "{msg}");
    assert!(msg.contains("charged 12 points (88 remain)"), "{msg}");
    assert_eq!(acc["spent"], 12);
}

/// The client gets the gate's envelope saying what it was charged, not the
/// half of a JSON body it could not read.
#[tokio::test]
async fn invalid_json_answer_is_an_unknown_outcome_and_charges_by_default() {
    let (v, acc) = fault_case(chuzhan_gate::upstream::sim::Fault::InvalidJson).await;
    assert_eq!(v["code"], 1, "{v}");
    assert_eq!(v["success"], false, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains("could not be read"), "{msg}");
    assert!(msg.contains("charged 12 points (88 remain)"), "{msg}");
    assert_eq!(acc["spent"], 12);
}

#[tokio::test]
async fn unknown_outcome_policy_void_is_honoured() {
    let env = Env::with(Default::default(), |c| {
        c.upstream.unknown_outcome = chuzhan_gate::config::UnknownOutcome::Void
    })
    .await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    env.sim
        .set_fault(chuzhan_gate::upstream::sim::Fault::ResetMidAnswer);
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1, "{v}");
    assert!(
        v["msg"].as_str().unwrap().ends_with("nothing was charged"),
        "{v}"
    );
    assert_eq!(env.account(&id).await["spent"], 0);
}

#[tokio::test]
async fn refused_connection_voids_with_a_clean_envelope() {
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let env = Env::with(Default::default(), |c| c.upstream.url = dead).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let (s, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(s, 200);
    assert_eq!(v["code"], 1, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("nothing was charged"));
    let acc = env.account(&id).await;
    assert_eq!(
        (acc["spent"].as_u64(), acc["reserved"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn rate_multiplier_scales_the_charge() {
    let env = Env::new().await;
    let (id, secret) = env
        .key(json!({"name": "a", "budget": 100, "rate": 1.5}))
        .await;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["data"]["used"], 18);
    assert_eq!(env.account(&id).await["spent"], 18);
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer_without_a_second_charge() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let send = |body: &'static str| {
        env.http
            .post(env.url("/aiapi/v1/draw"))
            .header("Auth-Token", &secret)
            .header("Idempotency-Key", "order-42")
            .body(body)
            .send()
    };
    let a: Value = send(SEED_768).await.unwrap().json().await.unwrap();
    let b: Value = send(SEED_768).await.unwrap().json().await.unwrap();
    assert_eq!(a["code"], 0);
    assert_eq!(a, b);
    assert_eq!(env.sim.stats().requests, 1);
    assert_eq!(env.account(&id).await["spent"], 12);
    let c: Value = send(r#"{"prompt":"other","modelStyleId":1}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c["code"], 1003, "{c}");
    assert_eq!(env.sim.stats().requests, 1);
}

#[tokio::test]
async fn concurrent_submits_never_overspend() {
    let env = Env::new().await;
    // 20 draws of 12 points fit in 245; 40 are sent at once.
    let (id, secret) = env.key(json!({"name": "a", "budget": 245})).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..40 {
        let http = env.http.clone();
        let url = env.url("/aiapi/v1/draw");
        let secret = secret.clone();
        set.spawn(async move {
            let v = post_as(&http, &url, &secret, &draw_body(&format!("boy {i}"))).await;
            v["code"].as_i64().unwrap()
        });
    }
    let mut ok = 0;
    let mut budget = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            0 => ok += 1,
            1002 => budget += 1,
            other => panic!("unexpected code {other}"),
        }
    }
    assert_eq!((ok, budget), (20, 20));
    let acc = env.account(&id).await;
    assert_eq!(acc["spent"], 240);
    assert_eq!(acc["remaining"], 5);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_loses_nothing() {
    let sim_cfg = chuzhan_gate::upstream::sim::SimConfig {
        latency_ms: 400,
        ..Default::default()
    };
    let mut env = Env::with(sim_cfg, |_| {}).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let http = env.http.clone();
    let url = env.url("/aiapi/v1/draw");
    let s2 = secret.clone();
    let inflight = tokio::spawn(async move {
        http.post(url)
            .header("Auth-Token", s2)
            .body(SEED_768)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let running = env.gate.take().unwrap();
    let cfg = running.gate.cfg.clone();
    running.shutdown().await;
    let v = inflight.await.unwrap();
    assert_eq!(v["code"], 0, "the in-flight request finished: {v}");
    // Reopen the same files: the charge is there and the ledger verifies.
    let again = chuzhan_gate::server::start(cfg).await.unwrap();
    let acc = again
        .gate
        .ledger
        .account(&chuzhan_gate::points::KeyId(id))
        .await
        .unwrap();
    assert_eq!(acc.spent.get(), 12);
    assert_eq!(acc.reserved.get(), 0);
    assert!(again
        .gate
        .ledger
        .verify()
        .await
        .unwrap()
        .mismatches
        .is_empty());
    again.shutdown().await;
}

#[tokio::test]
async fn a_client_hanging_up_while_its_request_waits_leaves_nothing_pending() {
    let env = Env::with(Default::default(), |c| c.audit.queue = 1).await;
    let g = &env.gate().gate;
    // A key made straight in the store, so the audit log has no file yet.
    let secret = "czg_hangup_test_secret_0123456789abcdef";
    let now = chrono::Utc::now();
    let rec = chuzhan_gate::keys::KeyRecord {
        id: chuzhan_gate::points::KeyId("key_hangup".into()),
        name: "h".into(),
        secret_hash: chuzhan_gate::keys::hash_secret(secret),
        secret_prefix: "czg_hang".into(),
        rate_milli: 1000,
        concurrency: None,
        rps: None,
        burst: None,
        disabled: false,
        expires_at: None,
        note: String::new(),
        created_at: now,
        updated_at: now,
    };
    g.ledger
        .open_account(
            &rec.id,
            chuzhan_gate::points::Points(1000),
            chuzhan_gate::ledger::Period::None,
            "t",
            "t",
        )
        .await
        .unwrap();
    let version = g.ledger.put_key(&rec).await.unwrap();
    g.keys.put(&rec, version);
    // The audit log cannot be written: its records queue up and requests wait.
    let dir = g.cfg.audit_dir();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    let sends = (0..4).map(|i| {
        impatient
            .post(env.url("/aiapi/v1/draw"))
            .header("Auth-Token", secret)
            .body(draw_body(&format!("boy {i}")))
            .send()
    });
    let results = futures_util::future::join_all(sends).await;
    assert!(
        results.iter().any(|r| r.is_err()),
        "some clients gave up waiting"
    );
    // The disk comes back; the abandoned requests finish by themselves.
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let mut pending = u64::MAX;
    for _ in 0..100 {
        pending = g.ledger.pending_count().await.unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        pending, 0,
        "no reservation left held by a client that hung up"
    );
    let accepted: u64 = env.sim.stats().submits.values().sum();
    let acc = g.ledger.account(&rec.id).await.unwrap();
    assert_eq!(acc.spent.get(), 12 * accepted);
    assert!(g.ledger.verify().await.unwrap().mismatches.is_empty());
}

#[tokio::test]
async fn clients_hanging_up_at_any_moment_leave_no_reservation_pending() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100_000})).await;
    // Clients that give up after a few hundred microseconds: they hang up during
    // authentication, reservation, forwarding or settlement, at random.
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_micros(700))
        .build()
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        let c = impatient.clone();
        let url = env.url("/aiapi/v1/draw");
        let secret = secret.clone();
        set.spawn(async move {
            let _ = c
                .post(url)
                .header("Auth-Token", secret)
                .body(draw_body(&format!("boy {i}")))
                .send()
                .await;
        });
    }
    while set.join_next().await.is_some() {}
    // Every request that got a reservation settles by itself.
    let ledger = &env.gate().gate.ledger;
    let mut pending = u64::MAX;
    for _ in 0..50 {
        pending = ledger.pending_count().await.unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(pending, 0);
    assert!(ledger.verify().await.unwrap().mismatches.is_empty());
    // Charged exactly what the upstream accepted.
    let accepted: u64 = env.sim.stats().submits.values().sum();
    assert_eq!(env.account(&id).await["spent"], 12 * accepted);
}
