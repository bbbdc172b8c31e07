//! On-chain commitment payloads (spec §4.3) and how commitments are read (spec §4.4, §5.1).
//!
//! Writing: compact JSON, keys in the reference's field-declaration order, `None` omitted,
//! and the 128-byte budget checked *before* anything is sent. Reading: pure functions over
//! `(commitments, neurons, whitelist, block)`; another neuron's garbage parses to `None`,
//! never to a panic or an error that stops the read.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use crate::phase::VersionWindow;

/// The reference's `CHAIN_COMMIT_MAX_BYTES`.
pub const CHAIN_COMMIT_MAX_BYTES: usize = 128;
/// The reference's `CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS`.
pub const CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS: usize = 32;
/// Length of the HF revision put on chain (`HF_CHAIN_REVISION_LENGTH`).
pub const HF_CHAIN_REVISION_LENGTH: usize = 7;
/// Length of a base64url (no padding) sr25519 signature.
pub const SIGNATURE_B64_LEN: usize = 86;
/// Length of the hex model hash (blake2b-192).
pub const MODEL_HASH_HEX_LEN: usize = 48;
/// `config.cycle.cycle_length` (stale 448) — still the validator role gate's max weight age.
pub const DEFAULT_MAX_WEIGHT_AGE: u64 = 448;

/// A payload we refuse to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitmentError {
    #[error("commitment payload is {len} bytes, over the {CHAIN_COMMIT_MAX_BYTES}-byte budget")]
    TooLong { len: usize },
    #[error("HF repo id {repo:?} is {len} chars, over {CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS}")]
    RepoTooLong { repo: String, len: usize },
    #[error("commitment field {field}: {reason}")]
    BadField { field: &'static str, reason: String },
}

/// MinerCommit1 / ValidatorCommit1: `{"m":"<86 b64url>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedModelHashCommit {
    #[serde(rename = "m")]
    pub signed_model_hash: String,
}

/// MinerCommit2: `{"e":0,"h":"<48 hex>","v":123}` plus `"r"`, `"rv"` when the file is on HF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MinerCommit {
    #[serde(rename = "e")]
    pub expert_group: u32,
    #[serde(rename = "h")]
    pub model_hash: String,
    #[serde(rename = "v")]
    pub global_ver: u64,
    #[serde(rename = "r", skip_serializing_if = "Option::is_none")]
    pub hf_repo_id: Option<String>,
    #[serde(rename = "rv", skip_serializing_if = "Option::is_none")]
    pub hf_revision: Option<String>,
}

/// ValidatorCommit2 / heartbeat: `{"h","v","e"}` (+ optional `s`, `r`, `rv`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidatorCommit {
    #[serde(rename = "h", skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    #[serde(rename = "v")]
    pub global_ver: u64,
    #[serde(rename = "e")]
    pub expert_group: u32,
    #[serde(rename = "s", skip_serializing_if = "Option::is_none")]
    pub miner_seed: Option<u64>,
    #[serde(rename = "r", skip_serializing_if = "Option::is_none")]
    pub hf_repo_id: Option<String>,
    #[serde(rename = "rv", skip_serializing_if = "Option::is_none")]
    pub hf_revision: Option<String>,
}

fn check_hash(h: &str) -> Result<(), CommitmentError> {
    if h.len() != MODEL_HASH_HEX_LEN
        || !h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(CommitmentError::BadField {
            field: "h",
            reason: format!("expected 48 lowercase hex chars, got {h:?}"),
        });
    }
    Ok(())
}

