//! Following tasks to their end: refunds (via poll, callback, background check),
//! callbacks (duplicates, forgeries), ownership, inpaint and workflow prices,
//! per-key limits, and a restart in the middle of a task's life.

mod common;

use chuzhan_gate::upstream::sim::SimConfig;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FAIL_DRAW: &str =
    r#"{"prompt":"one boy [[sim:fail]]","modelStyleId":1,"width":768,"height":1024}"#;

fn slow_tasks() -> SimConfig {
    SimConfig {
        task_ms: 300,
        callback_retry_base_ms: 50,
        ..Default::default()
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn submit(env: &Env, secret: &str, body: &str) -> String {
    let (_, v, _) = env.post("/aiapi/v1/draw", secret, body).await;
    assert_eq!(v["code"], 0, "{v}");
    v["data"]["paintingSign"].as_str().unwrap().to_owned()
}

async fn wait_detail(env: &Env, secret: &str, task: &str) -> Value {
    let (_, v, _) = env
        .post(
            "/aiapi/v1/task/detail",
            secret,
            &json!({"taskId": task, "waitUtilEnd": true}).to_string(),
        )
        .await;
    v
}

async fn audit_lines(env: &Env, decision: &str) -> Vec<Value> {
    env.gate().gate.audit.flush().await.unwrap();
    let f = chuzhan_gate::audit::Filter {
        decision: Some(decision.into()),
        ..Default::default()
    };
    chuzhan_gate::audit::query(&env.gate().gate.cfg.audit_dir(), &f).unwrap()
}

async fn eventually(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn refunds_a_failed_task_once_when_polled_even_by_concurrent_pollers() {
    let env = Env::with(slow_tasks(), |_| {}).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let task = submit(&env, &secret, FAIL_DRAW).await;
    assert_eq!(env.account(&id).await["spent"], 12);
    let mut polls = Vec::new();
    for _ in 0..8 {
        polls.push(wait_detail(&env, &secret, &task));
    }
    for v in futures_util::future::join_all(polls).await {
        assert_eq!(v["data"]["state"], "fail", "{v}");
    }
    wait_detail(&env, &secret, &task).await;
    let acc = env.account(&id).await;
    assert_eq!(acc["spent"], 0);
    assert_eq!(acc["remaining"], 100);
    assert_eq!(audit_lines(&env, "refund").await.len(), 1);
    assert!(env
        .gate()
        .gate
        .ledger
        .verify()
        .await
        .unwrap()
        .mismatches
        .is_empty());
}

#[tokio::test]
async fn a_successful_task_keeps_its_charge() {
    let env = Env::with(slow_tasks(), |_| {}).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let task = submit(&env, &secret, SEED_768).await;
    let v = wait_detail(&env, &secret, &task).await;
    assert_eq!(v["data"]["state"], "success");
    assert_eq!(env.account(&id).await["spent"], 12);
    assert_eq!(audit_lines(&env, "task_success").await.len(), 1);
}

#[tokio::test]
async fn refunds_a_failed_task_found_by_the_background_check() {
    let env = Env::with(slow_tasks(), |c| c.tasks.check_interval_secs = 1).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    submit(&env, &secret, FAIL_DRAW).await;
    // Nobody polls: the gate asks the upstream by itself.
    let ok = eventually(async || env.account(&id).await["spent"] == 0).await;
    assert!(ok, "the background check refunded the failed task");
    let refunds = audit_lines(&env, "refund").await;
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["source"], "check");
}

/// Tasks that ended upstream with nobody polling and no callback pile up; one
/// round of the check works them all off, not `check_batch` per interval.
#[tokio::test]
async fn the_background_check_works_off_a_backlog_in_one_round() {
    const TASKS: usize = 24;
    let env = Env::with(slow_tasks(), |c| {
        c.tasks.check_interval_secs = 1;
        c.tasks.check_batch = 1;
    })
    .await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 1000})).await;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        tasks.push(submit(&env, &secret, FAIL_DRAW).await);
    }
    assert_eq!(env.account(&id).await["spent"], 12 * TASKS as i64);
    // One task listed at a time: a check of one task per interval would take
    // 24 s; `eventually` gives up after 10.
    let ok = eventually(async || env.account(&id).await["spent"] == 0).await;
    assert!(ok, "spent {}", env.account(&id).await["spent"]);
    let refunds = audit_lines(&env, "refund").await;
    assert_eq!(refunds.len(), TASKS, "one refund per task");
    let mut refunded: Vec<&str> = refunds
        .iter()
        .inspect(|r| assert_eq!(r["source"], "check", "{r}"))
        .map(|r| r["task_id"].as_str().unwrap())
        .collect();
    refunded.sort_unstable();
    tasks.sort_unstable();
    assert_eq!(refunded, tasks);
}

