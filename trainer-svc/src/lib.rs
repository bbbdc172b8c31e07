//! trainer-svc: trains the miner's expert group.

pub mod model;