fn check_hf(repo: Option<&str>, rev: Option<&str>) -> Result<(), CommitmentError> {
    if let Some(r) = repo {
        let len = r.chars().count();
        if len > CHAIN_COMMIT_MAX_HF_REPO_ID_CHARS {
            return Err(CommitmentError::RepoTooLong {
                repo: r.to_owned(),
                len,
            });
        }
        if !r.bytes().all(|b| b.is_ascii_graphic()) || !r.contains('/') {
            return Err(CommitmentError::BadField {
                field: "r",
                reason: format!("expected \"<namespace>/<repo>\", got {r:?}"),
            });
        }
    }
    if let Some(rv) = rev
        && (rv.is_empty()
            || rv.len() > HF_CHAIN_REVISION_LENGTH
            || !rv.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(CommitmentError::BadField {
            field: "rv",
            reason: format!("expected a 7-char hex revision, got {rv:?}"),
        });
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CommitmentError> {
    let bytes = serde_json::to_vec(value).map_err(|e| CommitmentError::BadField {
        field: "payload",
        reason: e.to_string(),
    })?;
    if bytes.len() > CHAIN_COMMIT_MAX_BYTES {
        return Err(CommitmentError::TooLong { len: bytes.len() });
    }
    Ok(bytes)
}

impl SignedModelHashCommit {
    /// The exact bytes to commit (94 bytes for a real signature).
    pub fn to_payload(&self) -> Result<Vec<u8>, CommitmentError> {
        let m = &self.signed_model_hash;
        if m.len() != SIGNATURE_B64_LEN
            || !m
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(CommitmentError::BadField {
                field: "m",
                reason: format!("expected 86 base64url chars, got {} chars", m.len()),
            });
        }
        encode(self)
    }
}

impl MinerCommit {
    /// The exact bytes to commit; refuses a payload over 128 bytes or a repo over 32 chars.
    pub fn to_payload(&self) -> Result<Vec<u8>, CommitmentError> {
        check_hash(&self.model_hash)?;
        check_hf(self.hf_repo_id.as_deref(), self.hf_revision.as_deref())?;
        encode(self)
    }
}

impl ValidatorCommit {
    /// The exact bytes to commit; refuses a payload over 128 bytes or a repo over 32 chars.
    pub fn to_payload(&self) -> Result<Vec<u8>, CommitmentError> {
        if let Some(h) = &self.model_hash {
            check_hash(h)?;
        }
        check_hf(self.hf_repo_id.as_deref(), self.hf_revision.as_deref())?;
        encode(self)
    }
}

/// Any neuron's commitment, as read: every field the reference's classes know, all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedCommit {
    pub block: Option<u64>,
    pub expert_group: Option<u32>,
    pub signed_model_hash: Option<String>,
    pub model_hash: Option<String>,
    pub global_ver: Option<u64>,
    pub inner_opt: Option<u64>,
    pub miner_seed: Option<u64>,
    pub hf_repo_id: Option<String>,
    pub hf_revision: Option<String>,
}

fn opt_u64(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>, ()> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(()),
        Some(_) => Err(()),
    }
}

fn opt_str(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, ()> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// Parses the raw bytes of a commitment. Anything that is not a JSON object with correctly
/// typed known fields (unknown keys are ignored) gives `None`.
pub fn parse_commitment(raw: &[u8]) -> Option<ParsedCommit> {
    let text = std::str::from_utf8(raw).ok()?;
    let value: Value = serde_json::from_str(text).ok()?;
    let obj = value.as_object()?;
    let f = || -> Result<ParsedCommit, ()> {
        Ok(ParsedCommit {
            block: opt_u64(obj, "b")?,
            expert_group: opt_u64(obj, "e")?
                .map(u32::try_from)
                .transpose()
                .map_err(|_| ())?,
            signed_model_hash: opt_str(obj, "m")?,
            model_hash: opt_str(obj, "h")?,
            global_ver: opt_u64(obj, "v")?,
            inner_opt: opt_u64(obj, "i")?,
            miner_seed: opt_u64(obj, "s")?,
            hf_repo_id: opt_str(obj, "r")?,
            hf_revision: opt_str(obj, "rv")?,
        })
    };
    f().ok()
}

/// A neuron as the metagraph shows it at the read block.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronView {
    pub uid: u16,
    pub hotkey: String,
    pub stake: f64,
    pub last_update: u64,
    pub axon_ip: String,
    pub axon_port: u16,
}

/// Commitments and neurons read at one block.
#[derive(Debug, Clone, Default)]
pub struct CommitSnapshot {
    /// The block whose post-state was read.
    pub block: u64,
    /// `(hotkey, raw commitment bytes)` in storage-key order.
    pub commitments: Vec<(String, Vec<u8>)>,
    pub neurons: Vec<NeuronView>,
}

/// How the reference classifies a commitment's author (spec §4.4 step 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Validator,
    Miner,
}

/// Validator ⇔ whitelisted AND updated within `max_weight_age` blocks of the read block.
pub fn role_of(neuron: &NeuronView, whitelist: &[String], block: u64, max_weight_age: u64) -> Role {
    let recent = block.saturating_sub(neuron.last_update) <= max_weight_age;
    if recent && whitelist.contains(&neuron.hotkey) {
        Role::Validator
    } else {
        Role::Miner
    }
}

/// One read commitment: parsed (or `None` for garbage) with its author and role.
#[derive(Debug, Clone)]
pub struct ReadCommit {
    pub commit: Option<ParsedCommit>,
    pub neuron: NeuronView,
    pub role: Role,
}

/// `get_chain_commits`: commitments of registered hotkeys only (deregistered ones are
/// skipped), parsed and role-gated.
pub fn read_commits(
    snap: &CommitSnapshot,
    whitelist: &[String],
    max_weight_age: u64,
) -> Vec<ReadCommit> {
    let by_hotkey: HashMap<&str, &NeuronView> = snap
        .neurons
        .iter()
        .map(|n| (n.hotkey.as_str(), n))
        .collect();
    snap.commitments
        .iter()
        .filter_map(|(hk, raw)| {
            let neuron = by_hotkey.get(hk.as_str())?;
            Some(ReadCommit {
                commit: parse_commitment(raw),
                neuron: (*neuron).clone(),
                role: role_of(neuron, whitelist, snap.block, max_weight_age),
            })
        })
        .collect()
}

