"""PyTorch counterpart of trainer-svc/examples/bench_step.rs: optimizer steps/s of the reference loop.

Builds transformers' DeepseekV2ForCausalLM from WORK_DIR/config.json with Connito's partial MoE (only the
group's experts stacked, as CustomDeepseekV2Experts does, routed with the masked greedy top-1 router),
freezes everything else, and times the reference inner loop on CPU in float32 (spec §2.4.3, §8.6):
GA micro-batches of `loss = model(**batch).loss / GA; loss.item(); loss.backward()`, then the
non-finite-gradient filter, clip_grad_norm_(1.0), AdamW(lr 1e-5, betas (0.9, 0.95), wd 0.1) step,
cosine schedule step and zero_grad. The model hash of the reference (a full host copy per step) is NOT
included, so this is the loop at its cheapest.

usage: bench_step.py WORK_DIR --steps N --warmup W --ga G --batch B --seq T --threads K
prints one JSON line: {"best_s": ..., "median_s": ..., "cpu_s": ..., "final_loss": ...} (seconds per step;
cpu_s is the main thread's CPU time)
"""

import argparse
import json
import math
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV2Moe


def partial_forward(self: DeepseekV2Moe, hidden_states: torch.Tensor) -> torch.Tensor:
    residuals = hidden_states
    orig_shape = hidden_states.shape
    logits = F.linear(hidden_states.type(torch.float32), self.gate.weight.type(torch.float32))
    probs = logits.view(-1, logits.shape[-1]).softmax(dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~self.owned_mask, -1e4)
    w, idx = torch.topk(probs, k=1, dim=-1, sorted=False)
    local = self.global_to_local[idx]
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    out = self.experts(flat, local, w * self.routed_scaling_factor).view(*orig_shape)
    return out + self.shared_experts(residuals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    work = Path(a.work)
    cfg = json.loads((work / "config.json").read_text())
    for k in ("model_type", "architectures"):
        cfg.pop(k, None)
    group = {int(k): v for k, v in json.loads((work / "group.json").read_text()).items()}
    config = DeepseekV2Config(**cfg)
    config._attn_implementation = "sdpa"
    model = DeepseekV2ForCausalLM(config).to(torch.float32)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for layer_id, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, DeepseekV2Moe):
            continue
        ids = sorted(group[layer_id])
        moe = layer.mlp
        mask = torch.zeros(config.n_routed_experts, dtype=torch.bool)
        mask[ids] = True
        g2l = torch.zeros(config.n_routed_experts, dtype=torch.long)
        g2l[ids] = torch.arange(len(ids))
        moe.owned_mask, moe.global_to_local = mask, g2l
        ex = moe.experts
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach()[ids].clone())
        ex.down_proj = nn.Parameter(ex.down_proj.detach()[ids].clone())
        ex.num_experts = len(ids)
        trainable += [ex.gate_up_proj, ex.down_proj]
        moe.forward = types.MethodType(partial_forward, moe)
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95))
    total = 88000
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))

    n = a.batch * a.seq
    ids = (torch.arange(n, dtype=torch.long) * 7919 + 13) % config.vocab_size
    batch = {"input_ids": ids.view(a.batch, a.seq), "labels": ids.view(a.batch, a.seq).clone()}

    def step() -> float:
        last = 0.0
        for _ in range(a.ga):
            out = model(**batch)
            loss = out.loss / a.ga
            last = out.loss.item()
            loss.backward()
        params = [p for p in trainable if p.grad is not None]
        for p in params:
            if not torch.isfinite(p.grad).all():
                p.grad = None
        params = [p for p in trainable if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, error_if_nonfinite=False)
        opt.step()
        sched.step()
        opt.zero_grad()
        return last

    for _ in range(a.warmup):
        step()
    times = []
    loss = 0.0
    cpu0 = time.thread_time()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    cpu = (time.thread_time() - cpu0) / a.steps
    times.sort()
    print(json.dumps({"best_s": times[0], "median_s": times[len(times) // 2], "cpu_s": cpu, "final_loss": loss}))

if __name__ == "__main__":
    main()
