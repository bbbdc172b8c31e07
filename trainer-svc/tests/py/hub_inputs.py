"""Fixtures and the independent reference for trainer-svc/tests/hub_inputs.rs.

usage:
  hub_inputs.py model OUT CONFIG_JSON TOKENIZER_JSON
      A tiny pretrained DeepSeek-V2 made by transformers: DeepseekV2ForCausalLM built from CONFIG_JSON,
      seeded, saved with save_pretrained(max_shard_size=...) so there are several shards and a
      model.safetensors.index.json (per-expert gate/up/down keys, as deepseek-ai/DeepSeek-V2-Lite has),
      plus TOKENIZER_JSON copied in as tokenizer.json.
  hub_inputs.py reference REPO_DIR GROUP_JSON BATCH OUT
      Upstream's partial loading (addendum A3), written from its description and independent of the
      Rust code: a partial model of the group's experts (group order, stacked [n_local, 2I, H] /
      [n_local, H, I]) whose backbone tensors are copied from the checkpoint where shapes match, the
      router (`mlp.gate.weight`) rows taken for the group's experts in the group's order when its
      shape is [n_local, H] (copied whole when it keeps all experts, as upstream's partial model does:
      spec §8.2 softmax over all experts), `gate_up_proj = cat(gate_proj, up_proj)` and
      `down_proj` per owned expert. Runs the Connito partial router (softmax over all experts,
      non-owned replaced by -1e4, greedy top-1) in float32 and writes the loss on BATCH and the
      loaded expert tensors under their per-expert names.
  hub_inputs.py datasets OUT DOCS_PER_SHARD
      Dataset shards laid out like the two Hub repos: OUT/c4/en/c4-train.0000{0..2}-of-00003.json.gz
      (gzip JSON lines, `text`, `timestamp`, `url`) and en/c4-validation.00000-of-00001.json.gz, with a
      README.md whose `configs:` name the files; OUT/nemotron/4plus/train-0000{0..2}.parquet (pyarrow,
      columns `id`, `text`) with a README.md. Every document is unique ("c4 s<shard> d<doc> ...").
"""

import gzip
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def tiny_config(config_json: Path):
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config

    d = json.loads(config_json.read_text())
    for k in ("model_type", "architectures"):
        d.pop(k, None)
    cfg = DeepseekV2Config(**d)
    cfg._attn_implementation = "sdpa"
    return cfg


def make_model(out: Path, config_json: Path, tokenizer_json: Path) -> None:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2ForCausalLM

    torch.manual_seed(7)
    model = DeepseekV2ForCausalLM(tiny_config(config_json)).to(torch.float32)
    with torch.no_grad():
        # Pretrained-looking weights: not the init a fresh model would draw (norms != 1).
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(out), max_shard_size="100KB")
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3, shards