/// A client's callback receiver: records every body, answers 500 `fail_first` times.
async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::<Value>::new()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cb", l.local_addr().unwrap());
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let g = g.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            let b = req.into_body().collect().await.unwrap().to_bytes();
                            let n = {
                                let mut v = g.lock().unwrap();
                                v.push(serde_json::from_slice(&b).unwrap_or(Value::Null));
                                v.len()
                            };
                            let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            if n <= fail_first {
                                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, got)
}

async fn callback_env(task_ms: u64) -> Env {
    let port = free_port();
    let sim = SimConfig {
        task_ms,
        ..slow_tasks()
    };
    Env::with(sim, move |c| {
        c.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.public_url = Some(format!("http://127.0.0.1:{port}"));
        c.tasks.callback_retry_base_ms = 50;
        c.tasks.check_interval_secs = 3600;
    })
    .await
}

#[tokio::test]
async fn refunds_via_callback_and_forwards_it_with_the_clients_own_nonce() {
    let env = callback_env(300).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    // The client's receiver refuses the first try: the gate tries again.
    let (url, got) = receiver(1).await;
    let body =
        json!({"prompt": "boy [[sim:fail]]", "modelStyleId": 1, "width": 768, "height": 1024,
                      "callback": url, "nonce": "client-nonce-1"})
        .to_string();
    let task = submit(&env, &secret, &body).await;
    // The upstream was given the gate's callback and nonce, not the client's.
    let sent = env
        .sim
        .requests()
        .into_iter()
        .rfind(|r| r.path == "/aiapi/v1/draw")
        .unwrap();
    let sent: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(
        sent["callback"],
        format!(
            "{}/gate/callback",
            env.gate().gate.cfg.public_url.clone().unwrap()
        )
    );
    let gate_nonce = sent["nonce"].as_str().unwrap();
    assert_eq!(gate_nonce.len(), 32);
    assert_ne!(gate_nonce, "client-nonce-1");
    let ok = eventually(async || got.lock().unwrap().len() >= 2).await;
    assert!(
        ok,
        "the client's callback was retried until it answered 200"
    );
    let last = got.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["nonce"], "client-nonce-1");
    assert_eq!(last["taskId"], task.as_str());
    assert_eq!(last["state"], "fail");
    assert_eq!(env.account(&id).await["spent"], 0);
    let refunds = audit_lines(&env, "refund").await;
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["source"], "callback");
}

