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
pub mod shard;
pub mod st;

pub use config::{ConfigError, MinerConfig};
pub use expert_group::{DataCfg, ExpertGroup, ExpertGroupError};
pub use layout::{
    CheckpointEntry, CheckpointKind, CheckpointName, EntryState, LayoutError, RunDir,
};
pub use manifest::Manifest;
pub use pins::{PinError, PinGuard, PinRecord};
pub use publish::{PublishError, PublishInfo, Published, Staged};
pub use retention::{RetentionError, RetentionReport, plan_retention};
