"""PyTorch counterpart of trainer-svc/examples/bench_step.rs: optimizer steps/s of the reference loop.

Builds transformers' DeepseekV2ForCausalLM from WORK_DIR/config.json with Connito's partial MoE (only the
group's experts stacked, as CustomDeepseekV2Experts does, routed with the masked greedy top-1 router),
freezes everything else, and times the reference inner loop (spec §2.4.3, §8.6): GA micro-batches of
`loss = model(**batch).loss / GA; loss.item(); scaler.scale(loss).backward()` (under
`autocast(cuda, fp16|bf16)` for the mixed precisions, with the frozen weights in that dtype and the
trainable experts upcast to fp32, as `load_model` + `freeze_parameters` do), then the non-finite-gradient
filter, `scaler.unscale_`, clip_grad_norm_(1.0), AdamW(lr 1e-5, betas (0.9, 0.95), wd 0.1) through
`scaler.step`, `scaler.update`, cosine schedule step and zero_grad. `--checkpointing` turns on
`gradient_checkpointing_enable()` as the reference does on GPU. The model hash of the reference (a full
host copy per step) is NOT included, so this is the loop at its cheapest.

usage: bench_step.py WORK_DIR --steps N --warmup W --ga G --batch B --seq T --threads K
                     [--device cpu|cuda] [--precision fp32|fp16|bf16] [--checkpointing]
prints one JSON line: {"best_s": ..., "median_s": ..., "cpu_s": ..., "final_loss": ...} (seconds per step;
cpu_s is the main thread's CPU time); on CUDA also the allocator's peak bytes during the timed steps and
the wall-clock bounds of the timed steps (for an external memory sampler).
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
    out = self.experts(flat, local, w * self.config.routed_scaling_factor).view(*orig_shape)
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    t_setup = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    work = Path(a.work)
    cfg = json.loads((work / "config.json").read_text())
    for k in ("model_type", "architectures"):
        cfg.pop(k, None)
    group = {int(k): v for k, v in json.loads((work / "group.json").read_text()).items()}
    config = DeepseekV2Config(**cfg)
    config._attn_implementation = "sdpa"
    # Built directly on the device in the frozen dtype (the full 64-expert model, then sliced to the group,
    # as the reference's partial model holds only the group's experts).
    torch.set_default_dtype(dtype)
    with dev:
        model = DeepseekV2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for layer_id, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, DeepseekV2Moe):
            continue
        ids = sorted(group[layer_id])
        moe = layer.mlp
        mask = torch.zeros(config.n_routed_experts, dtype=torch.bool, device=dev)
        mask[ids] = True
        g2l = torch.zeros(config.n_routed_experts, dtype=torch.long, device=dev)
        g2l[ids] = torch.arange(len(ids), device=dev)
        moe.owned_mask, moe.global_to_local = mask, g2l
        ex = moe.experts
        # Trainable experts upcast to fp32 (freeze_parameters(upcast_trainable=True)).
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach()[ids].float().clone())
        ex.down_proj = nn.Parameter(ex.down_proj.detach()[ids].float().clone())
        ex.num_experts = len(ids)
        trainable += [ex.gate_up_proj, ex.down_proj]
        moe.forward = types.MethodType(partial_forward, moe)
    if a.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95))
    use_amp = dev.type == "cuda" and a.precision != "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and a.precision == "fp16")
    total = 88000
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))

    n = a.batch * a.seq
    ids = ((torch.arange(n, dtype=torch.long) * 7919 + 13) % config.vocab_size).to(dev)
    batch = {"input_ids": ids.view(a.batch, a.seq), "labels": ids.view(a.batch, a.seq).clone()}

    def step() -> float:
        last = 0.0
        for _ in range(a.ga):
            with torch.autocast(dev.type, dtype=dtype, enabled=use_amp):
                out = model(**batch)
            loss = out.loss / a.ga
            last = out.loss.item()
            scaler.scale(loss).backward()
        params = [p for p in trainable if p.grad is not None]
        for p in params:
            if not torch.isfinite(p.grad).all():
                p.grad = None
        scaler.unscale_(opt)
        params = [p for p in trainable if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, error_if_nonfinite=False)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return last

    if dev.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    setup_s = time.perf_counter() - t_setup
    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall0 = time.time()
    times = []
    loss = 0.0
    cpu0 = time.thread_time()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    cpu = (time.thread_time() - cpu0) / a.steps
    wall1 = time.time()
    times.sort()
    out = {"best_s": times[0], "median_s": times[len(times) // 2], "cpu_s": cpu, "final_loss": loss,
           "setup_s": setup_s, "timed_from_unix": wall0, "timed_to_unix": wall1,
           "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    if dev.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    print(json.dumps(out))

if __name__ == "__main__":
    main()