#[tokio::test]
async fn duplicate_callbacks_refund_once_and_forged_ones_are_refused_and_audited() {
    // The task outlives the test: only the callbacks sent here end it.
    let env = callback_env(120_000).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let (url, _got) = receiver(0).await;
    let body =
        json!({"prompt": "boy", "modelStyleId": 1, "width": 768, "height": 1024, "callback": url})
            .to_string();
    let task = submit(&env, &secret, &body).await;
    let sent = env
        .sim
        .requests()
        .into_iter()
        .rfind(|r| r.path == "/aiapi/v1/draw")
        .unwrap();
    let nonce = serde_json::from_slice::<Value>(&sent.body).unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let cb = |nonce: &str, task: &str| {
        env.http
            .post(env.url("/gate/callback"))
            .body(
                json!({"taskId": task, "nonce": nonce, "state": "fail", "progress": 1}).to_string(),
            )
            .send()
    };
    // Forged: wrong nonce, unknown task. Refused, nothing refunded.
    assert_eq!(
        cb("0123456789abcdef0123456789abcdef", &task)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(cb(&nonce, "no-such-task").await.unwrap().status(), 403);
    assert_eq!(env.account(&id).await["spent"], 12);
    assert_eq!(audit_lines(&env, "callback_refused").await.len(), 2);
    // Duplicates, concurrently: one refund.
    let rs = futures_util::future::join_all((0..5).map(|_| cb(&nonce, &task))).await;
    for r in rs {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(env.account(&id).await["spent"], 0);
    assert_eq!(audit_lines(&env, "refund").await.len(), 1);
}

#[tokio::test]
async fn a_client_cannot_read_or_repaint_another_keys_task() {
    let env = Env::with(slow_tasks(), |_| {}).await;
    let (_, alice) = env.key(json!({"name": "alice", "budget": 100})).await;
    let (bob_id, bob) = env.key(json!({"name": "bob", "budget": 100})).await;
    let task = submit(&env, &alice, SEED_768).await;
    let before = env.sim.stats().requests;
    let (_, v, _) = env
        .post(
            "/aiapi/v1/task/detail",
            &bob,
            &json!({"taskId": task}).to_string(),
        )
        .await;
    assert_eq!(v["code"], 3, "{v}");
    assert_eq!(v["msg"], "task does not exist");
    // The same answer as for a task that does not exist at all.
    let (_, w, _) = env
        .post("/aiapi/v1/task/detail", &bob, r#"{"taskId":"nope"}"#)
        .await;
    assert_eq!(v, w);
    let (_, v, _) = env
        .post(
            "/aiapi/v1/inpaint",
            &bob,
            &json!({"taskId": task, "prompt": "dog", "mask": "aGk="}).to_string(),
        )
        .await;
    assert_eq!(v["code"], 3, "{v}");
    assert_eq!(
        env.sim.stats().requests,
        before,
        "nothing reached the upstream"
    );
    assert_eq!(env.account(&bob_id).await["spent"], 0);
    // Alice reads her own.
    let (_, v, _) = env
        .post(
            "/aiapi/v1/task/detail",
            &alice,
            &json!({"taskId": task}).to_string(),
        )
        .await;
    assert_eq!(v["code"], 0);
}

#[tokio::test]
async fn inpaint_costs_the_original_charge_plus_three() {
    let env = Env::with(slow_tasks(), |_| {}).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let task = submit(&env, &secret, SEED_768).await;
    wait_detail(&env, &secret, &task).await;
    let (_, v, _) = env
        .post(
            "/aiapi/v1/inpaint",
            &secret,
            &json!({"taskId": task, "prompt": "dog", "mask": "aGk=", "denoisingStrength": 0.6})
                .to_string(),
        )
        .await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["used"], 15);
    assert_eq!(env.account(&id).await["spent"], 27);
}

#[tokio::test]
async fn workflow_runs_cost_the_workflows_consume() {
    let env = Env::with(slow_tasks(), |_| {}).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let body = json!({"workflowId": "1001", "versionId": "1", "presetId": "1",
                      "inputs": [{"fieldName": "prompt", "value": "x"}]})
    .to_string();
    let (_, v, _) = env.post("/aiapi/workflow/run", &secret, &body).await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(env.account(&id).await["spent"], 30);
    // The second run uses the cached consume: one detail fetch in all.
    env.post("/aiapi/workflow/run", &secret, &body).await;
    assert_eq!(env.account(&id).await["spent"], 60);
    let details = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/aiapi/workflow/detail")
        .count();
    assert_eq!(details, 1);
}

#[tokio::test]
async fn concurrency_limit_answers_1005_until_a_task_ends() {
    let env = Env::with(slow_tasks(), |_| {}).await;
    let (id, secret) = env
        .key(json!({"name": "a", "budget": 100, "concurrency": 1}))
        .await;
    let task = submit(&env, &secret, SEED_768).await;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1005, "{v}");
    assert_eq!(env.account(&id).await["reserved"], 0, "nothing reserved");
    wait_detail(&env, &secret, &task).await;
    submit(&env, &secret, SEED_768).await;
}

#[tokio::test]
async fn rate_limit_answers_1005_before_anything_is_reserved() {
    let env = Env::new().await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100, "rps": 1})).await;
    submit(&env, &secret, SEED_768).await;
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1005, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("rate limit"));
    assert_eq!(env.account(&id).await["spent"], 12);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    submit(&env, &secret, SEED_768).await;
}

