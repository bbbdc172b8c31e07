//! Wire types of the miner's gRPC APIs. Only the services' `api` layers and minerctl use these;
//! everything else works with the domain types of `miner-contract` and the services.

pub mod common {
    pub mod v1 {
        tonic::include_proto!("miner.common.v1");
    }
}

pub mod trainer {
    pub mod v1 {
        tonic::include_proto!("miner.trainer.v1");
    }
}

pub mod chainsync {
    pub mod v1 {
        tonic::include_proto!("miner.chainsync.v1");
    }
}

/// Encoded `FileDescriptorSet` of all three packages, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("miner_descriptor");

/// A listed checkpoint as both services report it (`ListCheckpoints`, `LoadBaseline`). The
/// committed/submitted flags are chainsync's to set from its job records; they start false.
pub fn checkpoint_message(e: &miner_contract::CheckpointEntry) -> common::v1::Checkpoint {
    use common::v1::CheckpointOrigin;
    use miner_contract::{CheckpointKind, CheckpointName};
    let (uid, hotkey) = match &e.name {
        CheckpointName::Validator { uid, hotkey, .. } => {
            (Some(u32::from(*uid)), Some(hotkey.clone()))
        }
        _ => (None, None),
    };
    common::v1::Checkpoint {
        name: e.dir_name.clone(),
        path: e.path.display().to_string(),
        origin: match e.kind {
            CheckpointKind::Own => CheckpointOrigin::Own,
            CheckpointKind::Validator => CheckpointOrigin::Validator,
        } as i32,
        global_ver: e.global_ver,
        inner_opt: e.inner_opt,
        validator_uid: uid,
        validator_hotkey: hotkey,
        model_hash: e
            .manifest
            .as_ref()
            .map(|m| m.model_hash.to_hex())
            .unwrap_or_default(),
        verified: e.is_verified(),
        pinned_by: e.pinned_by.clone(),
        committed: false,
        submitted: false,
        size_bytes: dir_size(&e.path),
        published_unix: e
            .manifest
            .as_ref()
            .map(|m| (m.created_unix_ms / 1000) as i64)
            .unwrap_or(0),
    }
}

/// Bytes of the regular files directly in `path` (a checkpoint directory is flat).
fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .filter_map(|d| d.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
