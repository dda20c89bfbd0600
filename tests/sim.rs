//! The simulator of the 触站 upstream, driven over real HTTP on 127.0.0.1.

use bytes::Bytes;
use chuzhan_gate::upstream::sim::{self, Fault, SimArgs, SimConfig, SimHandle};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "sim-token";

async fn start(cfg: SimConfig) -> SimHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::spawn(cfg, listener).await.unwrap()
}

/// Tasks end at once unless a test says otherwise.
fn instant() -> SimConfig {
    SimConfig {
        task_ms: 0,
        ..SimConfig::default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post_raw(
    sim: &SimHandle,
    path: &str,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    client()
        .post(format!("{}{path}", sim.url()))
        .header("Auth-Token", TOKEN)
        .header("Content-Type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
}

/// POSTs `body` with the right token and returns the parsed envelope.
async fn post(sim: &SimHandle, path: &str, body: Value) -> Value {
    let resp = post_raw(sim, path, serde_json::to_vec(&body).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

fn ok_data(env: &Value) -> &Value {
    assert_eq!(env["code"], 0, "{env}");
    assert_eq!(env["success"], true, "{env}");
    &env["data"]
}

async fn draw(sim: &SimHandle, body: Value) -> String {
    let env = post(sim, "/aiapi/v1/draw", body).await;
    ok_data(&env)["paintingSign"].as_str().unwrap().to_owned()
}

fn used(env: &Value) -> u64 {
    ok_data(env)["used"].as_u64().unwrap()
}

#[tokio::test]
async fn the_seed_examples_cost_12_20_and_6() {
    let sim = start(instant()).await;
    let base = post(
        &sim,
        "/aiapi/v1/draw",
        json!({"prompt":"one boy","modelStyleId":1,"width":768,"height":1024}),
    )
    .await;
    let hires = post(
        &sim,
        "/aiapi/v1/draw",
        json!({"prompt":"one boy","modelStyleId":"1","width":"512","height":"512","hrScale":2,"hrSteps":20}),
    )
    .await;
    let upscale = post(
        &sim,
        "/aiapi/v1/draw",
        json!({"prompt":"girl","modelStyleId":"1","width":512,"height":512,"upscale":2}),
    )
    .await;
    assert_eq!([used(&base), used(&hires), used(&upscale)], [12, 20, 6]);
    assert_eq!(ok_data(&upscale)["balance"], 1_000_000_000u64 - 38);
    assert_eq!(ok_data(&upscale)["taskLimitCount"], 1000);
    assert_eq!(sim.stats().points_charged, 38);
}

#[tokio::test]
async fn every_endpoint_answers_its_happy_path() {
    let sim = start(instant()).await;
    let start_balance = sim.balance();

    let account = client()
        .get(format!("{}/aiapi/v1/client/detail", sim.url()))
        .header("Auth-Token", TOKEN)
        .send()
        .await
        .unwrap();
    let account: Value = serde_json::from_slice(&account.bytes().await.unwrap()).unwrap();
    assert_eq!(ok_data(&account)["balance"], start_balance);
    assert_eq!(ok_data(&account)["taskLimitCount"], 1000);
    assert!(ok_data(&account)["companyName"].is_string());

    let task = draw(&sim, json!({"prompt":"cat","modelStyleId":1})).await;
    let detail = post(&sim, "/aiapi/v1/task/detail", json!({"taskId": task})).await;
    let d = ok_data(&detail);
    assert_eq!(d["state"], "success");
    assert_eq!(d["progress"], 1.0);
    assert_eq!(d["audit"], 1);
    assert!(d["imgUrl"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert_eq!(d["images"][0]["imageUrl"], d["imgUrl"]);
    assert_eq!(d["images"][0]["audit"], 1);
    let png = client()
        .get(d["imgUrl"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(png.status(), 200);
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));

    let inpaint = post(
        &sim,
        "/aiapi/v1/inpaint",
        json!({"taskId": task, "prompt":"dog", "mask":"aGk=", "denoisingStrength":0.6}),
    )
    .await;
    assert_eq!(used(&inpaint), 4 + 3);

    let training = post(
        &sim,
        "/aiapi/v1/training",
        json!({"images":["http://x/1.png","http://x/2.png"]}),
    )
    .await;
    assert_eq!(used(&training), 200);
    let training_by_urls = post(
        &sim,
        "/aiapi/v1/training",
        json!({"imageUrls":["http://x/1.png","http://x/2.png","http://x/3.png"]}),
    )
    .await;
    assert_eq!(used(&training_by_urls), 300);
    let train_id = ok_data(&training)["paintingSign"].clone();
    let train = post(&sim, "/aiapi/v1/train/detail", json!({"taskId": train_id})).await;
    assert_eq!(ok_data(&train)["state"], "success");

    let mj_relax = post(&sim, "/aiapi/v1/mj/draw", json!({"prompt":"castle"})).await;
    assert_eq!(used(&mj_relax), 50);
    let mj_fast = post(
        &sim,
        "/aiapi/v1/mj/draw",
        json!({"prompt":"castle","type":"fast"}),
    )
    .await;
    assert_eq!(used(&mj_fast), 80);
    let mj_id = ok_data(&mj_fast)["paintingSign"].clone();
    let describe = post(
        &sim,
        "/aiapi/v1/mj/describe",
        json!({"imageUrl":"http://x/a.png"}),
    )
    .await;
    assert_eq!(used(&describe), 8);
    let upscale = post(
        &sim,
        "/aiapi/v1/mj/upscale",
        json!({"taskId": mj_id, "position": 2}),
    )
    .await;
    assert_eq!(used(&upscale), 6);
    let zoom = post(
        &sim,
        "/aiapi/v1/mj/zoomout",
        json!({"taskId": mj_id, "prompt":"wider", "zoom": 2}),
    )
    .await;
    assert_eq!(used(&zoom), 50);
    let variation = post(
        &sim,
        "/aiapi/v1/mj/variation",
        json!({"taskId": mj_id, "position": "3", "type":"fast"}),
    )
    .await;
    assert_eq!(used(&variation), 80);
    let progress = post(&sim, "/aiapi/v1/mj/task/progress", json!({"taskId": mj_id})).await;
    let p = ok_data(&progress);
    assert_eq!(p["state"], "success");
    assert_eq!(p["progress"], "100%");
    assert_eq!(p["progressValue"], 100);
    assert_eq!(p["images"].as_array().unwrap().len(), 4);
    let described = post(
        &sim,
        "/aiapi/v1/mj/task/progress",
        json!({"taskId": ok_data(&describe)["paintingSign"]}),
    )
    .await;
    assert_eq!(ok_data(&described)["prompts"].as_array().unwrap().len(), 4);

    let wf = post(&sim, "/aiapi/workflow/detail", json!({"workflowId":"1001"})).await;
    assert_eq!(ok_data(&wf)["consume"], 30);
    assert!(ok_data(&wf)["fields"].is_array());
    let run = post(
        &sim,
        "/aiapi/workflow/run",
        json!({"workflowId":1001,"versionId":"1","presetId":"1","inputs":[{"fieldName":"prompt","value":"x"}]}),
    )
    .await;
    assert_eq!(used(&run), 30);
    let wf_task = post(
        &sim,
        "/aiapi/workflow/task/detail",
        json!({"taskId": ok_data(&run)["paintingSign"]}),
    )
    .await;
    assert_eq!(ok_data(&wf_task)["state"], "success");

    let tool = post(
        &sim,
        "/aiapi/utilityTool/detail",
        json!({"utilityToolId":"7"}),
    )
    .await;
    assert!(ok_data(&tool)["options"].is_array());
    let tool_run = post(
        &sim,
        "/aiapi/utilityTool/run",
        json!({"utilityToolId":"7","presetId":"1","options":[],"image":"http://x/i.png"}),
    )
    .await;
    assert_eq!(used(&tool_run), 10);
    let tool_task = post(
        &sim,
        "/aiapi/workflow/task/detail",
        json!({"taskId": ok_data(&tool_run)["paintingSign"]}),
    )
    .await;
    assert_eq!(ok_data(&tool_task)["state"], "success");

    let spent = 4 + 7 + 200 + 300 + 50 + 80 + 8 + 6 + 50 + 80 + 30 + 10;
    let stats = sim.stats();
    assert_eq!(stats.points_charged, spent);
    assert_eq!(stats.balance, start_balance - spent);
    assert_eq!(sim.balance(), start_balance - spent);
    assert_eq!(stats.submits["/aiapi/v1/draw"], 1);
    assert_eq!(stats.submits["/aiapi/v1/training"], 2);
    assert_eq!(stats.submits["/aiapi/v1/mj/draw"], 2);
    assert_eq!(stats.submits["/aiapi/utilityTool/run"], 1);
    assert_eq!(stats.tasks.success, 12);
}

#[tokio::test]
async fn predict_consume_prices_without_charging_or_creating_a_task() {
    let sim = start(instant()).await;
    let env = post(
        &sim,
        "/aiapi/v1/draw",
        json!({"prompt":"x","width":"768","height":"1024","predictConsume":true,"batchSize":2}),
    )
    .await;
    let d = ok_data(&env);
    // 12.0016 × 0.9 × 2 = 21.6 → 22.
    assert_eq!(d["estimateUsed"], 22);
    assert!(!d["consumeDetail"].as_array().unwrap().is_empty());
    assert!(d.get("paintingSign").is_none());
    let stats = sim.stats();
    assert_eq!(stats.points_charged, 0);
    assert_eq!(stats.submits["/aiapi/v1/draw"], 0);
    assert_eq!(stats.tasks, Default::default());
}

#[tokio::test]
async fn bad_parameters_answer_1003() {
    let sim = start(instant()).await;
    let cases = [
        ("/aiapi/v1/draw", json!({"prompt":"x","width":"wide"})),
        (
            "/aiapi/v1/draw",
            json!({"prompt":"x","width":1500,"hrScale":2}),
        ),
        ("/aiapi/v1/draw", json!({"prompt":"x","hrScale":4})),
        ("/aiapi/v1/draw", json!({"modelStyleId":1})),
        (
            "/aiapi/v1/inpaint",
            json!({"taskId":"no-such-task","prompt":"x"}),
        ),
        ("/aiapi/v1/mj/draw", json!({"prompt":"x","type":"turbo"})),
        (
            "/aiapi/v1/mj/upscale",
            json!({"taskId":"no-such-task","position":1}),
        ),
        ("/aiapi/v1/training", json!({"images":[]})),
        ("/aiapi/workflow/run", json!({"workflowId":"9999"})),
        (
            "/aiapi/v1/draw",
            json!({"prompt":"x","callback":"ftp://x","nonce":"n"}),
        ),
    ];
    for (path, body) in cases {
        let env = post(&sim, path, body.clone()).await;
        assert_eq!(env["code"], 1003, "{path} {body} -> {env}");
        assert_eq!(env["success"], false);
        assert!(!env["msg"].as_str().unwrap().is_empty());
    }
    let not_json = post_raw(&sim, "/aiapi/v1/draw", b"{not json".to_vec())
        .await
        .unwrap();
    let env: Value = serde_json::from_slice(&not_json.bytes().await.unwrap()).unwrap();
    assert_eq!(env["code"], 1003);
    assert_eq!(sim.stats().rejections["1003"], 11);
    assert_eq!(sim.stats().points_charged, 0);
}

#[tokio::test]
async fn unknown_task_on_a_detail_endpoint_answers_code_3() {
    let sim = start(instant()).await;
    for path in [
        "/aiapi/v1/task/detail",
        "/aiapi/v1/mj/task/progress",
        "/aiapi/workflow/task/detail",
    ] {
        let env = post(&sim, path, json!({"taskId":"nope"})).await;
        assert_eq!(env["code"], 3, "{env}");
        assert!(env["msg"].as_str().unwrap().contains("nope"));
    }
}

/// Polls until the task ends and returns the distinct states seen, in order.
async fn states_seen(sim: &SimHandle, path: &str, id: &str) -> (Vec<String>, Vec<Value>) {
    let mut states: Vec<String> = Vec::new();
    let mut running = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let env = post(sim, path, json!({"taskId": id})).await;
        let d = ok_data(&env).clone();
        let state = d["state"].as_str().unwrap().to_owned();
        if state == "running" {
            running.push(d.clone());
        }
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if state == "success" || state == "fail" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    (states, running)
}

#[tokio::test]
async fn a_task_moves_from_in_queue_through_running_to_success() {
    let sim = start(SimConfig {
        task_ms: 2000,
        ..SimConfig::default()
    })
    .await;
    let id = draw(&sim, json!({"prompt":"x"})).await;
    assert_eq!(sim.stats().tasks.in_queue, 1);
    let (states, running) = states_seen(&sim, "/aiapi/v1/task/detail", &id).await;
    assert_eq!(states, ["in_queue", "running", "success"]);
    for d in &running {
        let p = d["progress"].as_f64().unwrap();
        assert!(p > 0.0 && p < 1.0, "{d}");
        assert!(!d["current_image"].as_str().unwrap().is_empty());
        assert!(d.get("imgUrl").is_none());
    }
    let stats = sim.stats();
    assert_eq!((stats.tasks.success, stats.tasks.running), (1, 0));
}

#[tokio::test]
async fn a_midjourney_task_reports_progress_as_a_percent_string() {
    let sim = start(SimConfig {
        task_ms: 1200,
        ..SimConfig::default()
    })
    .await;
    let env = post(&sim, "/aiapi/v1/mj/draw", json!({"prompt":"x"})).await;
    let id = ok_data(&env)["paintingSign"].as_str().unwrap().to_owned();
    let (states, running) = states_seen(&sim, "/aiapi/v1/mj/task/progress", &id).await;
    assert_eq!(states.last().map(String::as_str), Some("success"));
    assert!(!running.is_empty());
    for d in &running {
        let text = d["progress"].as_str().unwrap();
        let value = d["progressValue"].as_u64().unwrap();
        assert_eq!(text, format!("{value}%"));
        assert!(value < 100);
    }
}

#[tokio::test]
async fn a_running_task_omits_the_preview_when_asked() {
    let sim = start(SimConfig {
        task_ms: 5000,
        ..SimConfig::default()
    })
    .await;
    let id = draw(&sim, json!({"prompt":"x"})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let env = post(
        &sim,
        "/aiapi/v1/task/detail",
        json!({"taskId": id, "preview": false}),
    )
    .await;
    assert_eq!(ok_data(&env)["state"], "running");
    assert!(ok_data(&env).get("current_image").is_none());
}

#[tokio::test]
async fn wait_util_end_holds_the_request_until_the_task_ends() {
    let sim = start(SimConfig {
        task_ms: 700,
        ..SimConfig::default()
    })
    .await;
    let id = draw(&sim, json!({"prompt":"x"})).await;
    let asked = Instant::now();
    let env = post(
        &sim,
        "/aiapi/v1/task/detail",
        json!({"taskId": id, "waitUtilEnd": true}),
    )
    .await;
    assert_eq!(ok_data(&env)["state"], "success");
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn the_fail_marker_fails_the_task_and_refunds_the_balance() {
    let sim = start(SimConfig {
        task_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let before = sim.balance();
    let id = draw(&sim, json!({"prompt":"a cat [[sim:fail]]"})).await;
    assert_eq!(sim.balance(), before - 4);
    assert_eq!(sim.stats().points_charged, 4);
    let env = post(
        &sim,
        "/aiapi/v1/task/detail",
        json!({"taskId": id, "waitUtilEnd": true}),
    )
    .await;
    let d = ok_data(&env);
    assert_eq!(d["state"], "fail");
    assert_eq!(d["images"], json!([]));
    assert_eq!(sim.balance(), before);
    let stats = sim.stats();
    assert_eq!(stats.points_charged, 0);
    assert_eq!(stats.tasks.fail, 1);
    assert_eq!(stats.submits["/aiapi/v1/draw"], 1);
}

#[tokio::test]
async fn a_fail_rate_of_one_fails_every_task() {
    let sim = start(SimConfig {
        fail_rate: 1.0,
        ..instant()
    })
    .await;
    for _ in 0..3 {
        let id = draw(&sim, json!({"prompt":"x"})).await;
        let env = post(&sim, "/aiapi/v1/task/detail", json!({"taskId": id})).await;
        assert_eq!(ok_data(&env)["state"], "fail");
    }
    let stats = sim.stats();
    assert_eq!((stats.tasks.fail, stats.points_charged), (3, 0));
    assert_eq!(stats.balance, SimConfig::default().balance);
}

/// A callback receiver that answers 500 to the first `failures` calls, then 200.
async fn callback_receiver(failures: usize) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let n = {
                                let mut log = log.lock().unwrap();
                                log.push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                                log.len()
                            };
                            let status = if n <= failures { 500 } else { 200 };
                            let mut resp =
                                hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, hyper::Error>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_callback_is_retried_until_the_receiver_answers_200() {
    let (url, seen) = callback_receiver(2).await;
    let sim = start(SimConfig {
        task_ms: 100,
        callback_retry_base_ms: 100,
        ..SimConfig::default()
    })
    .await;
    let submitted = Instant::now();
    let id = draw(&sim, json!({"prompt":"x","callback": url, "nonce":"n-123"})).await;
    wait_until(|| seen.lock().unwrap().len() >= 3).await;
    // Retries wait base then 2×base: 100 ms of task, 100 ms, 200 ms.
    assert!(submitted.elapsed() >= Duration::from_millis(400));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "no call after the 200: {calls:?}");
    for call in &calls {
        assert_eq!(call["taskId"], id.as_str());
        assert_eq!(call["nonce"], "n-123");
        assert_eq!(call["state"], "success");
        assert_eq!(call["audit"], 1);
        assert!(call["imgUrl"].is_string());
        assert_eq!(call["images"][0]["imageUrl"], call["imgUrl"]);
    }
    let stats = sim.stats();
    assert_eq!(
        (
            stats.callbacks_attempted,
            stats.callbacks_delivered,
            stats.callbacks_abandoned
        ),
        (3, 1, 0)
    );
}

#[tokio::test]
async fn a_callback_is_given_up_after_five_tries() {
    let (url, seen) = callback_receiver(usize::MAX).await;
    let sim = start(SimConfig {
        callback_retry_base_ms: 20,
        ..instant()
    })
    .await;
    draw(&sim, json!({"prompt":"x [[sim:fail]]","callback": url})).await;
    wait_until(|| sim.stats().callbacks_abandoned == 1).await;
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 5);
    assert_eq!(calls[0]["state"], "fail");
    assert_eq!(calls[0]["nonce"], Value::Null);
    assert_eq!(sim.stats().callbacks_attempted, 5);
}

#[tokio::test]
async fn auth_accepts_either_header_and_refuses_missing_empty_or_wrong_tokens() {
    let sim = start(instant()).await;
    let url = format!("{}/aiapi/v1/client/detail", sim.url());
    let code = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 200);
        let env: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        env["code"].as_i64().unwrap()
    };
    let c = client();
    assert_eq!(code(c.get(&url).send().await.unwrap()).await, 1001);
    assert_eq!(
        code(c.get(&url).header("Auth-Token", "").send().await.unwrap()).await,
        1001
    );
    assert_eq!(
        code(
            c.get(&url)
                .header("Auth-Token", "nope")
                .send()
                .await
                .unwrap()
        )
        .await,
        1001
    );
    assert_eq!(
        code(
            c.get(&url)
                .header("Authorization", "Bearer nope")
                .send()
                .await
                .unwrap()
        )
        .await,
        1001
    );
    assert_eq!(
        code(
            c.get(&url)
                .header("Authorization", TOKEN)
                .send()
                .await
                .unwrap()
        )
        .await,
        1001
    );
    assert_eq!(
        code(
            c.get(&url)
                .header("Auth-Token", TOKEN)
                .send()
                .await
                .unwrap()
        )
        .await,
        0
    );
    assert_eq!(
        code(
            c.get(&url)
                .header("Authorization", format!("Bearer {TOKEN}"))
                .send()
                .await
                .unwrap()
        )
        .await,
        0
    );
    let draw = c
        .post(format!("{}/aiapi/v1/draw", sim.url()))
        .header("Auth-Token", "nope")
        .body(r#"{"prompt":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(code(draw).await, 1001);
    let stats = sim.stats();
    assert_eq!(stats.rejections["1001"], 6);
    assert_eq!(stats.submits["/aiapi/v1/draw"], 0);
}

#[tokio::test]
async fn a_submit_above_the_balance_answers_1002() {
    let sim = start(SimConfig {
        balance: 10,
        ..instant()
    })
    .await;
    let env = post(
        &sim,
        "/aiapi/v1/draw",
        json!({"prompt":"x","width":768,"height":1024}),
    )
    .await;
    assert_eq!(env["code"], 1002, "{env}");
    assert_eq!(env["data"], Value::Null);
    let env = post(&sim, "/aiapi/v1/draw", json!({"prompt":"x"})).await;
    assert_eq!(ok_data(&env)["balance"], 6);
    assert_eq!(sim.balance(), 6);
}

#[tokio::test]
async fn more_unfinished_tasks_than_the_limit_answers_1005() {
    let sim = start(SimConfig {
        task_limit: 2,
        task_ms: 2000,
        ..SimConfig::default()
    })
    .await;
    draw(&sim, json!({"prompt":"x"})).await;
    let second = draw(&sim, json!({"prompt":"x"})).await;
    let env = post(&sim, "/aiapi/v1/draw", json!({"prompt":"x"})).await;
    assert_eq!(env["code"], 1005, "{env}");
    assert_eq!(sim.stats().points_charged, 8);
    // Once the tasks end, their slots are free again.
    post(
        &sim,
        "/aiapi/v1/task/detail",
        json!({"taskId": second, "waitUtilEnd": true}),
    )
    .await;
    wait_until(|| sim.stats().tasks.success == 2).await;
    draw(&sim, json!({"prompt":"x"})).await;
}

#[tokio::test]
async fn the_sensitive_marker_answers_1004_without_charging() {
    let sim = start(instant()).await;
    let env = post(
        &sim,
        "/aiapi/v1/draw",
        json!({"prompt":"x [[sim:sensitive]]"}),
    )
    .await;
    assert_eq!(env["code"], 1004);
    let env = post(
        &sim,
        "/aiapi/v1/mj/draw",
        json!({"prompt":"[[sim:sensitive]]"}),
    )
    .await;
    assert_eq!(env["code"], 1004);
    assert_eq!(sim.stats().points_charged, 0);
    assert_eq!(sim.stats().rejections["1004"], 2);
}

#[tokio::test]
async fn requests_are_recorded_byte_for_byte_and_counted() {
    let sim = start(instant()).await;
    let body = "{\n  \"prompt\" : \"\\u732b cat\",\n  \"modelId\": 18446744073709551000,\n  \"seed\": 123456789012345678\n}";
    let resp = client()
        .post(format!("{}/aiapi/v1/draw?x=1", sim.url()))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("X-Custom", "abc")
        .body(body)
        .send()
        .await
        .unwrap();
    let raw = resp.bytes().await.unwrap();
    let text = std::str::from_utf8(&raw).unwrap();
    // Compact, with unescaped slashes.
    assert!(
        text.starts_with(r#"{"code":0,"success":true,"msg":"success","data":{"#),
        "{text}"
    );
    let requests = sim.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/aiapi/v1/draw");
    assert_eq!(r.query.as_deref(), Some("x=1"));
    assert_eq!(r.body, body.as_bytes());
    assert_eq!(r.header("x-custom"), Some("abc"));
    assert_eq!(r.header("Authorization"), Some("Bearer sim-token"));
    assert_eq!(r.headers.get("x-custom").map(String::as_str), Some("abc"));
    // Control routes are neither counted nor recorded.
    client()
        .get(format!("{}/sim/stats", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(sim.stats().requests, 1);
    assert_eq!(sim.requests().len(), 1);
}

#[tokio::test]
async fn the_request_log_keeps_the_last_thousand() {
    let sim = start(instant()).await;
    let c = client();
    for i in 0..1005 {
        c.post(format!("{}/aiapi/v1/task/detail", sim.url()))
            .header("Auth-Token", TOKEN)
            .body(format!(r#"{{"taskId":"t{i}"}}"#))
            .send()
            .await
            .unwrap();
    }
    let log = sim.requests();
    assert_eq!(log.len(), 1000);
    assert_eq!(log[0].body, &br#"{"taskId":"t5"}"#[..]);
    assert_eq!(sim.stats().requests, 1005);
}

#[tokio::test]
async fn the_request_log_drops_old_bodies_past_64_mb() {
    let sim = start(instant()).await;
    let big = vec![b'a'; 25 * 1024 * 1024];
    for _ in 0..3 {
        post_raw(&sim, "/aiapi/v1/task/detail", big.clone())
            .await
            .unwrap();
    }
    let log = sim.requests();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|r| r.body.len() == big.len()));
    assert_eq!(sim.stats().requests, 3);
}

#[tokio::test]
async fn stats_and_faults_are_reachable_over_http() {
    let sim = start(instant()).await;
    draw(&sim, json!({"prompt":"x"})).await;
    let c = client();
    let stats: sim::SimStats = serde_json::from_slice(
        &c.get(format!("{}/sim/stats", sim.url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats, sim.stats());
    assert_eq!(stats.submits["/aiapi/v1/draw"], 1);

    let set = c
        .post(format!("{}/sim/fault", sim.url()))
        .body(r#"{"fault":"http500"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let resp = post_raw(&sim, "/aiapi/v1/draw", br#"{"prompt":"x"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let bad = c
        .post(format!("{}/sim/fault", sim.url()))
        .body(r#"{"fault":"meteor"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    c.post(format!("{}/sim/fault", sim.url()))
        .body(r#"{"fault":"slow","ms":50}"#)
        .send()
        .await
        .unwrap();
    let now: Value = serde_json::from_slice(
        &c.get(format!("{}/sim/fault", sim.url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(now, json!({"fault":"slow","ms":50}));
    c.post(format!("{}/sim/fault", sim.url()))
        .body(r#"{"fault":"none"}"#)
        .send()
        .await
        .unwrap();
    draw(&sim, json!({"prompt":"x"})).await;
}

#[tokio::test]
async fn fault_slow_delays_answers() {
    let sim = start(instant()).await;
    sim.set_fault(Fault::Slow(300));
    let asked = Instant::now();
    draw(&sim, json!({"prompt":"x"})).await;
    assert!(asked.elapsed() >= Duration::from_millis(300));
    sim.set_fault(Fault::None);
    let asked = Instant::now();
    draw(&sim, json!({"prompt":"x"})).await;
    assert!(asked.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn configured_latency_delays_every_answer() {
    let sim = start(SimConfig {
        latency_ms: 200,
        ..instant()
    })
    .await;
    let asked = Instant::now();
    post(&sim, "/aiapi/v1/task/detail", json!({"taskId":"x"})).await;
    assert!(asked.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn fault_http500_answers_500_and_processes_nothing() {
    let sim = start(instant()).await;
    sim.set_fault(Fault::Http500);
    let resp = post_raw(&sim, "/aiapi/v1/draw", br#"{"prompt":"x"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(sim.stats().submits["/aiapi/v1/draw"], 0);
    assert_eq!(sim.stats().requests, 1);
}

#[tokio::test]
async fn fault_invalid_json_answers_200_with_unparseable_body_after_processing() {
    let sim = start(instant()).await;
    sim.set_fault(Fault::InvalidJson);
    let resp = post_raw(&sim, "/aiapi/v1/draw", br#"{"prompt":"x"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert!(!body.is_empty());
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    assert_eq!(sim.stats().submits["/aiapi/v1/draw"], 1);
}

#[tokio::test]
async fn fault_huge_answers_fifty_megabytes() {
    let sim = start(instant()).await;
    sim.set_fault(Fault::Huge);
    let resp = post_raw(&sim, "/aiapi/v1/task/detail", br#"{"taskId":"x"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert!(body.len() >= 50 * 1024 * 1024, "{}", body.len());
    assert!(body.starts_with(br#"{"code":0"#));
}

#[tokio::test]
async fn fault_reset_mid_answer_breaks_the_body_after_the_headers() {
    let sim = start(instant()).await;
    sim.set_fault(Fault::ResetMidAnswer);
    let resp = post_raw(&sim, "/aiapi/v1/draw", br#"{"prompt":"x"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());
    // The upstream did the work before the connection broke.
    assert_eq!(sim.stats().submits["/aiapi/v1/draw"], 1);

    let (head, body) = raw_exchange(&sim, "/aiapi/v1/draw", r#"{"prompt":"x"}"#).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    assert!(
        !body.is_empty() && body.len() < length,
        "{} of {length}",
        body.len()
    );
}

#[tokio::test]
async fn fault_reset_before_answer_closes_without_a_byte() {
    let sim = start(instant()).await;
    sim.set_fault(Fault::ResetBeforeAnswer);
    assert!(
        post_raw(&sim, "/aiapi/v1/draw", br#"{"prompt":"x"}"#.to_vec())
            .await
            .is_err()
    );
    let (head, body) = raw_exchange(&sim, "/aiapi/v1/draw", r#"{"prompt":"x"}"#).await;
    assert_eq!((head.as_str(), body.len()), ("", 0));
    let stats = sim.stats();
    assert_eq!(stats.submits["/aiapi/v1/draw"], 0);
    assert_eq!(stats.requests, 2);
    assert_eq!(sim.requests()[1].body, &br#"{"prompt":"x"}"#[..]);
}

/// Sends one request over a raw TCP connection and reads until the server closes it.
async fn raw_exchange(sim: &SimHandle, path: &str, body: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(sim.addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: sim\r\nAuth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
    match got.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (
            String::from_utf8_lossy(&got[..i]).into_owned(),
            got[i + 4..].to_vec(),
        ),
        None => (String::from_utf8_lossy(&got).into_owned(), Vec::new()),
    }
}

#[tokio::test]
async fn fault_cut_long_poll_drops_only_long_polls() {
    let sim = start(SimConfig {
        task_ms: 5000,
        ..SimConfig::default()
    })
    .await;
    let id = draw(&sim, json!({"prompt":"x"})).await;
    sim.set_fault(Fault::CutLongPoll);
    let asked = Instant::now();
    let cut = post_raw(
        &sim,
        "/aiapi/v1/task/detail",
        serde_json::to_vec(&json!({"taskId": id, "waitUtilEnd": true})).unwrap(),
    )
    .await;
    assert!(cut.is_err());
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let env = post(&sim, "/aiapi/v1/task/detail", json!({"taskId": id})).await;
    assert!(ok_data(&env)["state"].is_string());
}

#[tokio::test]
async fn fault_sensitive_refuses_submits_but_not_details() {
    let sim = start(instant()).await;
    let id = draw(&sim, json!({"prompt":"x"})).await;
    sim.set_fault(Fault::Sensitive);
    let env = post(&sim, "/aiapi/v1/draw", json!({"prompt":"x"})).await;
    assert_eq!(env["code"], 1004);
    let env = post(&sim, "/aiapi/v1/task/detail", json!({"taskId": id})).await;
    assert_eq!(ok_data(&env)["state"], "success");
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_refused() {
    let sim = start(instant()).await;
    let resp = post_raw(&sim, "/aiapi/v1/nothing", b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client()
        .get(format!("{}/aiapi/v1/draw", sim.url()))
        .header("Auth-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let sim = start(instant()).await;
    let addr = sim.addr;
    draw(&sim, json!({"prompt":"x"})).await;
    sim.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
}

#[tokio::test]
async fn the_cli_flags_have_the_documented_defaults() {
    use clap::Parser;
    let cli = Cli::parse_from(["sim"]);
    let cfg = cli.sim.to_config().unwrap();
    assert_eq!(cli.sim.listen.to_string(), "127.0.0.1:8181");
    assert_eq!(cfg.token, "sim-token");
    assert_eq!(
        (cfg.task_ms, cfg.latency_ms, cfg.balance),
        (600, 0, 1_000_000_000)
    );
    assert_eq!(cfg.workflows, vec![("1001".to_owned(), 30)]);
    let cli = Cli::parse_from([
        "sim",
        "--fail-rate",
        "0.2",
        "--workflow",
        "77=12",
        "--task-ms",
        "0",
    ]);
    let cfg = cli.sim.to_config().unwrap();
    assert_eq!((cfg.fail_rate, cfg.task_ms), (0.2, 0));
    assert_eq!(cfg.workflows, vec![("77".to_owned(), 12)]);
    assert!(Cli::parse_from(["sim", "--fail-rate", "1.5"])
        .sim
        .to_config()
        .is_err());
}

#[tokio::test]
async fn the_cli_exits_nonzero_when_the_port_is_taken() {
    use clap::Parser;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cli = Cli::parse_from(["sim", "--listen", &addr]);
    assert_eq!(sim::run_cli(cli.sim).await, 1);
}
