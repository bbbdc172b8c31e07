//! chainsync-svc: the chain and transport daemon.

pub mod api;
pub mod assignment;
pub mod chain;
pub mod commitment;
pub mod config;
pub mod hub;
pub mod jobs;
pub mod metrics;
pub mod phase;
pub mod service;
pub mod transport;

pub use service::{Listeners, run};
