//! The DeepSeek-V2 model configuration, read from a HuggingFace-style `config.json` (spec §8.1).
//!
//! **Invariant:** this type derives `Serialize`/`Deserialize` with the HuggingFace field names, so a
//! `config.json` written by [`ModelConfig::to_json_string`] is accepted by transformers'
//! `DeepseekV2Config(**json)` (the parity test relies on it).

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// RoPE scaling parameters (`rope_scaling` in the hub `config.json`, `rope_parameters` in transformers 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"yarn"` or `"default"` (the hub spells the key `type`, transformers 5 `rope_type`).
    #[serde(rename = "type", alias = "rope_type")]
    pub rope_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
    /// transformers 5 keeps `rope_theta` inside `rope_parameters`; it wins over the top-level field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_one() -> f64 {
    1.0
}
fn default_init() -> f64 {
    0.02
}
fn default_silu() -> String {
    "silu".to_string()
}
fn default_greedy() -> String {
    "greedy".to_string()
}

/// A DeepSeek-V2 configuration (the fields the partial model uses; other `config.json` keys are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width `I` of one routed expert (and of one shared expert).
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    /// Connito's `partial_topk`: the partial model routes each token to exactly 1 owned expert.
    pub num_experts_per_tok: usize,
    pub first_k_dense_replace: usize,
    pub kv_lora_rank: usize,
    /// Must be null (DeepSeek-V2-Lite projects q directly with `q_proj`).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default, alias = "rope_parameters")]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_one")]
    pub routed_scaling_factor: f64,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_greedy")]
    pub topk_method: String,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

impl ModelConfig {
    /// DeepSeek-V2-Lite (spec §8.1) with the Connito overrides of the partial model:
    /// `num_experts_per_tok = partial_topk = 1`, `max_position_embeddings = sequence_length`,
    /// `n_group = 2`, `topk_group = 1`, `norm_topk_prob = true` (the last three are unused by the router).
    pub fn deepseek_v2_lite(sequence_length: usize) -> Self {
        Self {
            vocab_size: 102_400,
            hidden_size: 2048,
            intermediate_size: 10_944,
            moe_intermediate_size: 1408,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            n_routed_experts: 64,
            n_shared_experts: 2,
            num_experts_per_tok: 1,
            first_k_dense_replace: 1,
            kv_lora_rank: 512,
            q_lora_rank: None,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: Some(RopeScaling {
                rope_type: "yarn".to_string(),
                factor: Some(40.0),
                original_max_position_embeddings: Some(4096),
                beta_fast: Some(32.0),
                beta_slow: Some(1.0),
                mscale: Some(0.707),
                mscale_all_dim: Some(0.707),
                attention_factor: None,
                truncate: None,
                rope_theta: None,
            }),
            max_position_embeddings: sequence_length,
            routed_scaling_factor: 1.0,
            initializer_range: 0.02,
            tie_word_embeddings: false,
            topk_method: "greedy".to_string(),
            hidden_act: "silu".to_string(),
            attention_bias: false,
            mlp_bias: false,
            n_group: Some(2),
            topk_group: Some(1),
            norm_topk_prob: true,
            bos_token_id: Some(100_000),
            eos_token_id: Some(100_001),
        }
    }

    /// A small DeepSeek-V2 for tests and CPU benchmarks: 3 layers (layer 0 dense, 1-2 MoE),
    /// 16 routed experts, MLA with small ranks, YaRN on. Its `mscale` (1.0) differs from
    /// `mscale_all_dim` (0.707) so the YaRN attention factor is not 1 and the parity test exercises it
    /// (DeepSeek-V2-Lite's equal values give exactly 1).
    pub fn tiny() -> Self {
        let mut c = Self::deepseek_v2_lite(64);
        c.vocab_size = 2048;
        c.hidden_size = 64;
        c.intermediate_size = 128;
        c.moe_intermediate_size = 32;
        c.num_hidden_layers = 3;
        c.num_attention_heads = 4;
        c.num_key_value_heads = Some(4);
        c.n_routed_experts = 16;
        c.kv_lora_rank = 32;
        c.qk_nope_head_dim = 16;
        c.qk_rope_head_dim = 8;
        c.v_head_dim = 16;
        if let Some(r) = c.rope_scaling.as_mut() {
            r.mscale = Some(1.0);
        }
        c.bos_token_id = Some(1);
        c.eos_token_id = Some(2);
        c
    }

