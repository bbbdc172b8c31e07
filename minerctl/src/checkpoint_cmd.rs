//! `minerctl checkpoint {hash, inspect, list}`: offline, read-only views of model shards
//! (`.safetensors` or `.pt`) and run directories.

use std::io::Write;
use std::path::{Path, PathBuf};

use miner_contract::manifest::{MANIFEST_FILE, read_manifest};
use miner_contract::shard::{
    ShardFormat, ShardLayout, ShardReader, escape_name, find_shard, parse_shard_file_name,
    shard_file_name,
};
use miner_contract::{EntryState, RunDir};
use serde::Serialize;

use crate::exit::{CliError, Exit};

fn write_err(e: std::io::Error) -> CliError {
    CliError::new(Exit::Other, format!("write output: {e}"))
}

fn missing(path: &Path, e: &std::io::Error) -> CliError {
    let exit = if e.kind() == std::io::ErrorKind::NotFound
        || e.kind() == std::io::ErrorKind::PermissionDenied
    {
        Exit::NoInput
    } else {
        Exit::Other
    };
    CliError::new(exit, format!("{}: {e}", path.display()))
}

/// The shard file to read: `path` itself, or the single (or `--group`) model shard in a
/// checkpoint directory (`.safetensors` when a group has both formats, as validators prefer).
fn model_file(path: &Path, group: Option<u32>) -> Result<PathBuf, CliError> {
    let meta = std::fs::metadata(path).map_err(|e| missing(path, &e))?;
    if !meta.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Some(g) = group {
        return find_shard(path, g).map(|(p, _)| p).ok_or_else(|| {
            CliError::new(
                Exit::Data,
                format!(
                    "{}: no {} or {} in this checkpoint directory",
                    path.display(),
                    shard_file_name(g, ShardFormat::Safetensors),
                    shard_file_name(g, ShardFormat::Pt)
                ),
            )
        });
    }
    let rd = std::fs::read_dir(path).map_err(|e| missing(path, &e))?;
    let mut shards: Vec<(u32, String)> = Vec::new();
    for dent in rd {
        let dent = dent.map_err(|e| missing(path, &e))?;
        if let Some(name) = dent.file_name().to_str()
            && let Some((g, _)) = parse_shard_file_name(name)
            && !shards.iter().any(|(have, _)| *have == g)
            && let Some((file, _)) = find_shard(path, g)
        {
            shards.push((
                g,
                file.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(name)
                    .to_string(),
            ));
        }
    }
    shards.sort();
    match shards.as_slice() {
        [] => Err(CliError::new(
            Exit::Data,
            format!(
                "{}: not a checkpoint directory (no model_expgroup_<gid>.safetensors or .pt)",
                path.display()
            ),
        )),
        [(_, name)] => Ok(path.join(name)),
        many => Err(CliError::new(
            Exit::Usage,
            format!(
                "{}: holds {}; choose one with --group",
                path.display(),
                many.iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// `checkpoint hash PATH`: prints the model hash; for a published checkpoint directory also
/// checks it against `MANIFEST.json`.
pub fn hash(path: &Path, group: Option<u32>, out: &mut dyn Write) -> Result<(), CliError> {
    let file = model_file(path, group)?;
    let hash = ShardReader::open(&file)?.model_hash()?;
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if path.is_dir()
        && let Ok(m) = read_manifest(path)
        && m.model_file == file_name
        && m.model_hash != hash
    {
        return Err(CliError::new(
            Exit::Data,
            format!(
                "{}: model hash {hash} differs from {MANIFEST_FILE} ({})",
                file.display(),
                m.model_hash
            ),
        ));
    }
    writeln!(out, "{hash}").map_err(write_err)
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    shape: Vec<usize>,
}

#[derive(Serialize)]
struct InspectReport {
    file: PathBuf,
    /// `safetensors` or `pt`.
    format: &'static str,
    layout: &'static str,
    parameters: u64,
    model_hash: String,
    tensors: Vec<TensorRow>,
}

/// `checkpoint inspect PATH`: tensors, parameter count and hash.
pub fn inspect(
    path: &Path,
    group: Option<u32>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let file = model_file(path, group)?;
    let reader = ShardReader::open(&file)?;
    let hash = reader.model_hash()?;
    let tensors: Vec<TensorRow> = reader
        .entries()
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            dtype: t
                .dtype
                .torch_name()
                .trim_start_matches("torch.")
                .to_string(),
            shape: t.shape.clone(),
        })
        .collect();
    let report = InspectReport {
        file: file.clone(),
        format: reader.format().extension(),
        layout: match reader.layout() {
            ShardLayout::Flat => "flat",
            ShardLayout::PtModelStateDict => "model_state_dict",
            ShardLayout::PtPlainDict => "plain_dict",
        },
        parameters: reader.entries().iter().map(|t| t.numel() as u64).sum(),
        model_hash: hash.to_string(),
        tensors,
    };
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::new(Exit::Other, format!("encode JSON: {e}")))?;
        return writeln!(out, "{text}").map_err(write_err);
    }
    // Names come from the file: escaped, so a hostile name cannot forge lines or colours.
    let names: Vec<String> = report
        .tensors
        .iter()
        .map(|t| escape_name(&t.name))
        .collect();
    let w = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut text = format!(
        "file        {}\nformat      {}\nlayout      {}\ntensors     {}\nparameters  {}\nmodel_hash  {}\n\n{:<w$}  {:<8}  SHAPE\n",
        report.file.display(),
        report.format,
        report.layout,
        report.tensors.len(),
        report.parameters,
        report.model_hash,
        "NAME",
        "DTYPE",
    );
    for (t, name) in report.tensors.iter().zip(&names) {
        text.push_str(&format!("{name:<w$}  {:<8}  {:?}\n", t.dtype, t.shape));
    }
    out.write_all(text.as_bytes()).map_err(write_err)
}

#[derive(Serialize)]
struct ListRow {
    name: String,
    kind: String,
    global_ver: u64,
    inner_opt: u64,
    /// `verified` or `incomplete`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    pinned_by: Vec<String>,
    /// The checkpoint the trainer would load (best verified, own first on a tie).
    best: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expert_group: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_hash: Option<String>,
    path: PathBuf,
}

#[derive(Serialize)]
struct ListReport {
    run_dir: PathBuf,
    checkpoints: Vec<ListRow>,
}

/// `checkpoint list --path RUN`: own and validator checkpoints in selection order.
pub fn list(path: &Path, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    if path.is_file() && path.file_name().is_none_or(|n| n != "config.yaml") {
        return Err(CliError::new(
            Exit::Usage,
            format!(
                "{}: expected a run directory or its config.yaml",
                path.display()
            ),
        ));
    }
    let run = RunDir::open(path)?;
    let entries = run.list()?;
    let best = entries.iter().position(|e| e.is_verified());
    let rows: Vec<ListRow> = entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let (state, reason) = match e.state {
                EntryState::Verified => ("verified", None),
                EntryState::Incomplete(r) => ("incomplete", Some(r)),
            };
            ListRow {
                name: e.dir_name,
                kind: e.kind.to_string(),
                global_ver: e.global_ver,
                inner_opt: e.inner_opt,
                state,
                reason,
                pinned_by: e.pinned_by,
                best: Some(i) == best,
                expert_group: e.manifest.as_ref().map(|m| m.expert_group),
                model_hash: e.manifest.as_ref().map(|m| m.model_hash.to_string()),
                path: e.path,
            }
        })
        .collect();
    let report = ListReport {
        run_dir: run.path().to_path_buf(),
        checkpoints: rows,
    };
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::new(Exit::Other, format!("encode JSON: {e}")))?;
        return writeln!(out, "{text}").map_err(write_err);
    }
    let w = report
        .checkpoints
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut text = format!(
        "  {:<w$}  {:<9}  {:>10}  {:>9}  {:<10}  {:<12}  NOTE\n",
        "NAME", "KIND", "GLOBAL_VER", "INNER_OPT", "STATE", "PINNED"
    );
    for r in &report.checkpoints {
        let pinned = if r.pinned_by.is_empty() {
            "-".to_string()
        } else {
            r.pinned_by.join(",")
        };
        text.push_str(&format!(
            "{} {:<w$}  {:<9}  {:>10}  {:>9}  {:<10}  {:<12}  {}\n",
            if r.best { "*" } else { " " },
            r.name,
            r.kind,
            r.global_ver,
            r.inner_opt,
            r.state,
            pinned,
            r.reason.as_deref().unwrap_or(""),
        ));
    }
    if report.checkpoints.is_empty() {
        text.push_str(&format!(
            "(no checkpoints in {})\n",
            report.run_dir.display()
        ));
    }
    out.write_all(text.as_bytes()).map_err(write_err)
}
