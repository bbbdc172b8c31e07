//! chainsync-svc: the chain and transport daemon.

pub mod assignment;
pub mod chain;
pub mod commitment;
pub mod phase;
pub mod transport;
