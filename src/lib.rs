//! chuzhan-gate: a billing-gate reverse proxy for the 触站 (Chuzhan / huashi6) AI image API.
//!
//! See `ARCHITECTURE.md` for the map of modules and the life of a request.

pub mod clock;
pub mod envelope;
pub mod keys;
pub mod ledger;
pub mod points;
