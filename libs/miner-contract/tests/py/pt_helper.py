"""Python side of the .pt codec tests: real PyTorch loads what Rust wrote and writes what Rust reads.

Usage:
  pt_helper.py check <file.pt>...    load each with torch.load(weights_only=True) (and mmap=True),
                                     print one JSON object {path: description}
  pt_helper.py make <dir>            torch.save the reference file kinds into <dir>, print
                                     {path: description} of what Python itself saved
  pt_helper.py bad <dir>             write malformed files into <dir>, print {kind: path}
  pt_helper.py bigcheck <file.pt>    mmap-load a large file, print its model hash (manual ZIP64 check)
  pt_helper.py bigsave <file.pt> <n> torch.save about n bytes of fp16, print its model hash

A description is {"layout": "model_state_dict" | "plain", "model_hash": <reference get_model_hash>,
"tensors": {name: {"dtype": "torch.float16", "shape": [...], "digest": blake2b-24 of raw LE bytes}}}.
"""

import collections
import hashlib
import io
import json
import os
import sys
import zipfile

import torch


def raw_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes, as the reference get_model_hash takes them."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return t.numpy().tobytes()


def get_model_hash(state_dict) -> str:
    """Port of the reference helper.get_model_hash (spec §7.5)."""
    buf = b""
    for key in sorted(state_dict):
        buf += key.encode("utf-8")
        buf += raw_bytes(state_dict[key])
    return hashlib.blake2b(buf, digest_size=24).hexdigest()


def describe(obj) -> dict:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        layout, sd = "model_state_dict", obj["model_state_dict"]
    else:
        layout, sd = "plain", obj
    tensors = {}
    for name, t in sd.items():
        assert isinstance(t, torch.Tensor), f"{name} is {type(t)}"
        tensors[name] = {
            "dtype": str(t.dtype),
            "shape": list(t.shape),
            "digest": hashlib.blake2b(raw_bytes(t), digest_size=24).hexdigest(),
        }
    return {"layout": layout, "model_hash": get_model_hash(sd), "tensors": tensors}


def check(paths):
    out = {}
    for p in paths:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        d = describe(obj)
        # The mmap path requires every record to be 64-byte aligned and the zip offsets exact.
        obj2 = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        d2 = describe(obj2)
        assert d == d2, f"{p}: mmap load differs"
        d["type"] = type(obj).__name__
        out[p] = d
    print(json.dumps(out))


def bigcheck(path):
    """Load a (large) file with mmap and print its model hash, hashed incrementally."""
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    sd = obj["model_state_dict"] if "model_state_dict" in obj else obj
    h = hashlib.blake2b(digest_size=24)
    for key in sorted(sd):
        h.update(key.encode("utf-8"))
        h.update(raw_bytes(sd[key]))
    print(json.dumps({"model_hash": h.hexdigest(), "tensors": len(sd)}))


def bigsave(path, nbytes):
    """torch.save a state dict of about nbytes fp16 (for reading a torch-written ZIP64 file)."""
    g = torch.Generator().manual_seed(3)
    sd, total, i = {}, 0, 0
    while total < nbytes:
        shape = (2816, 2048) if i % 2 == 0 else (2048, 1408)
        t = torch.empty(shape, dtype=torch.float16).uniform_(-1, 1, generator=g)
        sd[f"model.layers.{1 + i // 16}.mlp.experts.{i % 16 // 2}.w{i}"] = t
        total += t.numel() * 2
        i += 1
    torch.save({"model_state_dict": sd}, path)
    h = hashlib.blake2b(digest_size=24)
    for key in sorted(sd):
        h.update(key.encode("utf-8"))
        h.update(raw_bytes(sd[key]))
    print(json.dumps({"model_hash": h.hexdigest(), "tensors": len(sd)}))


