//! Durable reserve+commit pairs per second, for each ledger backend.
//!
//! `cargo bench --bench ledger` — N concurrent tasks, each doing reserve then
//! commit in a loop, spread over 64 accounts or all on one shared account.
//! Every pair is durable before the task moves on (the calls return only after
//! the store committed). The PostgreSQL half runs when `GATE_TEST_POSTGRES_URL`
//! is set. `LEDGER_BENCH_PAIRS` / `LEDGER_BENCH_PG_PAIRS` change the sizes,
//! `LEDGER_BENCH_PG_POOL` the PostgreSQL pool (default 32).
//!
//! Transfer ids are made as the gate makes them (`TransferId::fresh`:
//! time-ordered). `LEDGER_BENCH_IDS=random` uses ids that land anywhere in the
//! id-keyed B-trees instead, to show what that costs.

use chuzhan_gate::clock::{SharedClock, SystemClock};
use chuzhan_gate::ledger::{BackendKind, Ledger, LedgerConfig, Period};
use chuzhan_gate::points::{KeyId, Points, TransferId};
use std::sync::Arc;
use std::time::Instant;

/// Accounts used when the tasks do not share one.
const ACCOUNTS: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(
    ledger: &Ledger,
    backend: &str,
    tasks: usize,
    pairs: usize,
    shared_account: bool,
) -> f64 {
    let run_id = format!("{:08x}", rand::random::<u32>());
    let accounts = if shared_account { 1 } else { ACCOUNTS };
    let label = format!("{backend}, {tasks} tasks, {accounts} account(s)");
    for a in 0..accounts {
        let key = KeyId(format!("bench_{run_id}_{a}"));
        ledger
            .open_account(&key, Points(u64::MAX / 4), Period::Day, "bench", "")
            .await
            .expect("open account");
    }
    let per_task = pairs / tasks;
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let ledger = ledger.clone();
        let key = KeyId(format!("bench_{run_id}_{}", t % accounts));
        let random = std::env::var("LEDGER_BENCH_IDS").is_ok_and(|v| v == "random");
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let id = if random {
                    TransferId(format!("r{:031x}", rand::random::<u128>() >> 4))
                } else {
                    TransferId::fresh()
                };
                ledger.reserve(&key, Points(5), &id).await.expect("reserve");
                ledger.commit(&id, Points(4)).await.expect("commit");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let secs = start.elapsed().as_secs_f64();
    let done = per_task * tasks;
    let rate = done as f64 / secs;
    println!(
        "{label:<36} {done:>8} pairs in {secs:>6.2} s = {rate:>9.0} durable reserve+commit pairs/s"
    );
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clock: SharedClock = Arc::new(SystemClock);
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = LedgerConfig {
            backend: BackendKind::Sqlite,
            path: Some(dir.path().join("bench.db")),
            ..LedgerConfig::default()
        };
        let ledger = Ledger::open(&cfg, clock.clone())
            .await
            .expect("open sqlite");
        let pairs = env_usize("LEDGER_BENCH_PAIRS", 200_000);
        for tasks in [64, 1024, 4096] {
            run(&ledger, "sqlite", tasks, pairs, false).await;
        }
        run(&ledger, "sqlite", 1024, pairs, true).await;
        let report = ledger.verify().await.expect("verify");
        println!(
            "sqlite verify: {} transfers, clean = {}",
            report.transfers,
            report.is_clean()
        );
        drop(ledger);

        match std::env::var("GATE_TEST_POSTGRES_URL") {
            Err(_) => println!("postgres: GATE_TEST_POSTGRES_URL is not set, not run"),
            Ok(url) => {
                let schema = format!("bench_{:08x}", rand::random::<u32>());
                let cfg = LedgerConfig {
                    backend: BackendKind::Postgres,
                    url: Some(url.clone()),
                    schema: Some(schema.clone()),
                    pool_size: env_usize("LEDGER_BENCH_PG_POOL", 32),
                    ..LedgerConfig::default()
                };
                let ledger = Ledger::open(&cfg, clock).await.expect("open postgres");
                let pairs = env_usize("LEDGER_BENCH_PG_PAIRS", 40_000);
                for tasks in [64, 256] {
                    run(&ledger, "postgres", tasks, pairs, false).await;
                }
                run(&ledger, "postgres", 64, pairs / 10, true).await;
                let report = ledger.verify().await.expect("verify");
                println!(
                    "postgres verify: {} transfers, clean = {}",
                    report.transfers,
                    report.is_clean()
                );
                drop(ledger);
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await;
                }
            }
        }
    });
}
