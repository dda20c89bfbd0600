//! `chuzhan-gate ledger verify`: recompute every account from its transfers.

use super::{Ledger, LedgerConfig};
use crate::clock::{SharedClock, SystemClock};
use std::sync::Arc;

/// Opens the ledger from `cfg`, prints a summary, and returns the exit code:
/// 0 when clean, 1 on any mismatch, 2 when the ledger could not be read.
///
/// Opening resolves crash-orphaned reservations by the configured policy, as
/// `serve` would; for the embedded ledger run it while `serve` is stopped.
pub async fn verify_cmd(cfg: &LedgerConfig) -> i32 {
    let clock: SharedClock = Arc::new(SystemClock);
    let ledger = match Ledger::open(cfg, clock).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ledger verify: cannot open the ledger: {e}");
            return 2;
        }
    };
    let report = match ledger.verify().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ledger verify: {e}");
            return 2;
        }
    };
    let _ = ledger.close().await;
    println!(
        "ledger verify: {} accounts, {} transfers, {} pending, {} mismatches",
        report.accounts,
        report.transfers,
        report.pending,
        report.mismatches.len()
    );
    for m in &report.mismatches {
        println!("  mismatch: {m}");
    }
    if report.is_clean() {
        println!("ledger verify: clean");
        0
    } else {
        1
    }
}