#[tokio::test]
async fn a_task_survives_a_restart_and_is_refunded_after_it() {
    let sim_cfg = SimConfig {
        task_ms: 1500,
        ..Default::default()
    };
    let mut env = Env::with(sim_cfg, |_| {}).await;
    let (id, secret) = env
        .key(json!({"name": "a", "budget": 100, "concurrency": 1}))
        .await;
    let task = submit(&env, &secret, FAIL_DRAW).await;
    let running = env.gate.take().unwrap();
    let cfg = running.gate.cfg.clone();
    running.shutdown().await;
    env.gate = Some(chuzhan_gate::server::start(cfg).await.unwrap());
    // Still open after the restart: it still counts against the limit.
    let (_, v, _) = env.post("/aiapi/v1/draw", &secret, SEED_768).await;
    assert_eq!(v["code"], 1005, "{v}");
    // And the new gate still knows whose it is and refunds it.
    let v = wait_detail(&env, &secret, &task).await;
    assert_eq!(v["data"]["state"], "fail", "{v}");
    assert_eq!(env.account(&id).await["spent"], 0);
    submit(&env, &secret, SEED_768).await;
}

/// A crash between a failed task's end and its refund (the end is recorded,
/// the refund is not) must not keep the client's points: the next start makes
/// the refund. The crash is stood in for by recording the end directly, which
/// is the first of the two ledger writes `observe_end` makes.
#[tokio::test]
async fn a_refund_cut_off_after_the_tasks_end_is_made_at_the_next_start() {
    let mut env = Env::with(slow_tasks(), |_| {}).await;
    let (id, secret) = env.key(json!({"name": "a", "budget": 100})).await;
    let task = submit(&env, &secret, FAIL_DRAW).await;
    let won = env
        .gate()
        .gate
        .ledger
        .end_task(&task, chuzhan_gate::tasks::TaskState::Fail)
        .await
        .unwrap();
    assert!(won);
    // Nothing refunds it while this gate runs: polls see the end as recorded.
    let v = wait_detail(&env, &secret, &task).await;
    assert_eq!(v["data"]["state"], "fail", "{v}");
    assert_eq!(env.account(&id).await["spent"], 12);
    assert!(audit_lines(&env, "refund").await.is_empty());

    let running = env.gate.take().unwrap();
    let cfg = running.gate.cfg.clone();
    running.shutdown().await;
    env.gate = Some(chuzhan_gate::server::start(cfg).await.unwrap());
    let ok = eventually(async || env.account(&id).await["spent"] == 0).await;
    assert!(ok, "the restarted gate made the refund");
    // Its audit record follows the refund.
    let ok = eventually(async || !audit_lines(&env, "refund").await.is_empty()).await;
    assert!(ok, "the refund was audited");
    let refunds = audit_lines(&env, "refund").await;
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["source"], "sweep");
    assert_eq!(refunds[0]["task_id"], task.as_str());
    // Made once: a second start finds nothing more to do.
    let running = env.gate.take().unwrap();
    let cfg = running.gate.cfg.clone();
    running.shutdown().await;
    env.gate = Some(chuzhan_gate::server::start(cfg).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.account(&id).await["spent"], 0);
    assert_eq!(audit_lines(&env, "refund").await.len(), 1);
    let report = env.gate().gate.ledger.verify().await.unwrap();
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
}
