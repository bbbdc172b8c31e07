# A line-by-line Python port of the reference's assign_miners_to_validators (spec §6.2 step 3),
# used to cross-check the Rust implementation. Reads JSON cases on stdin, writes answers.
import hashlib, json, sys

def h256_int(*parts):
    return int.from_bytes(hashlib.sha256(b"".join(str(p).encode() + b"\x00" for p in parts)).digest(), "big")

def assign(validators, miners, max_miners_per_validator=None):
    n_v, n_m = len(validators), len(miners)
    if n_v == 0:
        return {}
    combined_seed_str = "".join(str(validators[v]) for v in sorted(validators.keys()))
    combined_seed = hashlib.sha256(combined_seed_str.encode()).hexdigest()
    base, rem = n_m // n_v, n_m % n_v
    v_ids = list(validators.keys())
    ranked = sorted(v_ids, key=lambda vid: h256_int("cap_bonus", validators[vid], combined_seed), reverse=True)
    caps = {vid: base for vid in v_ids}
    for vid in ranked[:rem]:
        caps[vid] += 1
    if max_miners_per_validator is not None:
        for vid in v_ids:
            caps[vid] = min(caps[vid], max_miners_per_validator)
    miners_sorted = sorted(miners, key=lambda mid: h256_int("miner_order", mid, combined_seed))
    out = {vid: [] for vid in v_ids}
    for mid in miners_sorted:
        prefs = sorted(v_ids, key=lambda vid: h256_int("preference", mid, validators[vid], combined_seed), reverse=True)
        for vid in prefs:
            if caps[vid] > 0:
                out[vid].append(mid)
                caps[vid] -= 1
                break
        else:
            out[prefs[-1]].append(mid)
    return out

cases = json.load(sys.stdin)
print(json.dumps([assign(dict(c["validators"]), c["miners"], c.get("cap")) for c in cases]))
