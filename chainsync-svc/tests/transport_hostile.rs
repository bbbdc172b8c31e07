//! A hostile validator: `HostileValidator` stands in for a validator axon that answers
//! `GET /get-checkpoint` with whatever hurts most (garbage, a drip, lies about
//! `Content-Length`, a redirect, junk after a valid file, a huge error body, an unparsable
//! pickle). A raw TCP server, so it can send what no well-behaved HTTP library would.
//!
//! Every case must end in a clear transport error within bounded time and memory, with
//! nothing left in the run's `validator_checkpoint/`. The cases run one after another in one
//! test so the peak memory of each download can be measured (`VmHWM`, reset before each case
//! through `/proc/self/clear_refs`); the table is printed (`--nocapture`).

mod transport_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chainsync_svc::commitment::{ChainCheckpoint, Role};
use chainsync_svc::transport::verify::VerifyError;
use chainsync_svc::transport::{TransportError, download_checkpoint, http_client};
use miner_contract::RunDir;
use miner_contract::pt::{DType, Tensor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use transport_support::*;

/// What the hostile validator answers.
#[derive(Clone)]
enum Act {
    /// 200 with `Content-Length: claimed` and random bytes until the client goes away.
    Garbage { claimed: u64 },
    /// 200 with the right `Content-Length`, the file one byte every `every`.
    Drip { file: Arc<Vec<u8>>, every: Duration },
    /// 200 claiming `claimed` bytes, then the file followed by endless junk.
    Lie { file: Arc<Vec<u8>>, claimed: u64 },
    /// 200 with `Content-Length` of a huge body, then nothing.
    ClaimHuge,
    /// 302 to `location`.
    Redirect { location: String },
    /// 200 without `Content-Length` (body ends at close): the file, then endless junk.
    JunkAfter { file: Arc<Vec<u8>> },
    /// 200 with `Content-Length` = the file plus 1 GiB, the file, then junk.
    JunkAfterDeclared { file: Arc<Vec<u8>> },
    /// 500 with a 1 GiB body.
    HugeErrorBody,
    /// 200 with the file as is.
    Serve { file: Arc<Vec<u8>> },
    /// 200 with a 1 GiB body of `x` (`Content-Length` given or not).
    HugeOkBody { declared: bool },
}

/// A loopback server standing in for a validator's axon that misbehaves as told.
struct HostileValidator {
    port: u16,
    /// Body bytes the server managed to write (what the miner let in, plus socket buffers).
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileValidator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const GIB: u64 = 1 << 30;

impl HostileValidator {
    async fn start(act: Act) -> HostileValidator {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, r) = (sent.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(sock, act.clone(), s.clone()));
            }
        });
        HostileValidator {
            port,
            sent,
            requests,
            task,
        }
    }
}

/// Reads the request head and its form body.
async fn read_request(sock: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < len {
        match sock.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
}

/// Writes `data` 64 KiB at a time, counting what went out; false once the client is gone.
async fn send(sock: &mut TcpStream, data: &[u8], sent: &AtomicU64) -> bool {
    for piece in data.chunks(64 << 10) {
        if sock.write_all(piece).await.is_err() {
            return false;
        }
        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    true
}

/// Random-looking bytes forever (xorshift), 64 KiB at a time.
async fn endless(sock: &mut TcpStream, sent: &AtomicU64, byte: Option<u8>) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 64 << 10];
    loop {
        for c in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = byte.map_or(x.to_le_bytes(), |b| [b; 8]);
            c.copy_from_slice(&v[..c.len()]);
        }
        if !send(sock, &block, sent).await {
            return;
        }
    }
}

fn ok_head(len: Option<u64>) -> String {
    match len {
        Some(n) => format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\n\r\n"),
        None => "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n".into(),
    }
}

