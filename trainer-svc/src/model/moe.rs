//! The dense MLP and the partial MoE block (spec §8.2): shared experts always applied, plus the
//! group's routed experts with Connito's masked greedy top-1 router.

use tch::{Device, Kind, Tensor};

/// `down(silu(gate(x)) * up(x))` with frozen weights (HuggingFace `DeepseekV2MLP`). The `gate_proj`
/// and `up_proj` weights are the two halves (views) of one `[2*I, H]` tensor, so one matmul computes
/// both.
#[derive(Debug)]
pub struct DenseMlp {
    /// `[gate_proj; up_proj]`, `[2*I, H]`.
    pub gate_up: Tensor,
    pub down_proj: Tensor,
    pub intermediate: i64,
}

impl DenseMlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gu = x.linear::<Tensor>(&self.gate_up, None);
        let i = self.intermediate;
        (gu.narrow(-1, 0, i).silu() * gu.narrow(-1, i, i)).linear::<Tensor>(&self.down_proj, None)
    }
}

/// One MoE layer of the partial model: only the owned experts exist.
#[derive(Debug)]
pub struct PartialMoe {
    /// Router `gate.weight [n_routed_experts, H]` over ALL experts (frozen).
    pub gate: Tensor,
    pub shared_experts: DenseMlp,
    /// Sorted original ids of the owned experts.
    pub expert_ids: Vec<usize>,
    /// `expert_ids` as an int64 tensor on the model device (index into the router's columns).
    pub owned_index: Tensor,
    /// fp32 masters `[2*I, H]` (rows `0..I` gate, `I..2I` up), one per owned expert, requires_grad.
    pub gate_up_proj: Vec<Tensor>,
    /// fp32 masters `[H, I]`, one per owned expert, requires_grad.
    pub down_proj: Vec<Tensor>,
    pub intermediate: i64,
    pub routed_scaling_factor: f64,
}

/// Routing decision for a flat batch of tokens.
#[derive(Debug)]
pub struct Routing {
    /// Local expert index (position in `expert_ids`) per token, int64 `[N]`.
    pub local: Tensor,
    /// Routing weight per token (the owned expert's softmax probability × scaling), float32 `[N]`.
    pub weight: Tensor,
}

impl PartialMoe {
    /// Router: `softmax(x.float() @ gate.float().T)` over all experts, non-owned experts masked out
    /// (Connito replaces them by -1e4), greedy top-1. Selecting the owned columns and taking their
    /// maximum is the same choice and weight, and never picks a non-owned expert.
    pub fn route(&self, x2: &Tensor) -> Routing {
        let logits = x2
            .to_kind(Kind::Float)
            .matmul(&self.gate.to_kind(Kind::Float).tr());
        let probs = logits.softmax(-1, Kind::Float);
        let owned = probs.index_select(1, &self.owned_index);
        let (weight, local) = owned.max_dim(1, false);
        let weight = if self.routed_scaling_factor == 1.0 {
            weight
        } else {
            weight * self.routed_scaling_factor
        };
        Routing { local, weight }
    }

    /// `x [B, T, H]` (compute dtype) -> `[B, T, H]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let h = size[size.len() - 1];
        let kind = x.kind();
        let x2 = x.reshape([-1, h]);
        let routing = self.route(&x2);
        let n_local = self.expert_ids.len() as i64;
        // One small device->host copy per layer: how many tokens each owned expert gets.
        let counts = Vec::<i64>::try_from(
            &routing
                .local
                .bincount::<Tensor>(None, n_local)
                .to_device(Device::Cpu),
        )
        .unwrap_or_default();
        let order = routing.local.argsort_stable(true, 0, false);
        let xs = x2.index_select(0, &order);
        let ws = routing.weight.index_select(0, &order);
        let mut outs = Vec::with_capacity(self.expert_ids.len());
        let mut offset = 0i64;
        for (e, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let xe = xs.narrow(0, offset, count);
            offset += count;
            let gu = xe.linear::<Tensor>(&self.gate_up_proj[e].to_kind(kind), None);
            let act = gu.narrow(1, 0, self.intermediate).silu()
                * gu.narrow(1, self.intermediate, self.intermediate);
            outs.push(act.linear::<Tensor>(&self.down_proj[e].to_kind(kind), None));
        }
        let shared = self.shared_experts.forward(x);
        if outs.is_empty() {
            // No tokens (empty batch).
            return shared;
        }
        let ys = (Tensor::cat(&outs, 0) * ws.unsqueeze(1)).to_kind(kind);
        let routed = x2.zeros_like().index_add(0, &order, &ys);
        routed.reshape(&size[..]) + shared
    }
}

/// The MLP of one decoder layer.
#[derive(Debug)]
pub enum Mlp {
    Dense(DenseMlp),
    Moe(PartialMoe),
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Dense(m) => m.forward(x),
            Mlp::Moe(m) => m.forward(x),
        }
    }
}
