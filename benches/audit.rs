//! Audit log throughput: the writer thread with real files and fdatasync, and the
//! readers over a 10 000-record log.

use chuzhan_gate::audit::{query, tail, verify, Audit, AuditConfig, Filter};
use chuzhan_gate::clock::{SharedClock, SystemClock};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

const N: u64 = 10_000;

fn rec(i: u64) -> Map<String, Value> {
    match json!({
        "kind": "decision",
        "request_id": format!("req-{i:012}"),
        "key_id": format!("k{}", i % 50),
        "key_name": "alice",
        "endpoint": "/aiapi/v1/draw/txt2img",
        "decision": if i % 10 == 0 { "rejected" } else { "admitted" },
        "price": {"base": 4, "hr_scale": 2, "batch": 2, "table": "2026-11"},
        "points": 16,
        "remaining": 98_000 - i,
        "latency_ms": 12,
    }) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn write(audit: &Audit, tasks: u64) {
    let per_task = N / tasks;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let audit = audit.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let _ = audit.record(rec(t * per_task + i)).await;
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let _ = audit.flush().await;
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("audit");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(N));
    for tasks in [1u64, 16] {
        g.bench_function(format!("record_{N}_from_{tasks}_tasks_then_flush"), |b| {
            b.iter_batched(
                || {
                    let tmp = tempfile::tempdir().expect("tempdir");
                    let cfg = AuditConfig {
                        dir: Some(tmp.path().to_path_buf()),
                        ..AuditConfig::default()
                    };
                    let clock: SharedClock = Arc::new(SystemClock);
                    let (audit, writer) = rt.block_on(Audit::open(&cfg, clock)).expect("open");
                    (tmp, audit, writer)
                },
                |(tmp, audit, writer)| {
                    rt.block_on(async {
                        write(&audit, tasks).await;
                        writer.shutdown().await;
                    });
                    tmp
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }

    // One log for the readers.
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = AuditConfig {
        dir: Some(tmp.path().to_path_buf()),
        max_file_bytes: 1024 * 1024,
        ..AuditConfig::default()
    };
    rt.block_on(async {
        let clock: SharedClock = Arc::new(SystemClock);
        let (audit, writer) = Audit::open(&cfg, clock).await.expect("open");
        write(&audit, 1).await;
        writer.shutdown().await;
    });
    g.bench_function(format!("verify_{N}"), |b| {
        b.iter(|| verify(tmp.path()).expect("verify"))
    });
    let filter = Filter {
        key: Some("k7".into()),
        limit: Some(50),
        ..Filter::default()
    };
    g.bench_function(format!("query_{N}_key_limit_50"), |b| {
        b.iter(|| query(tmp.path(), &filter).expect("query"))
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("tail_100", |b| {
        b.iter(|| tail(tmp.path(), 100).expect("tail"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
