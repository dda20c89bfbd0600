//! chuzhan-gate: a billing-gate reverse proxy for the 触站 (Chuzhan / huashi6) AI image API.
//!
//! See `ARCHITECTURE.md` for the map of modules and the life of a request.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod gate;
pub mod held;
pub mod json_edit;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod points;
pub mod pricing;
pub mod sched;
pub mod server;
pub mod tasks;
pub mod upstream;