/// A complete checkpoint announced on chain (commit-1 signature joined with commit-2 fields).
#[derive(Debug, Clone, PartialEq)]
pub struct ChainCheckpoint {
    pub uid: u16,
    pub hotkey: String,
    pub stake: f64,
    pub axon_ip: String,
    pub axon_port: u16,
    pub role: Role,
    pub signed_model_hash: String,
    pub model_hash: String,
    pub global_ver: u64,
    pub expert_group: u32,
    pub hf_repo_id: Option<String>,
    pub hf_revision: Option<String>,
}

/// Whose checkpoints are being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForRole {
    /// Miners' checkpoints (MinerCommit1/2); no majority filter.
    Miner,
    /// Validators' checkpoints (ValidatorCommit1/2); stake-weighted majority hash.
    Validator,
}

/// `build_chain_checkpoints` + `filter_checkpoints` (spec §4.4): join the commit-1 signatures
/// (`sig`, read at `phase1.end + 1`) with the commit-2 fields (`hash`, read at `phase2.end + 1`)
/// by hotkey, drop incomplete ones, apply the version window (if known), and for validators
/// keep only the stake-weighted majority hash (ties: first seen). With `validators_only`,
/// authors that fail the role gate are dropped before the majority vote (the reference only
/// uses the gate to pick a parse class, so a staked non-validator could sway the vote).
pub fn chain_checkpoints(
    sig: &CommitSnapshot,
    hash: &CommitSnapshot,
    whitelist: &[String],
    max_weight_age: u64,
    window: Option<VersionWindow>,
    for_role: ForRole,
    validators_only: bool,
) -> Vec<ChainCheckpoint> {
    let signed: HashMap<String, String> = read_commits(sig, whitelist, max_weight_age)
        .into_iter()
        .filter_map(|rc| Some((rc.neuron.hotkey, rc.commit?.signed_model_hash?)))
        .collect();
    let mut out: Vec<ChainCheckpoint> = read_commits(hash, whitelist, max_weight_age)
        .into_iter()
        .filter_map(|rc| {
            let c = rc.commit?;
            Some(ChainCheckpoint {
                signed_model_hash: signed.get(&rc.neuron.hotkey)?.clone(),
                model_hash: c.model_hash?,
                global_ver: c.global_ver?,
                expert_group: c.expert_group?,
                hf_repo_id: c.hf_repo_id,
                hf_revision: c.hf_revision,
                uid: rc.neuron.uid,
                hotkey: rc.neuron.hotkey,
                stake: rc.neuron.stake,
                axon_ip: rc.neuron.axon_ip,
                axon_port: rc.neuron.axon_port,
                role: rc.role,
            })
        })
        .filter(|cp| window.is_none_or(|w| w.contains(cp.global_ver)))
        .filter(|cp| !validators_only || cp.role == Role::Validator)
        .collect();
    if for_role == ForRole::Validator {
        out = majority_hash(out);
    }
    out
}

/// Keeps only the checkpoints whose hash has the greatest total stake (first seen wins ties).
fn majority_hash(cps: Vec<ChainCheckpoint>) -> Vec<ChainCheckpoint> {
    let mut totals: Vec<(String, f64)> = Vec::new();
    for cp in &cps {
        match totals.iter_mut().find(|(h, _)| *h == cp.model_hash) {
            Some((_, s)) => *s += cp.stake,
            None => totals.push((cp.model_hash.clone(), cp.stake)),
        }
    }
    let mut best: Option<&(String, f64)> = None;
    for t in &totals {
        if best.is_none_or(|b| t.1 > b.1) {
            best = Some(t);
        }
    }
    let Some((winner, _)) = best.cloned() else {
        return Vec::new();
    };
    cps.into_iter()
        .filter(|cp| cp.model_hash == winner)
        .collect()
}

/// The validator checkpoints a miner should try to download in Distribute (spec §5.1):
/// complete, inside the window, majority hash, of our expert group, strictly newer than the
/// version we hold (`None` = we hold nothing). When the whitelist is known (non-empty), only
/// authors passing the validator role gate take part (see [`chain_checkpoints`]).
pub fn download_candidates(
    sig: &CommitSnapshot,
    hash: &CommitSnapshot,
    whitelist: &[String],
    window: Option<VersionWindow>,
    expert_group: u32,
    ours: Option<u64>,
) -> Vec<ChainCheckpoint> {
    let validators_only = !whitelist.is_empty();
    chain_checkpoints(
        sig,
        hash,
        whitelist,
        DEFAULT_MAX_WEIGHT_AGE,
        window,
        ForRole::Validator,
        validators_only,
    )
    .into_iter()
    .filter(|cp| cp.expert_group == expert_group)
    .filter(|cp| ours.is_none_or(|v| cp.global_ver > v))
    .collect()
}

/// True when an axon can be dialled (the reference skips `0.0.0.0`, empty ip, port 0).
pub fn axon_is_served(ip: &str, port: u16) -> bool {
    !ip.is_empty() && ip != "0.0.0.0" && port != 0
}
