//! In-process training: the loss falls, checkpoints resume exactly, a validator checkpoint is
//! picked up, and the gRPC API reports and stops the loop.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use miner_contract::layout::RunDir;
use miner_contract::pt;
use miner_contract::publish::PublishInfo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trainer_svc::engine::checkpoint::TrainerStateFile;
use trainer_svc::{Control, Handles, Listeners, Outcome, StatusSnapshot};

fn run_blocking(settings: trainer_svc::Settings) -> Outcome {
    let (tx, _rx) = watch::channel(StatusSnapshot::default());
    trainer_svc::engine::run(settings, Arc::new(Control::default()), tx).unwrap()
}

fn read_state(dir: &Path) -> TrainerStateFile {
    serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap()
}

fn own_names(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = RunDir::open(run)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .filter(|e| e.is_verified() && e.kind == miner_contract::CheckpointKind::Own)
        .map(|e| e.dir_name)
        .collect();
    v.sort();
    v
}

#[test]
fn tiny_model_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 100, "");
    let s = common::settings(&run, Some(30));
    let csv = s.metric_csv.clone();
    let out = run_blocking(s);
    assert!(matches!(out, Outcome::MaxSteps { .. }), "{out:?}");
    let rows = common::csv_losses(&csv);
    assert!(rows.len() >= 10, "{rows:?}");
    let first = rows[0].1;
    let last = rows[rows.len() - 1].1;
    assert!(
        last < first - 0.5,
        "loss did not fall enough: {first} -> {last} ({rows:?})"
    );
    // --max-steps publishes a final checkpoint and mycelia_final.pt.
    assert_eq!(own_names(&run), vec!["globalver_0_inneropt_30".to_string()]);
    assert!(run.join("mycelia_final.pt").is_file());
}

#[test]
fn resume_restores_moments_schedule_and_data_position() {
    let tmp = tempfile::tempdir().unwrap();
    // Interrupted: 4 steps, then 2 more after a restart.
    let a = common::small_run_dir(&tmp.path().join("a"), 2, "");
    run_blocking(common::settings(&a, Some(4)));
    assert_eq!(
        own_names(&a),
        vec!["globalver_0_inneropt_2", "globalver_0_inneropt_4"]
    );
    run_blocking(common::settings(&a, Some(2)));
    // Retention keeps the top 2.
    assert_eq!(
        own_names(&a),
        vec!["globalver_0_inneropt_4", "globalver_0_inneropt_6"]
    );
    // Uninterrupted: 6 steps.
    let b = common::small_run_dir(&tmp.path().join("b"), 2, "");
    run_blocking(common::settings(&b, Some(6)));

    let (da, db) = (
        a.join("globalver_0_inneropt_6"),
        b.join("globalver_0_inneropt_6"),
    );
    let (sa, sb) = (read_state(&da), read_state(&db));
    assert_eq!(sa.data, sb.data, "data position differs");
    assert_eq!((sa.inner_opt_step, sa.sched_step, sa.adam_step), (6, 6, 6));
    assert_eq!(
        (sa.sched_step, sa.adam_step, sa.micro_step),
        (sb.sched_step, sb.adam_step, sb.micro_step)
    );
    assert_eq!(sa.total_samples, sb.total_samples);
    for file in ["inner_optimizer.pt", "model_expgroup_0.safetensors"] {
        let (ta, tb) = (
            miner_contract::shard::read_shard(&da.join(file)).unwrap(),
            miner_contract::shard::read_shard(&db.join(file)).unwrap(),
        );
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
        for (k, x) in &ta {
            let y = &tb[k];
            assert_eq!(x.shape, y.shape, "{file} {k}");
            let xs = to_f32(x);
            let ys = to_f32(y);
            let max = xs
                .iter()
                .zip(&ys)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(max <= 1e-5, "{file} {k}: resumed run differs by {max}");
        }
    }
}

fn to_f32(t: &pt::Tensor) -> Vec<f32> {
    match t.dtype {
        pt::DType::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        pt::DType::F16 => t
            .data
            .chunks_exact(2)
            .map(|c| {
                let tt = tch::Tensor::from_data_size(c, &[1], tch::Kind::Half);
                tt.double_value(&[0]) as f32
            })
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// Publishes a verified validator checkpoint whose experts are all `value`.
fn publish_validator(
    run: &Path,
    settings: &trainer_svc::Settings,
    version: u64,
    value: f32,
) -> String {
    let model = trainer_svc::model::PartialModel::new(
        &settings.model,
        &settings.experts,
        tch::Device::Cpu,
        tch::Kind::Float,
        7,
    )
    .unwrap();
    let mut map = BTreeMap::new();
    for (name, t) in model.expert_tensors() {
        let shape: Vec<usize> = t.size().iter().map(|d| *d as usize).collect();
        let n: usize = shape.iter().product();
        let data: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), n)
            .flatten()
            .collect();
        map.insert(
            name,
            pt::Tensor {
                dtype: pt::DType::F32,
                shape,
                data,
            },
        );
    }
    let rd = RunDir::open(run).unwrap();
    let staged = rd
        .stage_validator(3, "5ValidatorStandInHotkey", version)
        .unwrap();
    let hash = staged.write_model_tensors(0, &map).unwrap();
    let p = staged
        .publish(PublishInfo::verified_download(
            0,
            hash,
            "signature-by-stand-in".into(),
        ))
        .unwrap();
    p.name.dir_name()
}