def make(d):
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    files = {}

    def save(name, obj):
        p = os.path.join(d, name)
        torch.save(obj, p)
        files[p] = describe(obj)

    sd = {
        "model.layers.1.mlp.experts.4.gate_up_proj": torch.randn(6, 4, generator=g).half(),
        "model.layers.1.mlp.experts.4.down_proj": torch.randn(4, 3, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(5, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "ints": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-30000, 1, 30000], dtype=torch.int16),
        "i32": torch.tensor([[-(2**31)], [2**31 - 1]], dtype=torch.int32),
    }
    save("model_expgroup_0.pt", {"model_state_dict": sd})
    save("plain.pt", dict(sd))

    # model.state_dict(): an OrderedDict with a BUILD of _metadata.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model = model.to(torch.bfloat16)
    save("module_state_dict.pt", model.state_dict())
    save("module_wrapped.pt", {"model_state_dict": model.state_dict()})

    # Views: a transposed (non-contiguous) tensor, a slice at a storage offset, a strided slice,
    # and two tensors sharing one storage (and the same tensor under two names).
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    half = torch.randn(8, 6, generator=g).half()
    views = {
        "transposed": base.t(),
        "offset_rows": base[2:5],
        "strided": base[1::2, 3::3],
        "shared_a": base[0],
        "shared_b": base[5, 2:7],
        "half_t": half.t()[1:4],
        "tied_1": half,
        "tied_2": half,
    }
    save("views.pt", {"model_state_dict": views})
    # Many tensors: memo indices past 255 (LONG_BINPUT/LONG_BINGET).
    many = {f"layer.{i:04d}.w": torch.full((2,), float(i)).half() for i in range(300)}
    save("many.pt", {"model_state_dict": many})
    print(json.dumps(files))


def rewrite(src, dst, replace):
    """Copy zip src to dst, replacing records' bytes via replace(name, data) -> bytes | None."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = replace(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def bad(d):
    os.makedirs(d, exist_ok=True)
    good = os.path.join(d, "good.pt")
    t = torch.arange(8, dtype=torch.float16)
    torch.save({"model_state_dict": {"w": t}}, good)
    out = {}

    def pkl_swap(old: bytes, new: bytes):
        def f(name, data):
            if name.endswith("/data.pkl"):
                assert old in data, (old, data)
                return data.replace(old, new)
            return data
        return f

    p = os.path.join(d, "forbidden_global.pt")
    rewrite(good, p, pkl_swap(b"collections\nOrderedDict\n", b"os\nsystem\n"))
    out["forbidden_global"] = p

    p = os.path.join(d, "unknown_storage.pt")
    rewrite(good, p, pkl_swap(b"torch\nHalfStorage\n", b"torch\nComplexFloatStorage\n"))
    out["unknown_storage"] = p

    p = os.path.join(d, "bad_pickle.pt")
    rewrite(good, p, lambda n, data: b"\x80\x02}q\x00(garbage" if n.endswith("/data.pkl") else data)
    out["bad_pickle"] = p

    p = os.path.join(d, "out_of_bounds.pt")
    rewrite(good, p, lambda n, data: data[:6] if n.endswith("/data/0") else data)
    out["out_of_bounds"] = p

    p = os.path.join(d, "missing_storage.pt")
    rewrite(good, p, lambda n, data: None if n.endswith("/data/0") else data)
    out["missing_storage"] = p

    p = os.path.join(d, "not_checkpoint_ints.pt")
    torch.save({"step": 3, "loss": 1.5}, p)
    out["not_checkpoint_ints"] = p

    p = os.path.join(d, "not_checkpoint_list.pt")
    torch.save([t, t], p)
    out["not_checkpoint_list"] = p

    p = os.path.join(d, "not_checkpoint_empty.pt")
    torch.save({"model_state_dict": {}}, p)
    out["not_checkpoint_empty"] = p

    p = os.path.join(d, "optimizer_like.pt")
    torch.save({"optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1}]}}, p)
    out["optimizer_like"] = p

    p = os.path.join(d, "compressed.pt")
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    out["compressed"] = p

    # Expanded views (stride 0): more elements than their storage holds. The reader refuses
    # them before reading data (the big one would otherwise ask for 2**40 elements).
    p = os.path.join(d, "expanded_small.pt")
    torch.save({"model_state_dict": {"w": torch.tensor([1.0, 2.0]).expand(3, 2)}}, p)
    out["expanded_small"] = p
    p = os.path.join(d, "expanded_huge.pt")
    torch.save({"model_state_dict": {"w": torch.ones(1).expand(2**20, 2**20)}}, p)
    out["expanded_huge"] = p

    p = os.path.join(d, "legacy.pt")
    torch.save({"model_state_dict": {"w": t}}, p, _use_new_zipfile_serialization=False)
    out["legacy"] = p
    print(json.dumps(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "check":
        check(sys.argv[2:])
    elif cmd == "make":
        make(sys.argv[2])
    elif cmd == "bigcheck":
        bigcheck(sys.argv[2])
    elif cmd == "bigsave":
        bigsave(sys.argv[2], int(sys.argv[3]))
    elif cmd == "bad":
        bad(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