async fn answer(mut sock: TcpStream, act: Act, sent: Arc<AtomicU64>) {
    read_request(&mut sock).await;
    let sent = &*sent;
    match act {
        Act::Garbage { claimed } => {
            let _ = sock.write_all(ok_head(Some(claimed)).as_bytes()).await;
            endless(&mut sock, sent, None).await;
        }
        Act::Drip { file, every } => {
            let _ = sock
                .write_all(ok_head(Some(file.len() as u64)).as_bytes())
                .await;
            for b in file.iter() {
                if !send(&mut sock, &[*b], sent).await {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        }
        Act::Lie { file, claimed } => {
            let _ = sock.write_all(ok_head(Some(claimed)).as_bytes()).await;
            if send(&mut sock, &file, sent).await {
                endless(&mut sock, sent, None).await;
            }
        }
        Act::ClaimHuge => {
            let _ = sock.write_all(ok_head(Some(1 << 40)).as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Act::Redirect { location } => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
            );
            let _ = sock.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Act::JunkAfter { file } => {
            let _ = sock.write_all(ok_head(None).as_bytes()).await;
            if send(&mut sock, &file, sent).await {
                endless(&mut sock, sent, None).await;
            }
        }
        Act::JunkAfterDeclared { file } => {
            let _ = sock
                .write_all(ok_head(Some(file.len() as u64 + GIB)).as_bytes())
                .await;
            if send(&mut sock, &file, sent).await {
                endless(&mut sock, sent, None).await;
            }
        }
        Act::HugeErrorBody => {
            let head = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: {GIB}\r\n\r\n"
            );
            let _ = sock.write_all(head.as_bytes()).await;
            endless(&mut sock, sent, Some(b'x')).await;
        }
        Act::HugeOkBody { declared } => {
            let head = ok_head(declared.then_some(GIB));
            let _ = sock.write_all(head.as_bytes()).await;
            endless(&mut sock, sent, Some(b'x')).await;
        }
        Act::Serve { file } => {
            let _ = sock
                .write_all(ok_head(Some(file.len() as u64)).as_bytes())
                .await;
            send(&mut sock, &file, sent).await;
        }
    }
}

/// A valid shard of group 0 whose three `gate_up_proj` tensors hold about 6 MiB.
fn shard_tensors() -> BTreeMap<String, Tensor> {
    let mut t = expert_tensors(40);
    for e in [17usize, 22, 44] {
        let rows = 1024;
        t.insert(
            format!("model.layers.1.mlp.experts.{e}.gate_up_proj"),
            Tensor {
                dtype: DType::F16,
                shape: vec![rows, 1024],
                data: (0..rows * 1024)
                    .flat_map(|i| (0x3000u16 | ((i + e) as u16 & 0x3FF)).to_le_bytes())
                    .collect(),
            },
        );
    }
    t
}

/// The file with the bytes of its `data.pkl` record (the first record) overwritten.
fn with_broken_pickle(file: &[u8]) -> Vec<u8> {
    let mut f = file.to_vec();
    assert_eq!(&f[..4], b"PK\x03\x04", "a zip local header first");
    let name_len = u16::from_le_bytes([f[26], f[27]]) as usize;
    let extra_len = u16::from_le_bytes([f[28], f[29]]) as usize;
    let name = String::from_utf8_lossy(&f[30..30 + name_len]).into_owned();
    assert!(name.ends_with("data.pkl"), "first record is {name}");
    let start = 30 + name_len + extra_len;
    // Protocol marker kept, then an opcode no pickle has.
    for b in &mut f[start + 2..start + 40] {
        *b = 0xFE;
    }
    f
}

fn peak_rss_reset() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM (/proc/self/clear_refs)");
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

struct Case {
    name: &'static str,
    act: Act,
    deadline: Duration,
    check: fn(&TransportError) -> bool,
    /// Most seconds the download may take.
    within: f64,
}

fn candidate_for(port: u16, hash: &str) -> ChainCheckpoint {
    ChainCheckpoint {
        uid: 3,
        hotkey: validator_key().ss58().to_owned(),
        stake: 100.0,
        axon_ip: "127.0.0.1".into(),
        axon_port: port,
        role: Role::Validator,
        signed_model_hash: sign_hash(&validator_key(), hash),
        model_hash: hash.to_owned(),
        global_ver: GLOBAL_VER,
        expert_group: GROUP,
        hf_repo_id: None,
        hf_revision: None,
    }
}

fn rejected(e: &TransportError) -> bool {
    matches!(e, TransportError::Rejected { .. })
}

fn last(e: &TransportError) -> &TransportError {
    match e {
        TransportError::Exhausted { last, .. } => last,
        TransportError::Deadline { last: Some(l), .. } => l,
        other => other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_validator_gets_a_clear_error_in_bounded_time_and_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let good_path = tmp.path().join("good.pt");
    let hash = write_shard(&good_path, &shard_tensors()).to_hex();
    let good = Arc::new(std::fs::read(&good_path).unwrap());
    let broken = Arc::new(with_broken_pickle(&good));
    let honest = HostileValidator::start(Act::Serve { file: good.clone() }).await;
    let cases = vec![
        Case {
            name: "garbage (claims 1 GiB)",
            act: Act::Garbage { claimed: GIB },
            deadline: Duration::from_secs(20),
            check: |e| {
                matches!(e, TransportError::Rejected { source: VerifyError::File(_), .. })
            },
            within: 5.0,
        },
        Case {
            name: "unparsable pickle",
            act: Act::Serve { file: broken },
            deadline: Duration::from_secs(20),
            check: |e| {
                matches!(e, TransportError::Rejected { source: VerifyError::File(_), .. })
            },
            within: 5.0,
        },
        Case {
            name: "drip, 1 byte / 50 ms",
            act: Act::Drip {
                file: good.clone(),
                every: Duration::from_millis(50),
            },
            deadline: Duration::from_secs(2),
            check: |e| {
                matches!(e, TransportError::Deadline { .. })
                    || matches!(last(e), TransportError::Timeout { .. })
            },
            within: 4.0,
        },
        Case {
            name: "claims 1000 B, sends the file + junk",
            act: Act::Lie {
                file: good.clone(),
                claimed: 1000,
            },
            deadline: Duration::from_secs(20),
            check: |e| rejected(e) || matches!(last(e), TransportError::Truncated { .. }),
            within: 5.0,
        },
        Case {
            name: "claims 1 TiB",
            act: Act::ClaimHuge,
            deadline: Duration::from_secs(20),
            check: |e| {
                matches!(e, TransportError::TooLarge { what: "Content-Length", .. })
            },
            within: 2.0,
        },
        Case {
            name: "redirect to another port",
            act: Act::Redirect {
                location: format!("http://127.0.0.1:{}/get-checkpoint", honest.port),
            },
            deadline: Duration::from_secs(20),
            check: |e| matches!(e, TransportError::Redirect { status: 302, .. }),
            within: 2.0,
        },
        Case {
            name: "valid file + junk (no length)",
            act: Act::JunkAfter { file: good.clone() },
            deadline: Duration::from_secs(20),
            check: |e| matches!(e, TransportError::TooLarge { what: "body", .. }),
            within: 5.0,
        },
        Case {
            name: "valid file + 1 GiB junk (declared)",
            act: Act::JunkAfterDeclared { file: good.clone() },
            deadline: Duration::from_secs(20),
            check: |e| matches!(e, TransportError::TooLarge { what: "Content-Length", .. }),
            within: 5.0,
        },
        Case {
            name: "500 with a 1 GiB body",
            act: Act::HugeErrorBody,
            deadline: Duration::from_secs(20),
            check: |e| {
                matches!(last(e), TransportError::Status { status: 500, body, .. } if body.len() <= 200 && body.starts_with("xxxx"))
            },
            within: 3.0,
        },
    ];
    let client = http_client().unwrap();
    let mut table = Vec::new();
    for case in cases {
        let v = HostileValidator::start(case.act).await;
        let run = RunDir::create(&tmp.path().join(format!("run-{}", v.port))).unwrap();
        let before = status_kib("VmRSS:");
        peak_rss_reset();
        let started = Instant::now();
        let result = download_checkpoint(
            &client,
            &run,
            &miner_key(),
            &candidate_for(v.port, &hash),
            &group(),
            1,
            &fast_policy(0, 2000),
            Some(tokio::time::Instant::now() + case.deadline),
        )
        .await;
        let took = started.elapsed().as_secs_f64();
        let peak = status_kib("VmHWM:");
        let err = match result {
            Ok(p) => panic!("{}: published {}", case.name, p.path.display()),
            Err(e) => e,
        };
        let sent = v.sent.load(Ordering::SeqCst);
        table.push(format!(
            "{:<38} {:>6.2} s  peak RSS +{:>6} KiB  server sent {:>10} B  {err}",
            case.name,
            took,
            peak.saturating_sub(before),
            sent
        ));
        assert!((case.check)(&err), "{}: unexpected error: {err}", case.name);
        assert!(
            took <= case.within,
            "{}: took {took:.2} s (limit {})",
            case.name,
            case.within
        );
        assert!(
            peak.saturating_sub(before) < 64 << 10,
            "{}: peak RSS grew by {} KiB",
            case.name,
            peak - before
        );
        assert!(
            sent < 256 << 20,
            "{}: the miner let {sent} bytes in",
            case.name
        );
        assert_eq!(v.requests.load(Ordering::SeqCst), 1, "{}: not retried", case.name);
        let left = all_entries(&run.validator_dir());
        assert!(left.is_empty(), "{}: left {left:?}", case.name);
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
    assert_eq!(
        honest.requests.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    println!("{}", table.join("\n"));
    // The same validator serving the file honestly still works through the same limits.
    let run = RunDir::create(&tmp.path().join("run-honest")).unwrap();
    let p = download_checkpoint(
        &client,
        &run,
        &miner_key(),
        &candidate_for(honest.port, &hash),
        &group(),
        1,
        &fast_policy(0, 2000),
        None,
    )
    .await
    .expect("an honest download");
    assert!(Path::new(&p.path).join("model_expgroup_0.pt").is_file());
}

/// A submission reply or a phase-API answer of 1 GiB is cut off at the limit: a clear error,
/// quickly, with the memory of the limit, not of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_json_answers_are_refused_at_the_limit() {
    use chainsync_svc::phase::{OwnerApi, PhaseApiError};
    use chainsync_svc::transport::{Peer, Submission, submit_checkpoint};
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model_expgroup_0.pt");
    let hash = write_shard(&file, &expert_tensors(41));
    for declared in [true, false] {
        let v = HostileValidator::start(Act::HugeOkBody { declared }).await;
        let started = Instant::now();
        let sub = Submission {
            peer: Peer {
                ip: "127.0.0.1".into(),
                port: v.port,
                hotkey_ss58: validator_key().ss58().to_owned(),
            },
            file: &file,
            expert_group: GROUP,
            model_hash: hash,
            origin_block: 1,
        };
        let err = submit_checkpoint(
            &http_client().unwrap(),
            &miner_key(),
            &sub,
            &fast_policy(0, 5000),
            None,
        )
        .await
        .expect_err("a 1 GiB reply is no receipt");
        assert!(
            matches!(&err, TransportError::BadResponse { reason, .. } if reason.contains("larger than")),
            "declared={declared}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(v.sent.load(Ordering::SeqCst) < 64 << 20);

        let v = HostileValidator::start(Act::HugeOkBody { declared }).await;
        let api = OwnerApi::new(&format!("http://127.0.0.1:{}", v.port), fast_policy(0, 5000))
            .unwrap();
        let started = Instant::now();
        let err = api.get_phase(None).await.expect_err("a 1 GiB phase");
        assert!(
            matches!(&err, PhaseApiError::BadResponse { reason, .. } if reason.contains("larger than")),
            "declared={declared}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(v.sent.load(Ordering::SeqCst) < 64 << 20);
    }
}
