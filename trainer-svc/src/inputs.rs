//! The trainer's inputs as [`Settings`] name them: the tokenizer (embedded, a local file, or a Hub
//! repository's `tokenizer.json`) and the partial model with its pretrained base weights (a local
//! directory, or only the tensors it uses from a Hub model repository, cached and verified). The
//! training loop builds both through here; a missing input fails with one line saying how to
//! provide it.

use anyhow::Context;

use crate::data::TextTokenizer;
use crate::model::hub::{self, RepoKind};
use crate::model::{PartialModel, hub_weights};
use crate::settings::{BaseWeights, Settings, TokenizerSource};

/// Largest `tokenizer.json` accepted (DeepSeek-V2-Lite's is ~4.6 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

fn offline_hint(s: &Settings, what: &str) -> String {
    format!(
        "{what} comes from the Hub at {:?}: make it reachable, set HF_ENDPOINT to a mirror, or download it and pass a local directory (--base-weights DIR, model.model_path)",
        s.hub.url
    )
}

/// Largest `config.json` accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// When [`Settings::model_from_base`]: the model is the base weights' `config.json` (a directory's,
/// or the Hub repo's at the same revision, cached) with the Connito overrides (spec §8.1). A
/// directory without one keeps the built-in DeepSeek-V2-Lite config.
pub fn resolve_model_config(s: &mut Settings) -> anyhow::Result<()> {
    if !s.model_from_base {
        return Ok(());
    }
    let path = match &s.base_weights {
        None => return Ok(()),
        Some(BaseWeights::Dir(d)) => {
            let p = d.join("config.json");
            if !p.is_file() {
                return Ok(());
            }
            p
        }
        Some(BaseWeights::Hub { repo, revision }) => {
            let r = hub::open_repo(&s.hub, RepoKind::Model, repo, revision)?;
            hub_weights::fetch_file(
                r.as_ref(),
                repo,
                revision,
                &s.hub_cache,
                "config.json",
                MAX_CONFIG_BYTES,
            )
            .with_context(|| offline_hint(s, &format!("the model config of {repo}@{revision}")))?
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read model config {}", path.display()))?;
    let cfg: crate::model::ModelConfig = serde_json::from_str(&text)
        .with_context(|| format!("parse model config {}", path.display()))?;
    let cfg = cfg.with_connito_overrides(s.data.sequence_length);
    cfg.validate()
        .with_context(|| format!("model config {}", path.display()))?;
    tracing::info!(config = %path.display(), layers = cfg.num_hidden_layers, experts = cfg.n_routed_experts, "model config from the base weights");
    s.model = cfg;
    Ok(())
}

/// The tokenizer the settings name.
pub fn load_tokenizer(s: &Settings) -> anyhow::Result<TextTokenizer> {
    Ok(match &s.data.tokenizer {
        TokenizerSource::Embedded => TextTokenizer::embedded()?,
        TokenizerSource::File(p) => TextTokenizer::from_file(p)?,
        TokenizerSource::Hub { repo, revision } => {
            let r = hub::open_repo(&s.hub, RepoKind::Model, repo, revision)?;
            let path = hub_weights::fetch_file(
                r.as_ref(),
                repo,
                revision,
                &s.hub_cache,
                "tokenizer.json",
                MAX_TOKENIZER_BYTES,
            )
            .with_context(|| offline_hint(s, &format!("the tokenizer of {repo}@{revision}")))?;
            TextTokenizer::from_file(&path)?
        }
    })
}

/// The partial model, initialised and then overlaid with the base weights (if any).
pub fn build_model(s: &Settings, compute: tch::Kind) -> anyhow::Result<PartialModel> {
    let mut model = PartialModel::new(&s.model, &s.experts, s.device, compute, s.seed)
        .context("build the partial model")?;
    match &s.base_weights {
        None => {}
        Some(BaseWeights::Dir(dir)) => {
            let r = model
                .load_safetensors_dir(dir)
                .with_context(|| format!("load base weights from {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), loaded = r.loaded.len(), missing = r.missing.len(), "base weights loaded");
        }
        Some(BaseWeights::Hub { repo, revision }) => {
            let what = format!("base weights {repo}@{revision}");
            let r = hub::open_repo(&s.hub, RepoKind::Model, repo, revision)?;
            let needs = hub_weights::Needs::of(&model);
            let (tensors, report) =
                hub_weights::fetch(r.as_ref(), repo, revision, &s.hub_cache, &needs)
                    .with_context(|| offline_hint(s, &what))?;
            tracing::info!(
                repo = %repo, commit = %report.commit, tensors = report.tensors,
                needed_bytes = report.needed_bytes, repo_bytes = report.repo_bytes,
                downloaded_bytes = report.downloaded_bytes,
                "base weights: {} of {} bytes needed, {} downloaded now",
                report.needed_bytes, report.repo_bytes, report.downloaded_bytes
            );
            let loaded = model
                .load_tensor_infos(&tensors, &what)
                .with_context(|| format!("load {what}"))?;
            tracing::info!(
                loaded = loaded.loaded.len(),
                missing = loaded.missing.len(),
                "base weights loaded"
            );
        }
    }
    Ok(model)
}
