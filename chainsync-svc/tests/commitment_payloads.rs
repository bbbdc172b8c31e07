//! Commitment payloads (spec §4.3) byte for byte, the 128-byte budget, and reading other
//! neurons' commitments the way validators and miners read them (spec §4.4, §5.1).

use chainsync_svc::commitment::{
    ChainCheckpoint, CommitSnapshot, CommitmentError, ForRole, MinerCommit, NeuronView, Role,
    SignedModelHashCommit, ValidatorCommit, chain_checkpoints, download_candidates,
    parse_commitment, read_commits,
};
use chainsync_svc::phase::{PhaseSchedule, VersionWindow};
use proptest::prelude::*;

const H: &str = "a1f3a4babc0e24a94158be35977d2dacaa767a35fc0ed159";
const H2: &str = "dd252182c01da6b0e8485ce0669cb0a2189e3d3758e43873";

fn sig() -> String {
    "A".repeat(43) + &"_".repeat(42) + "w"
}

#[test]
fn miner_commit1_is_94_bytes_of_compact_json() {
    let p = SignedModelHashCommit {
        signed_model_hash: sig(),
    }
    .to_payload()
    .expect("valid");
    assert_eq!(p.len(), 94);
    assert_eq!(
        String::from_utf8(p).expect("utf8"),
        format!("{{\"m\":\"{}\"}}", sig())
    );
    let bad = SignedModelHashCommit {
        signed_model_hash: "abc=".into(),
    }
    .to_payload();
    assert!(matches!(
        bad,
        Err(CommitmentError::BadField { field: "m", .. })
    ));
}

