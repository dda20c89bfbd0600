//! Prometheus metrics, kept in lock-free counters and rendered as text on demand.
//!
//! A hand-rolled registry rather than a metrics crate: the set is small and fixed,
//! and counters keyed by label in a `DashMap` of atomics cost one hash per update.

use dashmap::DashMap;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which keys get the per-key gauges (`gate_budget_remaining_points`,
/// `gate_reserved_points`) on `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyGauges {
    /// Keys that moved points since the gate started (those with a
    /// `gate_points_total` series): the ones whose budgets change.
    #[default]
    Active,
    /// Every key: one series per key and gauge, about 11 MB per scrape with
    /// 100,000 keys, and the gate builds all of it in memory for each scrape.
    All,
    /// None.
    None,
}

/// The `[metrics]` section of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Which keys get per-key gauges.
    pub key_gauges: KeyGauges,
}

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// A fixed-bucket histogram.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// The gate's metrics.
#[derive(Default)]
pub struct Metrics {
    requests: DashMap<(&'static str, &'static str), AtomicU64>,
    points: DashMap<(String, &'static str), AtomicU64>,
    upstream_status: DashMap<u16, AtomicU64>,
    upstream_errors: AtomicU64,
    /// Time the upstream took to answer.
    pub upstream_latency: Histogram,
    /// Time the gate itself added (total minus upstream).
    pub gate_overhead: Histogram,
    /// Time a settlement (commit or void) took to become durable.
    pub ledger_commit: Histogram,
    drift_requests: AtomicU64,
    drift_over: AtomicU64,
    drift_under: AtomicU64,
    expiry_rounds: [AtomicU64; 3],
}

/// How a round of the expiry sweep (`server::sweep_expired`) ended.
#[derive(Debug, Clone, Copy)]
pub enum ExpiryRound {
    /// It resolved what had expired (perhaps nothing).
    Swept = 0,
    /// The shared store had not been reachable long enough: it only checked it.
    Waited = 1,
    /// The store did not answer.
    Failed = 2,
}

impl Metrics {
    /// One client request ended.
    pub fn request_done(
        &self,
        endpoint: &'static str,
        decision: &'static str,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        self.requests
            .entry((endpoint, decision))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
        if let Some(u) = upstream {
            self.upstream_latency.observe(u);
        }
        self.gate_overhead
            .observe(total.saturating_sub(upstream.unwrap_or_default()));
    }

    /// Requests answered so far (all endpoints and decisions).
    pub fn requests_total(&self) -> u64 {
        self.gate_overhead.count.load(Ordering::Relaxed)
    }

    /// One upstream call ended (`None`: no answer).
    pub fn upstream_done(&self, status: Option<u16>) {
        match status {
            Some(s) => {
                self.upstream_status
                    .entry(s)
                    .or_default()
                    .fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.upstream_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Points moved for a key (`kind`: reserved, charged, voided, refunded).
    pub fn points(&self, key: &str, kind: &'static str, n: u64) {
        if let Some(c) = self.points.get(&(key.to_owned(), kind)) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.points
            .entry((key.to_owned(), kind))
            .or_default()
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Keys that moved points since start, sorted.
    pub fn active_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.points.iter().map(|e| e.key().0.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The upstream's `used` differed from the gate's price.
    pub fn price_drift(&self, quoted: u64, used: u64) {
        self.drift_requests.fetch_add(1, Ordering::Relaxed);
        if used > quoted {
            self.drift_over.fetch_add(used - quoted, Ordering::Relaxed);
        } else {
            self.drift_under.fetch_add(quoted - used, Ordering::Relaxed);
        }
    }

    /// Render all metrics in the Prometheus text format.
    /// One round of the expiry sweep ended.
    pub fn expiry_round(&self, how: ExpiryRound) {
        self.expiry_rounds[how as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# TYPE gate_expiry_rounds_total counter\n");
        for (i, outcome) in ["swept", "waited", "failed"].iter().enumerate() {
            let _ = writeln!(
                out,
                "gate_expiry_rounds_total{{outcome=\"{outcome}\"}} {}",
                self.expiry_rounds[i].load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE gate_requests_total counter\n");
        for e in self.requests.iter() {
            let (ep, d) = e.key();
            let _ = writeln!(
                out,
                "gate_requests_total{{endpoint=\"{ep}\",decision=\"{d}\"}} {}",
                e.value().load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE gate_points_total counter\n");
        for e in self.points.iter() {
            let (k, kind) = e.key();
            let _ = writeln!(
                out,
                "gate_points_total{{key=\"{k}\",kind=\"{kind}\"}} {}",
                e.value().load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE gate_upstream_responses_total counter\n");
        for e in self.upstream_status.iter() {
            let _ = writeln!(
                out,
                "gate_upstream_responses_total{{status=\"{}\"}} {}",
                e.key(),
                e.value().load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE gate_upstream_errors_total counter\ngate_upstream_errors_total {}",
            self.upstream_errors.load(Ordering::Relaxed)
        );
        self.upstream_latency
            .render("gate_upstream_latency_seconds", &mut out);
        self.gate_overhead.render("gate_overhead_seconds", &mut out);
        self.ledger_commit
            .render("gate_ledger_commit_seconds", &mut out);
        let _ = writeln!(
            out,
            "# TYPE gate_price_drift_requests_total counter\ngate_price_drift_requests_total {}",
            self.drift_requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE gate_price_drift_points_total counter\n\
             gate_price_drift_points_total{{direction=\"upstream_higher\"}} {}\n\
             gate_price_drift_points_total{{direction=\"upstream_lower\"}} {}",
            self.drift_over.load(Ordering::Relaxed),
            self.drift_under.load(Ordering::Relaxed)
        );
        out
    }
}
