//! Own checkpoints through the contract (spec §7.2, addendum A1): the model shard
//! `model_expgroup_<gid>.safetensors` (or `.pt` with `ckpt.shard_format: pt`; save dtype),
//! `model_shared.pt` (frozen tensors in their compute dtype), plus this trainer's private resume files: `inner_optimizer.pt` (AdamW
//! moments, fp32, a plain dict) and `trainer_state.json` ([`TrainerStateFile`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use miner_contract::layout::{CheckpointEntry, RunDir};
use miner_contract::pt::{self, DType, PtWriteOptions, TensorMeta};
use miner_contract::publish::PublishInfo;
use miner_contract::shard::{self, ShardFormat};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::model::PartialModel;
use crate::data::DataPosition;
use crate::optim::{AdamW, GradScaler};

/// Format of [`TrainerStateFile`].
pub const STATE_FORMAT: u32 = 1;
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "inner_optimizer.pt";
pub const SHARED_FILE: &str = "model_shared.pt";
/// Prefix of the fp32 expert masters in [`OPTIMIZER_FILE`] (the shard holds them in the save
/// dtype; resume restores the exact masters).
pub const MASTER_PREFIX: &str = "master.";

/// Everything besides tensors that a resume restores. **API boundary:** private to trainer-svc,
/// but it lives on disk across versions: add fields only with `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerStateFile {
    pub format: u32,
    pub inner_opt_step: u64,
    pub micro_step: u64,
    /// Scheduler steps since the last baseline (reset on reload).
    pub sched_step: u64,
    /// AdamW step count (bias correction).
    pub adam_step: u64,
    pub scaler: GradScaler,
    pub data: DataPosition,
    pub loss: f64,
    pub global_ver: u64,
    pub baseline_name: String,
    pub baseline_hash: String,
    pub total_samples: u64,
    pub total_tokens: u64,
}

/// A published own checkpoint.
#[derive(Debug, Clone)]
pub struct PublishedCheckpoint {
    pub name: String,
    pub path: PathBuf,
    pub model_hash: String,
}

fn dtype_of(k: Kind) -> anyhow::Result<DType> {
    Ok(match k {
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        other => anyhow::bail!("unsupported tensor kind {other:?}"),
    })
}