#[test]
fn miner_commit2_without_hf_coordinates() {
    let c = MinerCommit {
        expert_group: 0,
        model_hash: H.into(),
        global_ver: 123,
        hf_repo_id: None,
        hf_revision: None,
    };
    assert_eq!(
        c.to_payload().expect("valid"),
        format!(r#"{{"e":0,"h":"{H}","v":123}}"#).into_bytes()
    );
}

#[test]
fn miner_commit2_with_hf_coordinates_hits_the_budget_exactly_at_32_chars() {
    let repo = format!("{}/{}", "u".repeat(15), "r".repeat(16)); // 32 chars
    let c = MinerCommit {
        expert_group: 0,
        model_hash: H.into(),
        global_ver: 8_081_320,
        hf_repo_id: Some(repo.clone()),
        hf_revision: Some("abcdef0".into()),
    };
    let p = c.to_payload().expect("fits");
    assert_eq!(p.len(), 128);
    assert_eq!(
        p,
        format!(r#"{{"e":0,"h":"{H}","v":8081320,"r":"{repo}","rv":"abcdef0"}}"#).into_bytes()
    );
    // One more digit in v pushes it over the budget: refused before sending.
    let c2 = MinerCommit {
        global_ver: 18_081_320,
        ..c.clone()
    };
    assert_eq!(c2.to_payload(), Err(CommitmentError::TooLong { len: 129 }));
    // A 33-char repo is refused by name.
    let c3 = MinerCommit {
        hf_repo_id: Some(format!("{repo}x")),
        ..c
    };
    assert!(matches!(
        c3.to_payload(),
        Err(CommitmentError::RepoTooLong { len: 33, .. })
    ));
}

#[test]
fn validator_commit_matches_the_spec_example() {
    let c = ValidatorCommit {
        model_hash: Some(H.into()),
        global_ver: 8_081_320,
        expert_group: 0,
        miner_seed: None,
        hf_repo_id: Some("owner/cycle".into()),
        hf_revision: Some("53ddbcd".into()),
    };
    let p = c.to_payload().expect("valid");
    assert_eq!(p.len(), 107);
    assert_eq!(
        p,
        format!(r#"{{"h":"{H}","v":8081320,"e":0,"r":"owner/cycle","rv":"53ddbcd"}}"#).into_bytes()
    );
    let heartbeat = ValidatorCommit {
        model_hash: None,
        hf_repo_id: None,
        hf_revision: None,
        miner_seed: Some(7),
        ..c
    };
    assert_eq!(
        heartbeat.to_payload().expect("valid"),
        br#"{"v":8081320,"e":0,"s":7}"#.to_vec()
    );
}

#[test]
fn bad_hash_is_refused() {
    let c = MinerCommit {
        expert_group: 0,
        model_hash: H.to_uppercase(),
        global_ver: 1,
        hf_repo_id: None,
        hf_revision: None,
    };
    assert!(matches!(
        c.to_payload(),
        Err(CommitmentError::BadField { field: "h", .. })
    ));
}

#[test]
fn parsing_round_trips_and_tolerates_garbage() {
    let c = parse_commitment(
        format!(r#"{{"e":0,"h":"{H}","v":5,"r":"a/b","rv":"abcdef0","zz":[1]}}"#).as_bytes(),
    )
    .expect("parses");
    assert_eq!(
        (c.expert_group, c.model_hash.as_deref(), c.global_ver),
        (Some(0), Some(H), Some(5))
    );
    assert_eq!(c.hf_revision.as_deref(), Some("abcdef0"));
    // Legacy format with nulls and default separators.
    let c = parse_commitment(br#"{"b": 123, "e": 0, "m": null, "h": "x", "v": 0, "i": 20}"#)
        .expect("legacy parses");
    assert_eq!(
        (c.block, c.inner_opt, c.signed_model_hash),
        (Some(123), Some(20), None)
    );
    for garbage in [
        &b""[..],
        b"\xff\xfe",
        b"not json",
        b"[1,2]",
        b"42",
        br#"{"v":"12"}"#,
        br#"{"v":-1}"#,
        br#"{"e":1e99}"#,
        br#"{"h":5}"#,
    ] {
        assert_eq!(
            parse_commitment(garbage),
            None,
            "{:?}",
            String::from_utf8_lossy(garbage)
        );
    }
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_commitment(&bytes);
    }

    #[test]
    fn encoded_miner_commits_parse_back(e in 0u32..1000, v in 0u64..10_000_000_000, repo in "[a-z]{1,15}/[a-z]{1,15}") {
        let c = MinerCommit { expert_group: e, model_hash: H.into(), global_ver: v, hf_repo_id: Some(repo.clone()), hf_revision: Some("abc1234".into()) };
        match c.to_payload() {
            Ok(p) => {
                prop_assert!(p.len() <= 128);
                let back = parse_commitment(&p).expect("own payload parses");
                prop_assert_eq!(back.expert_group, Some(e));
                prop_assert_eq!(back.global_ver, Some(v));
                prop_assert_eq!(back.hf_repo_id, Some(repo));
            }
            Err(CommitmentError::TooLong { len }) => prop_assert!(len > 128),
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }
}

fn neuron(uid: u16, hk: &str, stake: f64, last_update: u64) -> NeuronView {
    NeuronView {
        uid,
        hotkey: hk.into(),
        stake,
        last_update,
        axon_ip: "10.0.0.1".into(),
        axon_port: 8000,
    }
}

fn sigc() -> Vec<u8> {
    format!(r#"{{"m":"{}"}}"#, sig()).into_bytes()
}

fn vc2(h: &str, v: u64) -> Vec<u8> {
    format!(r#"{{"h":"{h}","v":{v},"e":0,"r":"o/r","rv":"abcdef0"}}"#).into_bytes()
}

/// Validators V1..V3 (whitelisted), a miner M, a deregistered D, a garbage G.
fn snapshots(v: u64) -> (CommitSnapshot, CommitSnapshot, Vec<String>) {
    let neurons = vec![
        neuron(0, "V1", 100.0, 8_081_990),
        neuron(1, "V2", 30.0, 8_081_990),
        neuron(2, "V3", 80.0, 8_081_990),
        neuron(3, "M", 5000.0, 8_081_990),
        neuron(4, "G", 1.0, 8_081_990),
    ];
    let whitelist = vec!["V1".to_owned(), "V2".to_owned(), "V3".to_owned()];
    let sig_snap = CommitSnapshot {
        block: 8_081_990,
        commitments: vec![
            ("V1".into(), sigc()),
            ("V2".into(), sigc()),
            ("V3".into(), sigc()),
            ("M".into(), sigc()),
            ("D".into(), sigc()),
            ("G".into(), b"\x00garbage".to_vec()),
        ],
        neurons: neurons.clone(),
    };
    let hash_snap = CommitSnapshot {
        block: 8_082_000,
        commitments: vec![
            ("V1".into(), vc2(H, v)),
            ("V2".into(), vc2(H2, v)),
            ("V3".into(), vc2(H2, v)),
            ("M".into(), vc2(H, v)),
            ("D".into(), vc2(H, v)),
            ("G".into(), b"{".to_vec()),
        ],
        neurons,
    };
    (sig_snap, hash_snap, whitelist)
}

#[test]
fn role_gating_uses_whitelist_and_last_update() {
    let (_, mut hash, wl) = snapshots(8_081_320);
    hash.neurons[2].last_update = 8_082_000 - 449; // V3 stale → miner class
    let roles: Vec<(String, Role)> = read_commits(&hash, &wl, 448)
        .into_iter()
        .map(|r| (r.neuron.hotkey, r.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("V1".into(), Role::Validator),
            ("V2".into(), Role::Validator),
            ("V3".into(), Role::Miner),
            ("M".into(), Role::Miner),
            ("G".into(), Role::Miner),
        ],
        "deregistered D must be skipped"
    );
}

#[test]
fn stake_weighted_majority_picks_the_heavier_hash() {
    let (sig, hash, wl) = snapshots(8_081_320);
    let w = PhaseSchedule::default().version_window_at(8_082_000, 3);
    // Miner M carries 5000 stake on H: the join is by hotkey, roles do not filter, so M's
    // stake counts (as in the reference). H: 100 + 5000, H2: 30 + 80.
    let cps = chain_checkpoints(&sig, &hash, &wl, 448, w, ForRole::Validator, false);
    let hotkeys: Vec<&str> = cps.iter().map(|c| c.hotkey.as_str()).collect();
    assert_eq!(hotkeys, ["V1", "M"]);
    // Without M the majority flips to H2 (30 + 80 > 100).
    let mut hash2 = hash.clone();
    hash2.commitments.retain(|(hk, _)| hk != "M");
    let cps = chain_checkpoints(&sig, &hash2, &wl, 448, w, ForRole::Validator, false);
    let hotkeys: Vec<&str> = cps.iter().map(|c| c.hotkey.as_str()).collect();
    assert_eq!(hotkeys, ["V2", "V3"]);
    assert!(
        cps.iter()
            .all(|c| c.model_hash == H2 && c.signed_model_hash == sig_str())
    );
    // The miner's download path gates on the validator role: M's stake does not count.
    let c = download_candidates(&sig, &hash, &wl, w, 0, None);
    let hotkeys: Vec<&str> = c.iter().map(|c| c.hotkey.as_str()).collect();
    assert_eq!(hotkeys, ["V2", "V3"]);
}

fn sig_str() -> String {
    sig()
}

#[test]
fn incomplete_commits_are_dropped() {
    let (mut sig, hash, wl) = snapshots(8_081_320);
    // V1 has no commit-1 signature at phase1.end+1 (its latest commit was a heartbeat).
    sig.commitments[0].1 = br#"{"v":1,"e":0}"#.to_vec();
    let cps = chain_checkpoints(&sig, &hash, &wl, 448, None, ForRole::Miner, false);
    let hotkeys: Vec<&str> = cps.iter().map(|c| c.hotkey.as_str()).collect();
    assert_eq!(
        hotkeys,
        ["V2", "V3", "M"],
        "V1 incomplete, D deregistered, G garbage"
    );
}

#[test]
fn version_window_and_newer_than_ours() {
    let w = VersionWindow {
        min: 8_079_820,
        max: 8_081_320,
    };
    let (sig, hash, wl) = snapshots(8_079_819);
    assert!(
        download_candidates(&sig, &hash, &wl, Some(w), 0, None).is_empty(),
        "too old"
    );
    let (sig, hash, wl) = snapshots(8_081_321);
    assert!(
        download_candidates(&sig, &hash, &wl, Some(w), 0, None).is_empty(),
        "from the future"
    );
    let (sig, hash, wl) = snapshots(8_081_320);
    let c: Vec<ChainCheckpoint> =
        download_candidates(&sig, &hash, &wl, Some(w), 0, Some(8_080_820));
    assert_eq!(c.len(), 2);
    assert!(
        download_candidates(&sig, &hash, &wl, Some(w), 0, Some(8_081_320)).is_empty(),
        "not newer than ours"
    );
    assert!(
        download_candidates(&sig, &hash, &wl, Some(w), 1, None).is_empty(),
        "other expert group"
    );
}
