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
