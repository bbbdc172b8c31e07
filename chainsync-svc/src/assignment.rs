//! The validator → miner assignment of the historical HTTP submission (spec §6.2 step 3),
//! bit-for-bit as the reference's `assign_miners_to_validators`.
//!
//! `h256_int(*parts) = int.from_bytes(sha256(b"".join(str(p).encode() + b"\0" for p in parts)), "big")`;
//! a 256-bit big-endian integer compares like its 32-byte array, so digests are compared directly.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// `h256_int` as a 32-byte big-endian digest (ordering = integer ordering).
pub fn h256(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// `sha256("".join(str(seed) for validators sorted by hotkey)).hexdigest()`.
pub fn combined_seed(validators: &[(String, u64)]) -> String {
    let mut sorted: Vec<&(String, u64)> = validators.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let joined: String = sorted.iter().map(|(_, s)| s.to_string()).collect();
    hex::encode(Sha256::digest(joined.as_bytes()))
}

/// The assignment: validator hotkey → its miners, in assignment order.
pub type Assignment = BTreeMap<String, Vec<String>>;

/// `assign_miners_to_validators(validators={hotkey: seed}, miners, max_miners_per_validator)`.
///
/// `validators` is in the reference's dict order (insertion order of the commitments read);
/// that order only breaks exact hash ties, which do not happen in practice. With no validators
/// the assignment is empty.
pub fn assign_miners_to_validators(
    validators: &[(String, u64)],
    miners: &[String],
    max_miners_per_validator: Option<usize>,
) -> Assignment {
    let mut out: Assignment = BTreeMap::new();
    if validators.is_empty() {
        return out;
    }
    let combined = combined_seed(validators);
    let n_v = validators.len();
    let n_m = miners.len();
    let (base, rem) = (n_m / n_v, n_m % n_v);

    // Capacities: base each, +1 for the top `rem` by cap_bonus (descending, stable).
    let seeds: Vec<String> = validators.iter().map(|(_, s)| s.to_string()).collect();
    let mut ranked: Vec<usize> = (0..n_v).collect();
    ranked.sort_by_key(|&i| std::cmp::Reverse(h256(&["cap_bonus", &seeds[i], &combined])));
    let mut capacity = vec![base; n_v];
    for &i in ranked.iter().take(rem) {
        capacity[i] += 1;
    }
    if let Some(cap) = max_miners_per_validator {
        for c in &mut capacity {
            *c = (*c).min(cap);
        }
    }

    // Miner order: ascending h256("miner_order", miner, combined) (stable).
    let mut order: Vec<&String> = miners.iter().collect();
    order.sort_by_key(|m| h256(&["miner_order", m, &combined]));

    let mut lists: Vec<Vec<String>> = vec![Vec::new(); n_v];
    for m in order {
        let mut prefs: Vec<usize> = (0..n_v).collect();
        prefs.sort_by_key(|&i| std::cmp::Reverse(h256(&["preference", m, &seeds[i], &combined])));
        match prefs.iter().find(|&&i| capacity[i] > 0) {
            Some(&i) => {
                capacity[i] -= 1;
                lists[i].push(m.clone());
            }
            // The reference's fallback when every capacity is used up: the least preferred.
            None => {
                if let Some(&last) = prefs.last() {
                    lists[last].push(m.clone());
                }
            }
        }
    }
    for ((hk, _), list) in validators.iter().zip(lists) {
        out.insert(hk.clone(), list);
    }
    out
}

/// The validator a miner is assigned to, if any.
pub fn validator_for<'a>(assignment: &'a Assignment, miner: &str) -> Option<&'a str> {
    assignment
        .iter()
        .find(|(_, ms)| ms.iter().any(|m| m == miner))
        .map(|(v, _)| v.as_str())
}
