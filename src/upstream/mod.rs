//! The upstream side: the pooled client the gate forwards with, and the simulator.

pub mod client;
pub mod sim;
