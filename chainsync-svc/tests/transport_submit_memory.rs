//! Submitting a 32 MiB shard keeps the process's peak memory far below the file size: the
//! upload streams from disk (and the stand-in streams to disk). Alone in its test binary so
//! that the peak-RSS measurement sees nothing else.

mod transport_support;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use chainsync_svc::transport::{Peer, Submission, http_client, submit_checkpoint};
use miner_contract::pt::{DType, PtWriteOptions, TensorMeta, write_pt};
use miner_standins::ChainCheckpointView;
use transport_support::*;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_32_mib_stays_small_in_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("model_expgroup_0.pt");
    // 4 layers x 8 experts x [512, 1024] f16 = 32 tensors x 1 MiB, written streaming.
    let g = group();
    let metas: Vec<TensorMeta> = (1..=4)
        .flat_map(|layer| {
            g.org_ids(layer).into_iter().map(move |e| {
                TensorMeta::new(
                    format!("model.layers.{layer}.mlp.experts.{e}.gate_up_proj"),
                    DType::F16,
                    vec![512, 1024],
                )
            })
        })
        .collect();
    assert_eq!(metas.len(), 32);
    let row: Vec<u8> = (0..1024u16)
        .flat_map(|i| (0x3000u16 | (i & 0x3FF)).to_le_bytes())
        .collect();
    let hash = write_pt(
        &file,
        metas,
        &PtWriteOptions::default(),
        |_m, w: &mut dyn Write| {
            for _ in 0..512 {
                w.write_all(&row)?;
            }
            Ok(())
        },
    )
    .expect("write 32 MiB shard");
    let size = std::fs::metadata(&file).expect("meta").len();
    assert!(size >= 32 << 20);

    let chain = ChainCheckpointView {
        signed_model_hash: sign_hash(&miner_key(), &hash.to_hex()),
        model_hash: hash.to_hex(),
        expert_group: GROUP,
    };
    let v = validator(
        tmp.path(),
        StandInOpts {
            serve_file: None,
            chain: Some(chain),
            check_phase: true,
            block: Arc::new(AtomicU64::new(SUBMISSION_BLOCK)),
        },
    )
    .await;
    let client = http_client().expect("client");
    // Reset the peak-RSS counter, then measure the upload alone.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let base = status_kib("VmRSS:");
    let sub = Submission {
        peer: Peer {
            ip: v.ip(),
            port: v.port(),
            hotkey_ss58: v.hotkey_ss58(),
        },
        file: &file,
        expert_group: GROUP,
        model_hash: hash,
        origin_block: SUBMISSION_BLOCK,
    };
    submit_checkpoint(&client, &miner_key(), &sub, &fast_policy(0, 60_000), None)
        .await
        .expect("accepted");
    let peak = status_kib("VmHWM:");
    let grew_mib = peak.saturating_sub(base) / 1024;
    eprintln!(
        "upload of {} MiB: peak RSS grew by {grew_mib} MiB (base {} MiB)",
        size >> 20,
        base / 1024
    );
    assert!(
        grew_mib < 16,
        "peak RSS grew by {grew_mib} MiB while uploading {} MiB",
        size >> 20
    );
    assert_eq!(v.submissions().len(), 1);
    assert_eq!(v.submissions()[0].bytes, size);
}
