//! The checkpoint-directory contract: the only code that knows the on-disk layout shared by
//! trainer-svc, chainsync-svc and minerctl. The two services never talk to each other directly;
//! they coordinate through one run directory, and every type here is part of that contract.

pub mod config;
pub mod expert_group;
pub mod hash;
pub mod layout;
pub mod manifest;
pub mod pins;
pub mod pt;
pub mod publish;
pub mod retention;