fn kind_of(d: DType) -> Kind {
    match d {
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// Little-endian bytes of `t` converted to `kind`: converted where it lives, then copied to the
/// CPU (contiguous). Only this one tensor is held in host memory.
fn tensor_bytes(t: &Tensor, kind: Kind) -> Vec<u8> {
    let c = tch::no_grad(|| t.detach().to_kind(kind).to_device(Device::Cpu).contiguous());
    let n = c.numel() * c.kind().elt_size_in_bytes();
    let mut buf = vec![0u8; n];
    c.copy_data_u8(&mut buf, c.numel());
    buf
}

fn shape_of(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|d| *d as usize).collect()
}

/// Writes `named` as a `.pt` file at `path`, in `kind` (or each tensor's own kind when `None`),
/// streaming: one tensor at a time is converted and copied to host memory, never the whole
/// state dict. Same bytes as building the map first and calling [`pt::write_pt_tensors`].
fn write_streaming(
    path: &Path,
    named: &[(String, Tensor)],
    kind: Option<Kind>,
    opts: &PtWriteOptions,
) -> anyhow::Result<()> {
    let mut metas = Vec::with_capacity(named.len());
    let mut by_name: BTreeMap<&str, (&Tensor, Kind)> = BTreeMap::new();
    for (n, t) in named {
        let k = kind.unwrap_or(t.kind());
        metas.push(TensorMeta::new(n.clone(), dtype_of(k)?, shape_of(t)));
        by_name.insert(n.as_str(), (t, k));
    }
    pt::write_pt(path, metas, opts, |meta, w: &mut dyn Write| {
        let (t, k) = by_name
            .get(meta.name.as_str())
            .ok_or_else(|| std::io::Error::other("tensor vanished"))?;
        w.write_all(&tensor_bytes(t, *k))
    })
    .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// A plain dict (`torch.load` gives `{name: tensor}`), as the private resume files are.
const PLAIN_DICT: PtWriteOptions = PtWriteOptions {
    wrap_model_state_dict: false,
};

fn from_pt(map: BTreeMap<String, pt::Tensor>) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(map.len());
    for (n, t) in map {
        let shape: Vec<i64> = t.shape.iter().map(|d| *d as i64).collect();
        let tt = Tensor::f_from_data_size(&t.data, &shape, kind_of(t.dtype))
            .with_context(|| format!("tensor {n}"))?;
        out.push((n, tt));
    }
    Ok(out)
}

/// Publishes `globalver_<gv>_inneropt_<n>` atomically through the contract.
#[allow(clippy::too_many_arguments)]
pub fn publish_own(
    run: &RunDir,
    global_ver: u64,
    inner_opt: u64,
    group_id: u32,
    model: &PartialModel,
    opt: &AdamW,
    state: &TrainerStateFile,
    save_kind: Kind,
    shard_format: ShardFormat,
) -> anyhow::Result<PublishedCheckpoint> {
    let staged = run.stage_own(global_ver, inner_opt)?;
    let experts = model.expert_tensors();
    let mut metas = Vec::with_capacity(experts.len());
    let mut bytes: u64 = 0;
    for (n, t) in &experts {
        let m = TensorMeta::new(n.clone(), dtype_of(save_kind)?, shape_of(t));
        bytes += m.nbytes() as u64;
        metas.push(m);
    }
    staged.ensure_free_space(bytes * 3)?;
    let by_name: BTreeMap<&str, &Tensor> = experts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let hash = staged.write_model(group_id, shard_format, metas, |meta, w: &mut dyn Write| {
        let t = by_name
            .get(meta.name.as_str())
            .ok_or_else(|| std::io::Error::other("tensor vanished"))?;
        w.write_all(&tensor_bytes(t, save_kind))
    })?;
    // Frozen tensors keep the compute dtype (what the model trains with), so a resume is exact.
    write_streaming(
        &staged.path().join(SHARED_FILE),
        &model.shared_tensors(),
        None,
        &PtWriteOptions::default(),
    )?;
    let mut private = opt.moments();
    private.extend(
        model
            .trainable()
            .into_iter()
            .map(|(n, t)| (format!("{MASTER_PREFIX}{n}"), t)),
    );
    write_streaming(
        &staged.path().join(OPTIMIZER_FILE),
        &private,
        None,
        &PLAIN_DICT,
    )?;
    let json = serde_json::to_vec_pretty(state)?;
    staged.write_file(STATE_FILE, |w| w.write_all(&json))?;
    let published = staged.publish(PublishInfo::own(group_id, hash))?;
    Ok(PublishedCheckpoint {
        name: published.name.dir_name(),
        path: published.path,
        model_hash: hash.to_hex(),
    })
}

/// Loads a checkpoint's model weights: its model shard (`model_expgroup_<gid>.safetensors` or
/// `.pt`, whichever the manifest names) and, if present, `model_shared.pt`.
pub fn load_weights(
    e: &CheckpointEntry,
    model: &mut PartialModel,
    _device: Device,
) -> anyhow::Result<()> {
    let model_path = e
        .model_path()
        .with_context(|| format!("checkpoint {} has no manifest", e.dir_name))?;
    let experts = from_pt(
        shard::read_shard(&model_path).with_context(|| format!("read {}", model_path.display()))?,
    )?;
    let report = model
        .load_named(experts)
        .with_context(|| format!("load {}", model_path.display()))?;
    let n = report.loaded.len();
    if n == 0 {
        anyhow::bail!(
            "{}: holds no tensor of this expert group",
            model_path.display()
        );
    }
    let shared = e.path.join(SHARED_FILE);
    if shared.exists() {
        let t =
            from_pt(pt::read_pt(&shared).with_context(|| format!("read {}", shared.display()))?)?;
        model
            .load_named(t)
            .with_context(|| format!("load {}", shared.display()))?;
    }
    tracing::info!(checkpoint = %e.dir_name, expert_tensors = n, "loaded checkpoint weights");
    Ok(())
}

/// Loads an own checkpoint: weights, and when present the optimizer moments and trainer state.
pub fn load_own(
    e: &CheckpointEntry,
    model: &mut PartialModel,
    opt: &mut AdamW,
    device: Device,
) -> anyhow::Result<Option<TrainerStateFile>> {
    load_weights(e, model, device)?;
    let state_path = e.path.join(STATE_FILE);
    let opt_path = e.path.join(OPTIMIZER_FILE);
    if !state_path.exists() || !opt_path.exists() {
        return Ok(None);
    }
    let state: TrainerStateFile = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("read {}", state_path.display()))?,
    )
    .with_context(|| format!("parse {}", state_path.display()))?;
    if state.format != STATE_FORMAT {
        anyhow::bail!(
            "{}: unsupported format {}",
            state_path.display(),
            state.format
        );
    }
    let private =
        from_pt(pt::read_pt(&opt_path).with_context(|| format!("read {}", opt_path.display()))?)?;
    let (masters, moments): (Vec<_>, Vec<_>) = private
        .into_iter()
        .partition(|(n, _)| n.starts_with(MASTER_PREFIX));
    let masters: Vec<(String, Tensor)> = masters
        .into_iter()
        .map(|(n, t)| (n[MASTER_PREFIX.len()..].to_string(), t))
        .collect();
    model
        .load_named(masters)
        .with_context(|| format!("load expert masters from {}", opt_path.display()))?;
    opt.load_moments(&moments, state.adam_step)
        .map_err(|m| anyhow::anyhow!("{}: {m}", opt_path.display()))?;
    Ok(Some(state))
}

/// Keeps the top `keep` checkpoints per kind (pinned ones survive); returns deleted names.
pub fn retain(run: &RunDir, keep: usize) -> anyhow::Result<Vec<String>> {
    let r = run.apply_retention(keep)?;
    Ok(r.deleted
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .collect())
}

/// `mycelia_final.pt`: every tensor of the partial model as a plain dict (own dtypes).
pub fn write_final(path: &Path, model: &PartialModel) -> anyhow::Result<()> {
    let mut all = model.shared_tensors();
    all.extend(model.expert_tensors());
    write_streaming(path, &all, None, &PLAIN_DICT)?;
    Ok(())
}