class Checkpoint:
    """Tensors of a sharded safetensors checkpoint, read through its index."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.repo / self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)


def partial_router_forward(self, hidden_states):
    residuals = hidden_states
    shape = hidden_states.shape
    flat = hidden_states.view(-1, shape[-1])
    logits = F.linear(flat.float(), self.gate.weight.float())
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~self.owned_mask, -1e4)
    weight, org = torch.topk(probs, k=1, dim=-1)
    local = self.global_to_local[org.squeeze(-1)]
    weight = weight.squeeze(-1) * self.routed_scaling_factor
    out = torch.zeros_like(flat)
    for i in range(self.gate_up.shape[0]):
        sel = (local == i).nonzero().squeeze(-1)
        if sel.numel() == 0:
            continue
        x = flat[sel]
        gate, up = F.linear(x, self.gate_up[i]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, self.down[i]) * weight[sel, None].to(x.dtype)
        out.index_add_(0, sel, h)
    return out.view(*shape) + self.shared_experts(residuals)


def reference(repo: Path, group_json: Path, batch_path: Path, out_path: Path) -> None:
    import types

    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV2Moe

    cfg = tiny_config(repo / "config.json")
    group = {int(k): [int(e) for e in v] for k, v in json.loads(group_json.read_text()).items()}
    model = DeepseekV2ForCausalLM(cfg).to(torch.float32)
    ckpt = Checkpoint(repo)
    out = {}
    full, sliced = 0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                continue  # replaced by the partial experts below
            src = ckpt.get(name).to(torch.float32)
            if src.shape == p.shape:
                p.copy_(src)
                full += 1
            elif name.endswith("mlp.gate.weight"):
                layer = int(name.split(".")[2])
                p.copy_(src[group[layer]])
                sliced += 1
            else:
                raise SystemExit(f"reference: {name} has shape {tuple(src.shape)}, model {tuple(p.shape)}")
        for layer_id, layer in enumerate(model.model.layers):
            if not isinstance(layer.mlp, DeepseekV2Moe):
                continue
            order = group[layer_id]
            gu, dn = [], []
            for e in order:
                pre = f"model.layers.{layer_id}.mlp.experts.{e}"
                g = ckpt.get(f"{pre}.gate_proj.weight").float()
                u = ckpt.get(f"{pre}.up_proj.weight").float()
                d = ckpt.get(f"{pre}.down_proj.weight").float()
                gu.append(torch.cat([g, u], dim=0))
                dn.append(d)
                out[f"{pre}.gate_up_proj"] = gu[-1].contiguous()
                out[f"{pre}.down_proj"] = d.contiguous()
                sliced += 2
            moe = layer.mlp
            moe.gate_up = torch.stack(gu)
            moe.down = torch.stack(dn)
            mask = torch.zeros(cfg.n_routed_experts, dtype=torch.bool)
            mask[order] = True
            moe.owned_mask = mask
            g2l = torch.full((cfg.n_routed_experts,), -1, dtype=torch.long)
            g2l[torch.tensor(order)] = torch.arange(len(order))
            moe.global_to_local = g2l
            moe.forward = types.MethodType(partial_router_forward, moe)
        model.eval()
        batch = load_file(str(batch_path))
        res = model(input_ids=batch["input_ids"], labels=batch["labels"])
    out["loss"] = res.loss.detach().reshape(1).float().contiguous()
    out["loaded_counts"] = torch.tensor([full, sliced], dtype=torch.int64)
    save_file(out, str(out_path))


def datasets(out: Path, per_shard: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    c4 = out / "c4"
    (c4 / "en").mkdir(parents=True, exist_ok=True)
    for s in range(3):
        with gzip.open(c4 / "en" / f"c4-train.{s:05d}-of-00003.json.gz", "wt", encoding="utf-8") as f:
            for d in range(per_shard):
                row = {"text": f"c4 s{s} d{d} the river runs to the sea number {s * 1000 + d}.",
                       "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{s}/{d}"}
                f.write(json.dumps(row) + "\n")
    with gzip.open(c4 / "en" / "c4-validation.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
        for d in range(per_shard):
            f.write(json.dumps({"text": f"c4 validation {d}", "timestamp": "", "url": ""}) + "\n")
    (c4 / "README.md").write_text(
        "---\npretty_name: C4\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n"
        "    path: en/c4-train.*.json.gz\n  - split: validation\n    path: en/c4-validation.*.json.gz\n---\n# C4\n"
    )
    nem = out / "nemotron"
    (nem / "4plus").mkdir(parents=True, exist_ok=True)
    for s in range(3):
        texts = [f"nemotron s{s} d{d}: solve {d} + {s} = {d + s}." for d in range(per_shard)]
        table = pa.table({"id": pa.array([f"{s}-{d}" for d in range(per_shard)]), "text": pa.array(texts)})
        pq.write_table(table, nem / "4plus" / f"train-{s:05d}.parquet", row_group_size=max(1, per_shard // 3))
    (nem / "README.md").write_text(
        "---\nconfigs:\n- config_name: 3\n  data_files:\n  - split: train\n    path: 3/*.parquet\n"
        "- config_name: 4plus\n  data_files:\n  - split: train\n    path: 4plus/*.parquet\n---\n# Nemotron-CC-Math\n"
    )


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "model":
        make_model(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "reference":
        reference(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    elif cmd == "datasets":
        datasets(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