    /// Parses a HuggingFace `config.json` (as is: apply [`ModelConfig::with_connito_overrides`] for the
    /// partial model) and validates it.
    pub fn from_json_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read model config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parse model config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(cfg)
    }

    /// The Connito partial-model overrides (spec §8.1): top-1 routing and `max_position_embeddings =
    /// sequence_length`.
    pub fn with_connito_overrides(mut self, sequence_length: usize) -> Self {
        self.num_experts_per_tok = 1;
        self.max_position_embeddings = sequence_length;
        self.norm_topk_prob = true;
        self
    }

    /// HuggingFace-compatible `config.json` text.
    pub fn to_json_string(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("model_type".into(), "deepseek_v2".into());
            obj.insert(
                "architectures".into(),
                serde_json::json!(["DeepseekV2ForCausalLM"]),
            );
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Rejects configurations this implementation does not compute faithfully.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.q_lora_rank.is_some() {
            bail!(
                "q_lora_rank must be null (only DeepSeek-V2-Lite's direct q_proj is implemented)"
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            );
        }
        if self.topk_method != "greedy" {
            bail!(
                "topk_method {:?} is not supported (only greedy)",
                self.topk_method
            );
        }
        if self.num_experts_per_tok != 1 {
            bail!(
                "num_experts_per_tok is {} but the partial model routes top-1 (Connito partial_topk = 1)",
                self.num_experts_per_tok
            );
        }
        if self.attention_bias || self.mlp_bias {
            bail!("attention_bias / mlp_bias are not supported");
        }
        if self.tie_word_embeddings {
            bail!("tie_word_embeddings is not supported");
        }
        if self.num_kv_heads() != self.num_attention_heads {
            bail!("num_key_value_heads must equal num_attention_heads for MLA");
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            bail!("qk_rope_head_dim must be even");
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            bail!("first_k_dense_replace exceeds num_hidden_layers");
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("n_routed_experts", self.n_routed_experts),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        if let Some(r) = &self.rope_scaling
            && r.rope_type != "yarn"
            && r.rope_type != "default"
        {
            bail!(
                "rope type {:?} is not supported (yarn or default)",
                r.rope_type
            );
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether layer `layer` is a MoE layer (else the dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace && layer < self.num_hidden_layers
    }

    /// Width of the always-applied shared-experts MLP.
    pub fn shared_intermediate_size(&self) -> usize {
        self.moe_intermediate_size * self.n_shared_experts
    }

    /// The rope theta in effect (transformers 5's `rope_parameters.rope_theta` wins).
    pub fn effective_rope_theta(&self) -> f64 {
        self.rope_scaling
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rope_theta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_config_json_parses_with_lite_values() {
        // Abridged copy of the hub config.json of deepseek-ai/DeepSeek-V2-Lite (extra keys ignored).
        let text = r#"{
          "architectures": ["DeepseekV2ForCausalLM"], "aux_loss_alpha": 0.001, "bos_token_id": 100000,
          "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
          "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
          "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
          "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
          "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
          "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null,
          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
          "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
          "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": true,
          "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
          "use_cache": true, "v_head_dim": 128, "vocab_size": 102400
        }"#;
        let cfg: ModelConfig = serde_json::from_str(text).expect("parse");
        assert!(
            cfg.validate().is_err(),
            "top-6 routing must be rejected before the overrides"
        );
        let cfg = cfg.with_connito_overrides(4096);
        cfg.validate().expect("valid after overrides");
        let mut lite = ModelConfig::deepseek_v2_lite(4096);
        // Fields the overrides do not touch come from the file.
        lite.n_group = Some(1);
        assert_eq!(cfg, lite);
    }

    #[test]
    fn transformers_5_rope_parameters_are_accepted() {
        // transformers 5 writes `rope_parameters` with `rope_type` and `rope_theta` inside.
        let mut v = serde_json::to_value(ModelConfig::tiny()).expect("json");
        let obj = v.as_object_mut().expect("object");
        obj.remove("rope_scaling");
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "rope_theta": 20000.0, "factor": 40.0,
                "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale": 1.0, "mscale_all_dim": 0.707}),
        );
        let cfg: ModelConfig = serde_json::from_value(v).expect("parse");
        let r = cfg.rope_scaling.as_ref().expect("rope");
        assert_eq!(r.rope_type, "yarn");
        assert_eq!(cfg.effective_rope_theta(), 20000.0);
        cfg.validate().expect("valid");
    }

    #[test]
    fn written_json_round_trips() {
        let tiny = ModelConfig::tiny();
        let back: ModelConfig = serde_json::from_str(&tiny.to_json_string()).expect("parse");
        assert_eq!(back, tiny);
    }

    #[test]
    fn from_json_file_names_the_file_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.json");
        std::fs::write(&p, "{ not json").expect("write");
        let err = format!(
            "{:#}",
            ModelConfig::from_json_file(&p).expect_err("must fail")
        );
        assert!(err.contains("config.json"), "{err}");
    }
}
