//! Shared fixtures for the transport tests: keys, small real `.pt` shards, stand-ins.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chainsync_svc::commitment::{ChainCheckpoint, Role};
use chainsync_svc::transport::{Backoff, RetryPolicy};
use miner_contract::ExpertGroup;
use miner_contract::hash::ModelHash;
use miner_contract::pt::{DType, PtWriteOptions, Tensor, write_pt_tensors};
use miner_keys::Hotkey;
use miner_standins::{
    ChainCheckpointView, OwnerSchedule, ValidatorStandIn, ValidatorStandInConfig,
};

pub const GROUP: u32 = 0;
/// Offset 345 of the 500-block cycle: inside Submission [340, 420).
pub const SUBMISSION_BLOCK: u64 = 8_081_345;
pub const GLOBAL_VER: u64 = 8_081_320;

pub fn validator_key() -> Hotkey {
    Hotkey::from_uri("//Alice").expect("dev key")
}

pub fn miner_key() -> Hotkey {
    Hotkey::from_uri("//Bob").expect("dev key")
}

pub fn group() -> ExpertGroup {
    ExpertGroup::builtin("exp_math").expect("built-in group")
}

fn f16_tensor(rows: usize, cols: usize, seed: u16) -> Tensor {
    let mut data = Vec::with_capacity(rows * cols * 2);
    for i in 0..rows * cols {
        // Small finite f16 values (exponent well below all-ones).
        let v: u16 = 0x3000 | ((i as u16).wrapping_mul(31).wrapping_add(seed) & 0x03FF);
        data.extend_from_slice(&v.to_le_bytes());
    }
    Tensor {
        dtype: DType::F16,
        shape: vec![rows, cols],
        data,
    }
}

/// A real shard with routed experts of layer 1 of exp_math (org ids 22, 17, 44).
pub fn expert_tensors(seed: u16) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for (k, e) in [22, 17, 44].into_iter().enumerate() {
        m.insert(
            format!("model.layers.1.mlp.experts.{e}.gate_up_proj"),
            f16_tensor(32, 64, seed + k as u16),
        );
        m.insert(
            format!("model.layers.1.mlp.experts.{e}.down_proj"),
            f16_tensor(64, 16, seed + 7 + k as u16),
        );
    }
    m
}

pub fn write_shard(path: &Path, tensors: &BTreeMap<String, Tensor>) -> ModelHash {
    write_pt_tensors(path, tensors, &PtWriteOptions::default()).expect("write shard")
}

pub fn sign_hash(key: &Hotkey, hash_hex: &str) -> String {
    miner_keys::b64url_nopad_encode(&key.sign(hash_hex.as_bytes()))
}

pub fn candidate(v: &ValidatorStandIn, hash_hex: &str, signed: String) -> ChainCheckpoint {
    ChainCheckpoint {
        uid: 3,
        hotkey: v.hotkey_ss58(),
        stake: 100.0,
        axon_ip: v.ip(),
        axon_port: v.port(),
        role: Role::Validator,
        signed_model_hash: signed,
        model_hash: hash_hex.to_owned(),
        global_ver: GLOBAL_VER,
        expert_group: GROUP,
        hf_repo_id: None,
        hf_revision: None,
    }
}

pub fn fast_policy(retries: u32, idle_ms: u64) -> RetryPolicy {
    RetryPolicy {
        attempt_timeout: Duration::from_millis(idle_ms),
        retries,
        backoff: Backoff::Fixed(Duration::from_millis(50)),
    }
}

/// Every entry (hidden ones included) under `dir`, recursively.
pub fn all_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(all_entries(&p));
            }
            out.push(p);
        }
    }
    out
}

pub struct StandInOpts {
    pub serve_file: Option<PathBuf>,
    pub chain: Option<ChainCheckpointView>,
    pub check_phase: bool,
    pub block: Arc<AtomicU64>,
}

pub async fn validator(dir: &Path, opts: StandInOpts) -> ValidatorStandIn {
    let chain = opts.chain;
    let block = opts.block.clone();
    ValidatorStandIn::start(ValidatorStandInConfig {
        hotkey: validator_key(),
        serve_file: opts.serve_file,
        submission_dir: dir.join("validator_submissions"),
        max_submission_bytes: 8 << 30,
        block: Arc::new(move || block.load(Ordering::SeqCst)),
        schedule: OwnerSchedule::default(),
        check_phase: opts.check_phase,
        assignment: None,
        chain_checkpoint: Arc::new(move |_hk: &str| chain.clone()),
        expert_group: Some(group()),
    })
    .await
    .expect("start validator stand-in")
}
