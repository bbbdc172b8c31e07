//! `minerctl hub check|push|pull` on the real binary against the `HubStandIn`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use miner_contract::MinerConfig;
use miner_contract::pt::{DType, Tensor};
use miner_standins::hub::{HubStandIn, HubStandInOptions, RepoKind};

async fn minerctl(args: Vec<String>, token: Option<&str>, endpoint: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_minerctl"));
    cmd.args(&args)
        .env_remove("HF_TOKEN")
        .env("HF_ENDPOINT", endpoint)
        .stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run minerctl"))
        .await
        .unwrap()
}

async fn hub() -> HubStandIn {
    HubStandIn::start(HubStandInOptions {
        tokens: vec![
            ("hf_write".into(), "miner".into(), true),
            ("hf_read".into(), "miner".into(), false),
        ],
        lfs_threshold: 1024,
        ..Default::default()
    })
    .await
    .expect("Hub stand-in")
}

/// A small exp_math shard (routed experts of group 0).
fn shard(seed: u16) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for e in [22u16, 17] {
        let data = (0..64 * 32)
            .flat_map(|i: u16| {
                (0x3000u16 | (i.wrapping_mul(7).wrapping_add(seed + e) & 0x3FF)).to_le_bytes()
            })
            .collect();
        m.insert(
            format!("model.layers.1.mlp.experts.{e}.down_proj"),
            Tensor {
                dtype: DType::F16,
                shape: vec![64, 32],
                data,
            },
        );
    }
    m
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("no {key:?} in {out}"))
}

#[tokio::test]
async fn check_push_and_pull_a_shard() {
    let h = hub().await;
    let ep = h.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    MinerConfig::new_run("miners", "miner_1", "r")
        .write(&run)
        .unwrap();
    let path = run.display().to_string();

    // check: a write token passes; the repo does not exist yet.
    let o = minerctl(
        vec!["hub".into(), "check".into(), "--path".into(), path.clone()],
        Some("hf_write"),
        &ep,
    )
    .await;
    let (so, se) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{so}{se}");
    assert!(
        so.contains("miner/co") && so.contains("not created yet"),
        "{so}"
    );
    // A read-only token: 64, one line, the token not printed.
    let o = minerctl(
        vec!["hub".into(), "check".into(), "--path".into(), path.clone()],
        Some("hf_read"),
        &ep,
    )
    .await;
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(64), "{se}");
    assert!(se.contains("read-only") && !se.contains("hf_read"), "{se}");

    // push: prints r and rv; rv is the first 7 characters of the repo's new head.
    let file = tmp.path().join("model_expgroup_0.pt");
    let hash = miner_contract::pt::write_pt_tensors(&file, &shard(3), &Default::default())
        .unwrap()
        .to_hex();
    let o = minerctl(
        vec![
            "hub".into(),
            "push".into(),
            file.display().to_string(),
            "--path".into(),
            path.clone(),
        ],
        Some("hf_write"),
        &ep,
    )
    .await;
    let (so, se) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{so}{se}");
    assert_eq!(field(&so, "r "), "miner/co");
    let rv = field(&so, "rv ").to_owned();
    assert_eq!(rv.len(), 7);
    assert!(
        h.head("miner/co", RepoKind::Model)
            .unwrap()
            .starts_with(&rv)
    );
    // check now says public.
    let o = minerctl(
        vec![
            "hub".into(),
            "check".into(),
            "--path".into(),
            path.clone(),
            "--json".into(),
        ],
        Some("hf_write"),
        &ep,
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["public"], true, "{v}");

    // pull (no token, as a validator): verified, the hash printed; with another --hash: 65
    // and nothing left in DIR.
    let dir = tmp.path().join("pulled");
    let pull = |h: String, dir: &Path| {
        vec![
            "hub".into(),
            "pull".into(),
            format!("miner/co@{rv}"),
            "--group".into(),
            "0".into(),
            dir.display().to_string(),
            "--hash".into(),
            h,
        ]
    };
    let o = minerctl(pull(hash.clone(), &dir), None, &ep).await;
    let (so, se) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{so}{se}");
    assert_eq!(field(&so, "hash "), hash);
    assert_eq!(
        std::fs::read(dir.join("model_expgroup_0.pt")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let dir2 = tmp.path().join("pulled2");
    let o = minerctl(pull("0".repeat(48), &dir2), None, &ep).await;
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(65), "{se}");
    assert!(se.contains("differs from the committed hash"), "{se}");
    assert_eq!(std::fs::read_dir(&dir2).unwrap().count(), 0, "nothing left");
    // A revision without the file: 66.
    h.put_file("other/x", RepoKind::Model, "README.md", b"x")
        .unwrap();
    let o = minerctl(
        vec![
            "hub".into(),
            "pull".into(),
            "other/x@main".into(),
            "--group".into(),
            "0".into(),
            dir2.display().to_string(),
        ],
        None,
        &ep,
    )
    .await;
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(66), "{se}");
    assert!(se.contains("holds neither"), "{se}");
}
