//! The validator → miner assignment (spec §6.2 step 3): hand-checked answers and a
//! cross-check against a line-by-line Python port run by the project's venv.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use chainsync_svc::assignment::{
    Assignment, assign_miners_to_validators, combined_seed, h256, validator_for,
};

fn v(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(h, s)| (h.to_string(), *s)).collect()
}

fn m(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn h256_and_combined_seed_match_the_python_definitions() {
    // sha256(b"cap_bonus\x000\x00") from Python's hashlib.
    assert_eq!(
        hex::encode(h256(&["cap_bonus", "0"])),
        "d957889d3528c816e7422f17bbae7e3c6dcac81dba73cbb634b03c877bcaa36c"
    );
    // Seeds joined in hotkey order: "0" + "0" + "7".
    assert_eq!(
        combined_seed(&v(&[("5Vc", 7), ("5Va", 0), ("5Vb", 0)])),
        "629f4cf9337b0d0c76f305d860f98894cfa8c279516b425747514ca8710deb97"
    );
}

#[test]
fn known_answer_three_validators_five_miners() {
    let a = assign_miners_to_validators(
        &v(&[("5Va", 0), ("5Vb", 0), ("5Vc", 7)]),
        &m(&["m1", "m2", "m3", "m4", "m5"]),
        None,
    );
    let expect: Assignment = [
        ("5Va".to_string(), m(&["m1", "m3"])),
        ("5Vb".to_string(), m(&["m5"])),
        ("5Vc".to_string(), m(&["m2", "m4"])),
    ]
    .into_iter()
    .collect();
    assert_eq!(a, expect);
    assert_eq!(validator_for(&a, "m5"), Some("5Vb"));
    assert_eq!(validator_for(&a, "nobody"), None);
}

#[test]
fn capped_capacity_falls_back_to_the_least_preferred_validator() {
    let a = assign_miners_to_validators(&v(&[("A", 1), ("B", 2)]), &m(&["x", "y", "z"]), Some(1));
    assert_eq!(a.get("A"), Some(&m(&["y", "x"])));
    assert_eq!(a.get("B"), Some(&m(&["z"])));
}

#[test]
fn trivial_cases() {
    assert!(assign_miners_to_validators(&[], &m(&["x"]), None).is_empty());
    let a = assign_miners_to_validators(&v(&[("only", 0)]), &m(&["b", "a", "c"]), None);
    let mut got = a.get("only").cloned().unwrap_or_default();
    got.sort();
    assert_eq!(got, m(&["a", "b", "c"]));
    let a = assign_miners_to_validators(&v(&[("A", 0), ("B", 0)]), &[], None);
    assert!(a.values().all(|l| l.is_empty()) && a.len() == 2);
}

fn python() -> PathBuf {
    let p = std::env::var_os("MINER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/python")
        });
    assert!(
        p.exists(),
        "python not found at {} (run scripts/setup-python.sh or set MINER_PYTHON)",
        p.display()
    );
    p
}

#[test]
fn matches_the_python_port_on_many_cases() {
    // Deterministic pseudo-random cases (xorshift), including caps and duplicate seeds.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut cases = Vec::new();
    for _ in 0..60 {
        let n_v = 1 + (next() % 6) as usize;
        let n_m = (next() % 25) as usize;
        let vals: Vec<(String, u64)> = (0..n_v)
            .map(|i| (format!("5V{:x}{i}", next() % 4096), next() % 4))
            .collect();
        let miners: Vec<String> = (0..n_m).map(|i| format!("5M{:x}{i}", next())).collect();
        let cap = if next() % 3 == 0 {
            Some(1 + (next() % 5) as usize)
        } else {
            None
        };
        cases.push((vals, miners, cap));
    }
    let json = serde_json::to_string(
        &cases
            .iter()
            .map(|(vals, miners, cap)| serde_json::json!({"validators": vals, "miners": miners, "cap": cap}))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/assignment_port.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(json.as_bytes())
        .expect("write cases");
    let out = child.wait_with_output().expect("python ran");
    assert!(out.status.success(), "python port failed");
    let answers: Vec<Assignment> =
        serde_json::from_slice(&out.stdout).expect("python answers parse");
    for ((vals, miners, cap), want) in cases.iter().zip(answers) {
        let got = assign_miners_to_validators(vals, miners, *cap);
        assert_eq!(
            got, want,
            "validators={vals:?} miners={miners:?} cap={cap:?}"
        );
    }
}
