//! Tensor names of spec §7.3: HuggingFace DeepSeek-V2 names for `model_shared.pt` and per-expert keys
//! `model.layers.{L}.mlp.experts.{E}.{gate_up_proj,down_proj}` (original expert id `E`, no `.weight`).

use super::GroupExperts;
use super::config::ModelConfig;

/// The two tensors of one routed expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPart {
    /// `[2*I, H]`: rows `0..I` gate, `I..2I` up.
    GateUp,
    /// `[H, I]`.
    Down,
}

impl ExpertPart {
    pub fn suffix(self) -> &'static str {
        match self {
            ExpertPart::GateUp => "gate_up_proj",
            ExpertPart::Down => "down_proj",
        }
    }
}

/// `model.layers.{layer}.mlp.experts.{expert}.{gate_up_proj|down_proj}`.
pub fn expert_key(layer: usize, expert: usize, part: ExpertPart) -> String {
    format!(
        "model.layers.{layer}.mlp.experts.{expert}.{}",
        part.suffix()
    )
}

/// Parses a per-expert key of §7.3 into `(layer, original expert id, part)`.
pub fn parse_expert_key(name: &str) -> Option<(usize, usize, ExpertPart)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, part) = rest.split_once('.')?;
    let part = match part {
        "gate_up_proj" => ExpertPart::GateUp,
        "down_proj" => ExpertPart::Down,
        _ => return None,
    };
    Some((layer.parse().ok()?, expert.parse().ok()?, part))
}

/// A routed-expert tensor in the HuggingFace hub layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfExpertTensor {
    /// `model.layers.{L}.mlp.experts.{E}.{gate|up|down}_proj.weight` (hub DeepSeek-V2 layout).
    PerExpert {
        layer: usize,
        expert: usize,
        proj: HfProj,
    },
    /// `model.layers.{L}.mlp.experts.{gate_up_proj|down_proj}` stacked over all experts (transformers 5).
    Stacked { layer: usize, part: ExpertPart },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfProj {
    Gate,
    Up,
    Down,
}

/// Recognises routed-expert tensor names of HuggingFace checkpoints.
pub fn parse_hf_expert_name(name: &str) -> Option<HfExpertTensor> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    match rest {
        "gate_up_proj" => {
            return Some(HfExpertTensor::Stacked {
                layer,
                part: ExpertPart::GateUp,
            });
        }
        "down_proj" => {
            return Some(HfExpertTensor::Stacked {
                layer,
                part: ExpertPart::Down,
            });
        }
        _ => {}
    }
    let (expert, proj) = rest.split_once('.')?;
    let proj = match proj {
        "gate_proj.weight" => HfProj::Gate,
        "up_proj.weight" => HfProj::Up,
        "down_proj.weight" => HfProj::Down,
        _ => return None,
    };
    Some(HfExpertTensor::PerExpert {
        layer,
        expert: expert.parse().ok()?,
        proj,
    })
}

/// Every `model_shared.pt` name with its shape, in HuggingFace state-dict order.
pub fn shared_names(cfg: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let h = cfg.hidden_size as i64;
    let nh = cfg.num_attention_heads as i64;
    let qk = cfg.qk_head_dim() as i64;
    let r = cfg.kv_lora_rank as i64;
    let rope = cfg.qk_rope_head_dim as i64;
    let nope = cfg.qk_nope_head_dim as i64;
    let v = cfg.v_head_dim as i64;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size as i64, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![nh * qk, h]));
        out.push((
            format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
            vec![r + rope, h],
        ));
        out.push((format!("{p}.self_attn.kv_a_layernorm.weight"), vec![r]));
        out.push((
            format!("{p}.self_attn.kv_b_proj.weight"),
            vec![nh * (nope + v), r],
        ));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nh * v]));
        if cfg.is_moe_layer(l) {
            let s = cfg.shared_intermediate_size() as i64;
            out.push((
                format!("{p}.mlp.gate.weight"),
                vec![cfg.n_routed_experts as i64, h],
            ));
            out.push((
                format!("{p}.mlp.shared_experts.gate_proj.weight"),
                vec![s, h],
            ));
            out.push((format!("{p}.mlp.shared_experts.up_proj.weight"), vec![s, h]));
            out.push((
                format!("{p}.mlp.shared_experts.down_proj.weight"),
                vec![h, s],
            ));
        } else {
            let i = cfg.intermediate_size as i64;
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size as i64, h]));
    out
}

/// Every per-expert key of the group with its shape: layers ascending, experts ascending,
/// `gate_up_proj` before `down_proj`. Layers that are not MoE layers are skipped.
pub fn expert_names(cfg: &ModelConfig, experts: &GroupExperts) -> Vec<(String, Vec<i64>)> {
    let h = cfg.hidden_size as i64;
    let i = cfg.moe_intermediate_size as i64;
    let mut out = Vec::new();
    for (&l, ids) in experts {
        if !cfg.is_moe_layer(l) {
            continue;
        }
        for &e in ids {
            out.push((expert_key(l, e, ExpertPart::GateUp), vec![2 * i, h]));
            out.push((expert_key(l, e, ExpertPart::Down), vec![h, i]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_keys_parse_back() {
        let k = expert_key(7, 63, ExpertPart::GateUp);
        assert_eq!(k, "model.layers.7.mlp.experts.63.gate_up_proj");
        assert_eq!(parse_expert_key(&k), Some((7, 63, ExpertPart::GateUp)));
        assert_eq!(
            parse_expert_key("model.layers.1.mlp.experts.4.down_proj"),
            Some((1, 4, ExpertPart::Down))
        );
        assert_eq!(
            parse_expert_key("model.layers.1.mlp.experts.4.down_proj.weight"),
            None
        );
        assert_eq!(
            parse_expert_key("model.layers.1.mlp.shared_experts.down_proj.weight"),
            None
        );
        assert_eq!(
            parse_hf_expert_name("model.layers.3.mlp.experts.12.up_proj.weight"),
            Some(HfExpertTensor::PerExpert {
                layer: 3,
                expert: 12,
                proj: HfProj::Up
            })
        );
        assert_eq!(
            parse_hf_expert_name("model.layers.3.mlp.experts.down_proj"),
            Some(HfExpertTensor::Stacked {
                layer: 3,
                part: ExpertPart::Down
            })
        );
    }

    #[test]
    fn lite_group_zero_has_416_expert_tensors_of_spec_shapes() {
        let cfg = ModelConfig::deepseek_v2_lite(4096);
        let experts: GroupExperts = (1..27)
            .map(|l| (l, (0..8).map(|k| k * 8).collect()))
            .collect();
        let names = expert_names(&cfg, &experts);
        assert_eq!(names.len(), 416);
        let params: i64 = names.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        assert_eq!(params, 1_799_356_416);
        assert_eq!(names[0].1, vec![2816, 2048]);
        assert_eq!(names[1].1, vec![2048, 1408]);
        let shared = shared_names(&cfg);
        assert_eq!(
            shared[0],
            ("model.embed_tokens.weight".to_string(), vec![102_400, 2048])
        );
        assert!(shared.contains(&("model.layers.1.mlp.gate.weight".to_string(), vec![64, 2048])));
        assert!(
            shared
                .iter()
                .any(|(n, _)| n == "model.layers.0.mlp.gate_proj.weight")
        );
        assert!(
            !shared
                .iter()
                .any(|(n, _)| n == "model.layers.1.mlp.gate_proj.weight")
        );
    }
}
