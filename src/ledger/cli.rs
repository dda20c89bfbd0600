//! `chuzhan-gate ledger verify`: recompute every account from its transfers.

use super::{Ledger, LedgerConfig};

/// Opens the ledger from `cfg`, prints a summary, and returns the exit code:
/// 0 when clean, 1 on any mismatch, 2 when the ledger could not be read.
///
/// It only reads (see [`Ledger::verify_store`]), so it is safe while `serve`
/// runs; reservations a crashed gate left pending are reported as pending.
pub async fn verify_cmd(cfg: &LedgerConfig) -> i32 {
    let report = match Ledger::verify_store(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ledger verify: {e}");
            return 2;
        }
    };
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