async fn wait_for(
    rx: &mut watch::Receiver<StatusSnapshot>,
    what: &str,
    f: impl Fn(&StatusSnapshot) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if f(&rx.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}: {:?}",
            *rx.borrow()
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_checkpoint_reload_and_grpc_status_and_stop() {
    use miner_proto::trainer::v1 as pb;
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run_dir(tmp.path(), 2, "");
    let mut settings = common::settings(&run, None);
    settings.control_token = Some(miner_service::ControlToken::new("sesame").unwrap());
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = metrics.local_addr().unwrap();
    let control = Arc::new(Control::default());
    let (tx, rx) = watch::channel(StatusSnapshot::default());
    let mut watch_rx = rx.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(trainer_svc::run_with(
        settings.clone(),
        Listeners {
            grpc,
            metrics: Some(metrics),
        },
        shutdown.clone(),
        Handles {
            control: control.clone(),
            status: rx,
        },
        tx,
    ));

    wait_for(&mut watch_rx, "2 optimizer steps", |s| {
        s.inner_opt_step >= 2
    })
    .await;
    let vname = publish_validator(&run, &settings, 777, 0.05);
    wait_for(&mut watch_rx, "the validator baseline", |s| {
        s.baseline_version == 777
    })
    .await;

    let mut client = pb::trainer_client::TrainerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let st = client
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.baseline_version, 777);
    assert_eq!(st.baseline_name, vname);
    assert_eq!(st.baseline_hash.len(), 48);
    assert_eq!(st.device, "cpu");
    assert!(st.inner_opt_step >= 2);

    // A stream gives a snapshot at once.
    let mut stream = client
        .watch_status(pb::WatchStatusRequest { min_interval_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.baseline_version, 777);

    // Checkpoints after the reload carry the new version.
    wait_for(&mut watch_rx, "a checkpoint after the reload", |s| {
        s.last_checkpoint.starts_with("globalver_777_")
    })
    .await;
    let list = client
        .list_checkpoints(pb::ListCheckpointsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.checkpoints
            .iter()
            .any(|c| c.name == vname && c.verified)
    );
    assert_eq!(
        list.checkpoints[0].name.split("_inneropt_").next(),
        Some("globalver_777")
    );

    // Prometheus text with the reference names.
    let body = http_get(maddr).await;
    assert!(
        body.contains("miner_training_loss{expert_group=\"embedded\"}"),
        "{body}"
    );
    assert!(body.contains("miner_learning_rate "), "{body}");
    assert!(body.contains("miner_total_tokens "), "{body}");

    // Health is registered.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "miner.trainer.v1.Trainer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Stop needs the control token.
    let err = client
        .stop(pb::StopRequest { final_save: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::StopRequest { final_save: true });
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    let err = client.stop(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let step = watch_rx.borrow().inner_opt_step;
    wait_for(
        &mut watch_rx,
        "training to go on after refused stops",
        |s| s.inner_opt_step > step,
    )
    .await;
    let mut req = tonic::Request::new(pb::StopRequest { final_save: true });
    req.metadata_mut()
        .insert("authorization", "Bearer sesame".parse().unwrap());
    assert!(client.stop(req).await.unwrap().into_inner().accepted);

    let out = tokio::time::timeout(Duration::from_secs(40), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Outcome::Stopped {
        final_checkpoint: Some(last),
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(last.starts_with("globalver_777_inneropt_"), "{last}");
    assert!(run.join("mycelia_final.pt").is_file());
    // The reloaded experts (all 0.05) moved only a little in the few steps since.
    let experts =
        miner_contract::shard::read_shard(&run.join(&last).join("model_expgroup_0.safetensors"))
            .unwrap();
    let vals: Vec<f32> = experts.values().flat_map(to_f32).collect();
    let mean = vals.iter().sum::<f32>() / vals.len() as f32;
    assert!(
        (mean - 0.05).abs() < 0.03,
        "expert mean {mean} after loading a 0.05 baseline"
    );
}

async fn http_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
