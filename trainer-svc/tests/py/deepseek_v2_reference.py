"""PyTorch reference for the partial DeepSeek-V2 model (spec §8.2), used by trainer-svc/tests/parity.rs.

Builds transformers' DeepseekV2ForCausalLM (its attention, RMSNorm, YaRN rotary embedding, MLPs and
stacked experts) from the config.json the Rust test wrote, replaces only the MoE routing with Connito's
partial router (softmax over all experts, non-owned experts replaced by -1e4, greedy top-k), loads the
weights the Rust model was initialised with, runs one forward/backward in float32 on CPU and writes the
loss, the logits and the owned experts' gradients under the per-expert names of spec §7.3.

usage: deepseek_v2_reference.py WORK_DIR
  reads  WORK_DIR/config.json, WORK_DIR/weights.safetensors, WORK_DIR/batch.safetensors
  writes WORK_DIR/reference.safetensors
"""

import json
import re
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV2Moe

EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_up_proj|down_proj)$")


def partial_moe_forward(self: DeepseekV2Moe, hidden_states: torch.Tensor) -> torch.Tensor:
    """CustomDeepseekV2Moe routing (spec §8.2) on top of transformers' experts and shared experts."""
    residuals = hidden_states
    orig_shape = hidden_states.shape
    router_logits = F.linear(hidden_states.type(torch.float32), self.gate.weight.type(torch.float32))
    probs = router_logits.view(-1, router_logits.shape[-1]).softmax(dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~self.owned_mask, -1e4)
    topk_weight, topk_idx = torch.topk(probs, k=self.top_k, dim=-1, sorted=False)
    topk_weight = topk_weight * self.routed_scaling_factor
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    routed = self.experts(flat, topk_idx, topk_weight).view(*orig_shape)
    self.last_routing = topk_idx.detach().clone()
    return routed + self.shared_experts(residuals)


def main() -> None:
    work = Path(sys.argv[1])
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    cfg_dict = json.loads((work / "config.json").read_text())
    for k in ("model_type", "architectures"):
        cfg_dict.pop(k, None)
    config = DeepseekV2Config(**cfg_dict)
    config._attn_implementation = "sdpa"
    model = DeepseekV2ForCausalLM(config).to(torch.float32)
    model.train()

    weights = load_file(str(work / "weights.safetensors"))
    owned: dict[int, list[int]] = {}
    state = model.state_dict()
    plain = {}
    with torch.no_grad():
        for name, t in weights.items():
            m = EXPERT_KEY.match(name)
            if m:
                layer, expert, part = int(m.group(1)), int(m.group(2)), m.group(3)
                owned.setdefault(layer, []).append(expert)
                getattr(model.model.layers[layer].mlp.experts, part)[expert].copy_(t)
            else:
                if name not in state:
                    raise SystemExit(f"reference: unknown tensor {name}")
                plain[name] = t
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [n for n in missing if ".mlp.experts." not in n]
    if missing or unexpected:
        raise SystemExit(f"reference: missing {missing} unexpected {unexpected}")

    for p in model.parameters():
        p.requires_grad_(False)
    for layer_id, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, DeepseekV2Moe):
            mask = torch.zeros(config.n_routed_experts, dtype=torch.bool)
            mask[sorted(set(owned.get(layer_id, [])))] = True
            layer.mlp.owned_mask = mask
            layer.mlp.forward = types.MethodType(partial_moe_forward, layer.mlp)
            layer.mlp.experts.gate_up_proj.requires_grad_(True)
            layer.mlp.experts.down_proj.requires_grad_(True)

    batch = load_file(str(work / "batch.safetensors"))
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    out.loss.backward()

    result = {
        "loss": out.loss.detach().reshape(1).contiguous(),
        "logits": out.logits.detach().float().contiguous(),
    }
    for layer_id, experts in owned.items():
        ex = model.model.layers[layer_id].mlp.experts
        routing = model.model.layers[layer_id].mlp.last_routing
        result[f"routing.{layer_id}"] = routing.reshape(-1).to(torch.int64).contiguous()
        for e in sorted(set(experts)):
            for part in ("gate_up_proj", "down_proj"):
                grad = getattr(ex, part).grad
                g = torch.zeros_like(getattr(ex, part)[e]) if grad is None else grad[e]
                result[f"model.layers.{layer_id}.mlp.experts.{e}.{part}"] = g.contiguous()
    save_file(result, str(work / "reference.safetensors"))


if __name__ == "__main__":
    main()
