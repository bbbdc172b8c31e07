//! The control plane of the real `trainer-svc` binary: listen policy, TLS, the token from the
//! run directory, the endpoints file, and status calls under load while it trains.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use miner_proto::trainer::v1 as pb;
use miner_service::{ControlToken, Endpoints};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_trainer-svc");

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(run: &Path, extra: &[&str]) -> KillOnDrop {
    let mut c = Command::new(BIN);
    c.args([
        "--device",
        "cpu",
        "--metrics-listen",
        "127.0.0.1:0",
        "--path",
    ])
    .arg(run)
    .args(extra)
    .env("OMP_NUM_THREADS", "1")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    KillOnDrop(c.spawn().unwrap())
}

/// Waits for `<run>/control/trainer.json` naming this child.
fn endpoints(run: &Path, child: &mut KillOnDrop) -> Endpoints {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(e)) = Endpoints::read(run, "trainer")
            && e.pid == child.0.id()
        {
            return e;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "trainer-svc exited early"
        );
        assert!(Instant::now() < deadline, "no endpoints file");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut KillOnDrop, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "trainer-svc did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn non_loopback_listen_without_tls_exits_64_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 100, "");
    let out = Command::new(BIN)
        .args(["--device", "cpu", "--listen", "0.0.0.0:0", "--path"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without TLS"),
        "{err}"
    );
    assert!(err.contains("--tls-cert"), "{err}");
    // Half a TLS pair is refused too.
    let out = Command::new(BIN)
        .args(["--device", "cpu", "--tls-cert", "x.pem", "--path"])
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "miner test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

async fn tls_channel(addr: std::net::SocketAddr, ca_pem: &str) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let ep = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    ep.connect().await.map_err(|e| format!("{e:?}"))
}

#[test]
fn tls_with_the_right_ca_works_the_wrong_ca_fails_and_off_loopback_reads_need_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    let right = pki();
    let wrong = pki();
    std::fs::write(tmp.path().join("cert.pem"), &right.cert_pem).unwrap();
    std::fs::write(tmp.path().join("key.pem"), &right.key_pem).unwrap();
    let cert = tmp.path().join("cert.pem");
    let key = tmp.path().join("key.pem");
    let mut child = spawn(
        &run,
        &[
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let ep = endpoints(&run, &mut child);
    assert!(ep.tls);
    let token_path = ControlToken::path_in(&run);
    let token = ControlToken::read(&token_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The wrong CA: the handshake fails, no call gets through.
        let bad = match tls_channel(ep.grpc, &wrong.ca_pem).await {
            Err(e) => e,
            Ok(ch) => pb::trainer_client::TrainerClient::new(ch)
                .get_status(pb::GetStatusRequest {})
                .await
                .unwrap_err()
                .to_string(),
        };
        assert!(
            bad.contains("certificate") || bad.contains("Unknown") || bad.contains("transport"),
            "{bad}"
        );
        // The right CA: connects; off loopback even a read needs the token.
        let ch = tls_channel(ep.grpc, &right.ca_pem).await.unwrap();
        let mut client = pb::trainer_client::TrainerClient::new(ch.clone());
        let err = client
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let mut authed = pb::trainer_client::TrainerClient::with_interceptor(
            ch,
            miner_service::TraceContextInterceptor::with_token(Some(&token)),
        );
        // The snapshot fills in once the engine has set up (slow on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = authed
                .get_status(pb::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if st.device == "cpu" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed the device: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            authed
                .stop(pb::StopRequest { final_save: false })
                .await
                .unwrap()
                .into_inner()
                .accepted
        );
    });
    assert!(wait_exit(&mut child, 60).success());
    // Removed on a clean exit.
    assert!(Endpoints::read(&run, "trainer").unwrap().is_none());
}

/// (thread name, nice value) of every thread of process `pid`.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            // Fields after `(comm)`: state is field 3, nice field 19.
            let nice = rest.split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

/// The `p`-th percentile (0..=100) of `v`, sorted in place.
fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() * p) / 100).min(v.len() - 1)]
}

