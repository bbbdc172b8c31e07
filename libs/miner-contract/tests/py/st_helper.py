"""Reference side of the safetensors tests: real `safetensors.torch` and PyTorch 2.11.

Commands (each prints one JSON object):
  describe FILE          load_file: every tensor's dtype, shape and BLAKE2b-24 digest, plus the
                         model hash computed the reference's way (spec section 7.5)
  resave SRC DST         save_file(load_file(SRC), DST), then describe DST
  write DST [meta]       save_file of a varied state dict (optionally with __metadata__), describe
  pt2st SRC DST          torch.load(SRC, weights_only=True) (unwrapping model_state_dict), save_file
"""
import hashlib
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def raw(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint8).numpy().tobytes()
    return t.numpy().tobytes()


def model_hash(sd):
    h = hashlib.blake2b(digest_size=24)
    for key in sorted(sd):
        h.update(key.encode("utf-8"))
        h.update(raw(sd[key]))
    return h.hexdigest()


def describe(path):
    sd = load_file(path)
    out = {}
    for k, t in sd.items():
        out[k] = {
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "digest": hashlib.blake2b(raw(t), digest_size=24).hexdigest(),
        }
    return {"tensors": out, "hash": model_hash(sd)}


def varied():
    g = torch.Generator().manual_seed(5)
    sd = {}
    for layer in (3, 12):
        for e in (7, 2):
            sd[f"model.layers.{layer}.mlp.experts.{e}.gate_up_proj"] = torch.randn(6, 4, generator=g).to(torch.float16)
            sd[f"model.layers.{layer}.mlp.experts.{e}.down_proj"] = torch.randn(4, 3, generator=g).to(torch.float16)
    sd["bf16.vec"] = torch.randn(9, generator=g).to(torch.bfloat16)
    sd["f32.mat"] = torch.randn(2, 5, generator=g)
    sd["f64.one"] = torch.randn(1, generator=g).to(torch.float64)
    sd["i64.scalar"] = torch.tensor(-7, dtype=torch.int64)
    sd["i32"] = torch.arange(5, dtype=torch.int32)
    sd["i16"] = torch.arange(3, dtype=torch.int16)
    sd["i8"] = torch.arange(-2, 2, dtype=torch.int8)
    sd["u8"] = torch.arange(6, dtype=torch.uint8)
    sd["mask"] = torch.tensor([True, False, True])
    sd["empty"] = torch.zeros(0, 3, dtype=torch.float16)
    sd['odd "name"\nwith\tcontrols \u00e9\u4e2d'] = torch.ones(2, dtype=torch.float16)
    return sd


def main():
    cmd = sys.argv[1]
    if cmd == "describe":
        res = describe(sys.argv[2])
    elif cmd == "resave":
        save_file(load_file(sys.argv[2]), sys.argv[3])
        res = describe(sys.argv[3])
    elif cmd == "write":
        meta = {"format": "pt", "note": "anything"} if len(sys.argv) > 3 else None
        save_file(varied(), sys.argv[2], metadata=meta)
        res = describe(sys.argv[2])
    elif cmd == "pt2st":
        obj = torch.load(sys.argv[2], weights_only=True)
        sd = obj.get("model_state_dict", obj)
        save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[3])
        res = describe(sys.argv[3])
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
