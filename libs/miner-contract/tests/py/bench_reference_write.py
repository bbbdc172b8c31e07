"""Benchmark (not a test): the reference miner's way of writing and hashing a shard.

bench_reference_write.py <dir> <bytes> builds fp16 tensors shaped like the real shard
([2816,2048] / [2048,1408]) until <bytes>, then times torch.save({"model_state_dict": sd}) into an
fsynced file followed by the reference get_model_hash (one bytes object of key bytes + tensor
bytes, blake2b digest_size=24). Prints one JSON line. Peak memory above the tensors is VmHWM
after the work minus VmRSS once the tensors exist (VmHWM reset through /proc/self/clear_refs).
"""

import hashlib
import json
import os
import sys
import time

import torch


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def get_model_hash(state_dict, hex=True):
    """The reference helper.get_model_hash (spec §7.5)."""
    buf = b""
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        buf += key.encode("utf-8")
        if t.dtype == torch.bfloat16:
            buf += t.view(torch.uint8).numpy().tobytes()
        else:
            buf += t.numpy().tobytes()
    digest = hashlib.blake2b(buf, digest_size=24).digest()
    return digest.hex() if hex else digest


def main():
    d, target = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sd, total, i = {}, 0, 0
    while total < target:
        layer, expert = 1 + i // 16, i % 16 // 2
        kind, shape = ("gate_up_proj", (2816, 2048)) if i % 2 == 0 else ("down_proj", (2048, 1408))
        t = torch.empty(shape, dtype=torch.float16).uniform_(-1, 1, generator=g)
        sd[f"model.layers.{layer}.mlp.experts.{expert}.{kind}"] = t
        total += t.numel() * 2
        i += 1
    rss_tensors = status_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    path = os.path.join(d, "model_expgroup_0.pt")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model_state_dict": sd}, f)
        f.flush()
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    h = get_model_hash(sd)
    t2 = time.perf_counter()
    peak = status_kib("VmHWM:")
    size = os.path.getsize(path)
    os.remove(path)
    print(json.dumps({
        "impl": "python", "tensors": len(sd), "tensor_bytes": total, "file_bytes": size,
        "wall_s": round(t2 - t0, 4), "save_s": round(t1 - t0, 4), "hash_s": round(t2 - t1, 4),
        "peak_above_tensors_mib": round((peak - rss_tensors) / 1024, 1), "hash": h,
    }))


if __name__ == "__main__":
    main()