#[test]
fn status_calls_under_load_answer_quickly_and_do_not_starve_training() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    // The trainer gets both cores (two intra-op threads), as on a miner's host.
    let mut c = Command::new(BIN);
    c.args(["--device", "cpu", "--metrics-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0", "--max-steps", "6", "--path"])
        .arg(&run)
        .env("OMP_NUM_THREADS", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(c.spawn().unwrap());
    let ep = endpoints(&run, &mut child);
    let uri = format!("http://{}", ep.dial_addr());
    // The training thread and the intra-op thread libtorch starts from it run niced; the
    // runtime threads that answer calls keep the service's priority.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let threads = thread_nices(child.0.id());
        let base = threads
            .iter()
            .find(|(n, _)| n == "trainer-svc")
            .map_or(0, |t| t.1);
        let want = (base + i64::from(trainer_svc::TRAINING_NICE)).min(19);
        let training: Vec<_> = threads.iter().filter(|(n, _)| n == "trainer").collect();
        if training.len() >= 2 && training.iter().all(|t| t.1 == want) {
            let workers: Vec<_> = threads
                .iter()
                .filter(|(n, _)| n.starts_with("tokio-rt"))
                .collect();
            assert!(!workers.is_empty(), "{threads:?}");
            assert!(workers.iter().all(|t| t.1 == base), "{threads:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "training threads not niced to {want}: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ok, steps_seen, mut round_trips) = rt.block_on(async {
        let ch = Endpoint::from_shared(uri.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut ok = 0usize;
        let mut steps_seen = Vec::new();
        let mut round_trips = Vec::new();
        while child.0.try_wait().unwrap().is_none() && ok < 40_000 {
            // A burst of 200 concurrent GetStatus on one connection...
            let calls = (0..200).map(|_| {
                let mut c = pb::trainer_client::TrainerClient::new(ch.clone());
                async move { c.get_status(pb::GetStatusRequest {}).await }
            });
            for s in futures::future::join_all(calls).await.into_iter().flatten() {
                ok += 1;
                steps_seen.push(s.into_inner().inner_opt_step);
            }
            // ...then what one `minerctl status` does, timed: connect, GetStatus and
            // ListCheckpoints at once.
            for _ in 0..5 {
                let t0 = Instant::now();
                let Ok(ch) = Endpoint::from_shared(uri.clone()).unwrap().connect().await else {
                    break; // the trainer finished its steps and closed the port
                };
                let mut a = pb::trainer_client::TrainerClient::new(ch.clone());
                let mut b = pb::trainer_client::TrainerClient::new(ch);
                let (st, list) = tokio::join!(
                    a.get_status(pb::GetStatusRequest {}),
                    b.list_checkpoints(pb::ListCheckpointsRequest {})
                );
                if st.is_ok() && list.is_ok() {
                    round_trips.push(t0.elapsed());
                }
            }
        }
        (ok, steps_seen, round_trips)
    });
    let exit = wait_exit(&mut child, 120);
    assert!(exit.success(), "{exit:?}");
    assert!(ok >= 400, "only {ok} concurrent status calls answered");
    // Training went on while the calls were answered: the steps they report advance.
    let (first, last) = (steps_seen[0], *steps_seen.last().unwrap());
    assert!(
        last > first,
        "status showed no training progress under load (step {first} .. {last})"
    );
    assert!(
        run.join("globalver_0_inneropt_6/MANIFEST.json").is_file(),
        "the trainer did not complete its 6 steps under load"
    );
    // Status answers from a snapshot: it never waits for a training step (seconds in a debug
    // build) nor for the training threads to yield the CPU (p99), and no small response waits
    // for a delayed ACK (Nagle without TCP_NODELAY: ~40 ms every time, p50).
    assert!(
        round_trips.len() >= 20,
        "only {} status round trips completed",
        round_trips.len()
    );
    let n = round_trips.len();
    let p50 = percentile(&mut round_trips, 50);
    let p99 = percentile(&mut round_trips, 99);
    eprintln!("status round trip while training: {n} calls, p50 {p50:?}, p99 {p99:?}");
    assert!(
        p99 < Duration::from_millis(250) && p50 < Duration::from_millis(25),
        "status round trip p50 {p50:?} p99 {p99:?} over {n} calls while training"
    );
}

#[test]
fn sigterm_turns_health_not_serving_before_the_final_checkpoint_and_exit() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 1000, "");
    let mut child = spawn(&run, &["--listen", "127.0.0.1:0"]);
    let ep = endpoints(&run, &mut child);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async {
        let ch = Endpoint::from_shared(format!("http://{}", ep.dial_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        let mut stream = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "miner.trainer.v1.Trainer".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        let first = stream.message().await.unwrap().unwrap();
        seen.push(first.status);
        let st = Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        while let Ok(Some(m)) = stream.message().await {
            seen.push(m.status);
        }
        seen
    });
    assert_eq!(
        seen.first(),
        Some(&(ServingStatus::Serving as i32)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(ServingStatus::NotServing as i32)),
        "health never went NOT_SERVING: {seen:?}"
    );
    assert!(wait_exit(&mut child, 60).success());
    assert!(run.join("mycelia_final.pt").is_file());
    assert!(Endpoints::read(&run, "trainer").unwrap().is_none());
}
