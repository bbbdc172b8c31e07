//! Fidelity: the real huggingface_hub 1.10.1 (no hf_xet) against `HubStandIn`, and files crossing
//! between it and our client in both directions.

mod common;

use common::*;
use miner_hub::{HubError, RepoType};
use miner_standins::hub::{HubRoute, RepoKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huggingface_hub_and_our_client_agree_on_the_stand_in() {
    // LFS from 1 MiB, multipart parts of 1 MiB, tree pages of 2 entries (pagination runs).
    let hub = standin(1 << 20, 1 << 20, 2).await;
    let ep = hub.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf-home");

    let env = py(&ep, None, &home, &["env"]).await;
    assert_eq!(env["version"], "1.10.1", "{env}");
    assert_eq!(env["xet"], false, "hf_xet must not be installed: {env}");

    // upload_folder: a small regular file, a nested one, and a 3.5 MiB file (LFS, 4 multipart parts).
    let folder = tmp.path().join("folder");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::write(folder.join("small.txt"), b"hello hub\n").unwrap();
    std::fs::write(folder.join("sub/nested.txt"), b"nested\n").unwrap();
    let big = bytes(3_500_000, 7);
    std::fs::write(folder.join("big.bin"), &big).unwrap();
    let up = py(
        &ep,
        Some(ALICE),
        &home,
        &["upload_folder", "alice/fid", folder.to_str().unwrap()],
    )
    .await;
    let oid = up["oid"].as_str().unwrap().to_string();
    assert!(miner_hub::is_commit_oid(&oid), "{up}");
    assert_eq!(up["repo_url"], format!("{ep}/alice/fid"));
    assert_eq!(
        hub.head("alice/fid", RepoKind::Model).as_deref(),
        Some(oid.as_str())
    );
    let transfers = hub.lfs_batch_transfers();
    assert!(
        !transfers.is_empty()
            && transfers
                .iter()
                .all(|t| t.contains(&"multipart".to_string()) && !t.contains(&"xet".to_string())),
        "{transfers:?}"
    );
    let reqs = hub.requests();
    let count = |r: HubRoute| {
        reqs.iter()
            .filter(|q| q.route == r && q.status < 300)
            .count()
    };
    assert_eq!(count(HubRoute::StoragePartPut), 4, "3.5 MiB in 1 MiB parts");
    assert_eq!(count(HubRoute::LfsComplete), 1);
    assert_eq!(count(HubRoute::Commit), 1);
    assert_eq!(
        count(HubRoute::CreateRepo),
        1,
        "the second create_repo is a 409"
    );

    // Our client downloads what Python uploaded, at the 7-character revision.
    let ours = client(&ep, None);
    let short = &oid[..7];
    let dest = tmp.path().join("big.ours");
    let meta = ours
        .download_to(
            &repo("alice/fid"),
            RepoType::Model,
            short,
            "big.bin",
            &dest,
            1 << 30,
        )
        .await
        .unwrap();
    assert_eq!(meta.commit, oid);
    assert_eq!(meta.size, big.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), big);
    let small = ours
        .get_range(
            &repo("alice/fid"),
            RepoType::Model,
            short,
            "small.txt",
            6,
            3,
        )
        .await
        .unwrap();
    assert_eq!(small, b"hub");
    let listed = ours
        .list_files(&repo("alice/fid"), RepoType::Model, short, None)
        .await
        .unwrap();
    let mut paths: Vec<_> = listed.iter().map(|f| f.path.clone()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [".gitattributes", "big.bin", "small.txt", "sub/nested.txt"]
    );
    assert!(
        listed
            .iter()
            .any(|f| f.path == "big.bin" && f.lfs_oid.as_deref() == Some(meta.etag.as_str()))
    );
    // The CDN-like storage host never saw a token.
    assert!(
        hub.requests()
            .iter()
            .filter(|r| r.storage)
            .all(|r| !r.authorization)
    );

    // Python downloads at the 7-character revision and lists files / model_info.
    let dl = py(
        &ep,
        None,
        &home,
        &["download", "alice/fid", short, "big.bin"],
    )
    .await;
    assert_eq!(std::fs::read(dl["path"].as_str().unwrap()).unwrap(), big);
    let ls = py(&ep, None, &home, &["list", "alice/fid", short]).await;
    assert_eq!(ls["sha"], oid.as_str());
    assert_eq!(
        ls["files"],
        serde_json::json!([".gitattributes", "big.bin", "small.txt", "sub/nested.txt"])
    );

    // Our client uploads (a safetensors shard, multipart) and Python downloads and loads it.
    let alice = client(&ep, Some(ALICE));
    let shard = safetensors(600_000); // 2.4 MiB -> 3 parts
    let shard_path = tmp.path().join("shard.safetensors");
    std::fs::write(&shard_path, &shard).unwrap();
    let c = alice
        .upload_file(
            &repo("alice/fid"),
            RepoType::Model,
            &shard_path,
            "model/shard.safetensors",
            "our upload",
            None,
        )
        .await
        .unwrap();
    assert!(miner_hub::is_commit_oid(&c.oid));
    let dl = py(
        &ep,
        None,
        &home,
        &[
            "download",
            "alice/fid",
            &c.oid[..7],
            "model/shard.safetensors",
        ],
    )
    .await;
    let got_path = dl["path"].as_str().unwrap().to_string();
    assert_eq!(
        std::fs::read(&got_path).unwrap(),
        shard,
        "byte-identical through hf_hub_download"
    );
    let loaded = py(&ep, None, &home, &["load_safetensors", &got_path]).await;
    assert_eq!(loaded["w"]["shape"], serde_json::json!([600_000]));
    assert_eq!(loaded["w"]["sum"].as_f64(), Some(300_000.0));
    // A small file of ours goes inline (regular) and Python reads it back.
    let note = tmp.path().join("note.txt");
    std::fs::write(&note, b"inline").unwrap();
    let c2 = alice
        .upload_file(
            &repo("alice/fid"),
            RepoType::Model,
            &note,
            "note.txt",
            "note",
            None,
        )
        .await
        .unwrap();
    let dl = py(
        &ep,
        None,
        &home,
        &["download", "alice/fid", &c2.oid, "note.txt"],
    )
    .await;
    assert_eq!(
        std::fs::read(dl["path"].as_str().unwrap()).unwrap(),
        b"inline"
    );

    // A private repo: Python without a token (or as another user) gets RepositoryNotFoundError, as from the Hub.
    assert!(
        alice
            .create_repo(&repo("alice/secret"), RepoType::Model, true)
            .await
            .unwrap()
    );
    assert!(
        !alice
            .create_repo(&repo("alice/secret"), RepoType::Model, true)
            .await
            .unwrap(),
        "409 = exists"
    );
    alice
        .upload_file(
            &repo("alice/secret"),
            RepoType::Model,
            &shard_path,
            "s.safetensors",
            "secret",
            None,
        )
        .await
        .unwrap();
    for token in [None, Some(BOB)] {
        let e = py(
            &ep,
            token,
            &home,
            &["download_error", "alice/secret", "main", "s.safetensors"],
        )
        .await;
        assert_eq!(
            e["error"], "RepositoryNotFoundError",
            "token {token:?}: {e}"
        );
    }
    let e = py(
        &ep,
        Some(ALICE),
        &home,
        &["download_error", "alice/secret", "main", "s.safetensors"],
    )
    .await;
    assert_eq!(
        e["error"],
        serde_json::Value::Null,
        "the owner reads it: {e}"
    );
    match ours
        .head_file(
            &repo("alice/secret"),
            RepoType::Model,
            "main",
            "s.safetensors",
        )
        .await
    {
        Err(HubError::Unauthorized { .. }) => {}
        other => panic!("anonymous read of a private repo: {other:?}"),
    }
    match client(&ep, Some(BOB))
        .head_file(
            &repo("alice/secret"),
            RepoType::Model,
            "main",
            "s.safetensors",
        )
        .await
    {
        Err(HubError::NotFound { what, .. }) => assert_eq!(what, "RepoNotFound"),
        other => panic!("another user's read of a private repo: {other:?}"),
    }
    // Making it public opens it to everyone.
    alice
        .set_private(&repo("alice/secret"), RepoType::Model, false)
        .await
        .unwrap();
    let info = ours
        .repo_info(&repo("alice/secret"), RepoType::Model, None)
        .await
        .unwrap();
    assert!(!info.private);
    // A read-only token cannot upload through Python either (403).
    let e = py(
        &ep,
        Some(ALICE_RO),
        &home,
        &["upload_error", "alice/fid", folder.to_str().unwrap()],
    )
    .await;
    assert_eq!(e["status"], 403, "{e}");
}
