//! Memory stays flat: a 256 MiB upload (multipart) and download through our client and the
//! in-process stand-in grow this process's peak RSS by less than 64 MiB. Alone in its test binary
//! so no other test shares the process; the peak is reset through /proc/self/clear_refs.

mod common;

use common::*;
use miner_hub::RepoType;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux only)");
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_round_trip_keeps_peak_rss_growth_under_64_mib() {
    const SIZE: u64 = 256 << 20;
    let hub = standin(10 << 20, 64 << 20, 100).await;
    let c = client(&hub.endpoint(), Some(ALICE));
    let r = repo("alice/mem");
    c.create_repo(&r, RepoType::Model, false).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("shard.safetensors");
    big_file(&src, SIZE, 11);
    // Warm up the connection pools and allocator on a small transfer first.
    let small = tmp.path().join("small.bin");
    std::fs::write(&small, bytes(11 << 20, 2)).unwrap();
    c.upload_file(&r, RepoType::Model, &small, "small.bin", "warm", None)
        .await
        .unwrap();

    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM via /proc/self/clear_refs");
    let base = status_kib("VmRSS:");
    let commit = c
        .upload_file(&r, RepoType::Model, &src, "shard.safetensors", "big", None)
        .await
        .unwrap();
    let dest = tmp.path().join("back.safetensors");
    let meta = c
        .download_to(
            &r,
            RepoType::Model,
            &commit.oid[..7],
            "shard.safetensors",
            &dest,
            SIZE,
        )
        .await
        .unwrap();
    let peak = status_kib("VmHWM:");
    let growth_mib = peak.saturating_sub(base) / 1024;
    eprintln!(
        "peak RSS growth: {growth_mib} MiB (base {} MiB, peak {} MiB)",
        base / 1024,
        peak / 1024
    );
    assert_eq!(meta.size, SIZE);
    assert!(
        growth_mib < 64,
        "peak RSS grew by {growth_mib} MiB moving a 256 MiB file"
    );
    // The multipart path ran (4 parts of 64 MiB) and the file came back intact (sha256 checked by
    // download_to against the LFS etag; compare lengths and a few slices here too).
    let parts = hub
        .requests()
        .iter()
        .filter(|q| q.route == miner_standins::hub::HubRoute::StoragePartPut)
        .count();
    assert_eq!(parts, 4);
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), SIZE);
    use std::io::{Read, Seek, SeekFrom};
    let (mut a, mut b) = (
        std::fs::File::open(&src).unwrap(),
        std::fs::File::open(&dest).unwrap(),
    );
    for off in [0u64, 77 << 20, SIZE - 4096] {
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        a.seek(SeekFrom::Start(off)).unwrap();
        b.seek(SeekFrom::Start(off)).unwrap();
        a.read_exact(&mut x).unwrap();
        b.read_exact(&mut y).unwrap();
        assert!(x == y, "differs at {off}");
    }
}
