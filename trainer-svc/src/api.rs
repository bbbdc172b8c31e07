//! The gRPC layer (`miner.trainer.v1.Trainer`): the only module that knows tonic/prost types.
//! Handlers read the status snapshot and set [`Control`] flags; they never touch `tch`.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use miner_contract::layout::{CheckpointEntry, RunDir};
use miner_proto::trainer::v1 as pb;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::status::{Control, StatusSnapshot, TrainerState};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct TrainerApi {
    pub status: watch::Receiver<StatusSnapshot>,
    pub control: Arc<Control>,
    pub run_dir: PathBuf,
}

fn state_to_pb(s: TrainerState) -> pb::TrainerState {
    match s {
        TrainerState::Starting => pb::TrainerState::Starting,
        TrainerState::Training => pb::TrainerState::Training,
        TrainerState::Evaluating => pb::TrainerState::Evaluating,
        TrainerState::Saving => pb::TrainerState::Saving,
        TrainerState::Reloading => pb::TrainerState::Reloading,
        TrainerState::Stopping => pb::TrainerState::Stopping,
        TrainerState::Stopped => pb::TrainerState::Stopped,
        TrainerState::Failed => pb::TrainerState::Failed,
    }
}

impl From<&StatusSnapshot> for pb::TrainerStatus {
    fn from(s: &StatusSnapshot) -> Self {
        pb::TrainerStatus {
            state: state_to_pb(s.state) as i32,
            step: s.step,
            inner_opt_step: s.inner_opt_step,
            loss: s.loss,
            val_loss: s.val_loss,
            learning_rate: s.learning_rate,
            tokens_per_sec: s.tokens_per_sec,
            grad_norm: s.grad_norm,
            loss_scale: s.loss_scale,
            baseline_version: s.baseline_version,
            baseline_hash: s.baseline_hash.clone(),
            baseline_name: s.baseline_name.clone(),
            device: s.device.clone(),
            memory_allocated_bytes: s.memory_allocated_bytes,
            memory_peak_bytes: s.memory_peak_bytes,
            expert_group_id: s.expert_group_id,
            last_checkpoint: s.last_checkpoint.clone(),
            phase: s.phase.clone(),
            block: s.block,
            consecutive_non_finite: s.consecutive_non_finite,
            started_unix: s.started_unix,
            error: s.error.clone(),
        }
    }
}

impl TrainerApi {
    async fn list(&self) -> Result<Vec<CheckpointEntry>, Status> {
        let dir = self.run_dir.clone();
        tokio::task::spawn_blocking(move || RunDir::open(&dir).and_then(|r| r.list()))
            .await
            .map_err(|e| Status::internal(format!("list checkpoints: {e}")))?
            .map_err(|e| Status::unavailable(format!("list checkpoints: {e}")))
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::TrainerStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::trainer_server::Trainer for TrainerApi {
    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::TrainerStatus>, Status> {
        Ok(Response::new(pb::TrainerStatus::from(
            &*self.status.borrow(),
        )))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        req: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let min = Duration::from_millis(u64::from(req.into_inner().min_interval_ms));
        let mut rx = self.status.clone();
        let first = pb::TrainerStatus::from(&*rx.borrow_and_update());
        let stream =
            futures::stream::unfold((rx, Some(first)), move |(mut rx, first)| async move {
                if let Some(f) = first {
                    return Some((Ok(f), (rx, None)));
                }
                if !min.is_zero() {
                    tokio::time::sleep(min).await;
                }
                rx.changed().await.ok()?;
                let s = pb::TrainerStatus::from(&*rx.borrow_and_update());
                Some((Ok(s), (rx, None)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_checkpoints(
        &self,
        _req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let entries = self.list().await?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: entries
                .iter()
                .map(miner_proto::checkpoint_message)
                .collect(),
        }))
    }

    async fn load_baseline(
        &self,
        req: Request<pb::LoadBaselineRequest>,
    ) -> Result<Response<pb::LoadBaselineResponse>, Status> {
        let name = req.into_inner().name;
        let entries = self.list().await?;
        let pick = entries
            .iter()
            .find(|e| e.is_verified() && (name.is_empty() || e.dir_name == name));
        let Some(e) = pick else {
            return Err(Status::not_found(if name.is_empty() {
                "no verified checkpoint to load".to_string()
            } else {
                format!("no verified checkpoint named {name}")
            }));
        };
        self.control.request_load_baseline(e.dir_name.clone());
        Ok(Response::new(pb::LoadBaselineResponse {
            loaded: Some(miner_proto::checkpoint_message(e)),
            message: format!("{} will be loaded at the next step boundary", e.dir_name),
        }))
    }

    async fn stop(
        &self,
        req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        let final_save = req.into_inner().final_save;
        self.control.request_stop(final_save);
        tracing::info!(final_save, "stop requested over gRPC");
        Ok(Response::new(pb::StopResponse {
            accepted: true,
            message: if final_save {
                "stopping at the next micro-batch boundary after a final checkpoint".into()
            } else {
                "stopping at the next micro-batch boundary".into()
            },
        }))
    }
}

/// How the gRPC listener is secured.
pub struct ServeOptions {
    /// Checks `authorization: Bearer <token>` (mutating calls always; all calls off loopback).
    pub auth: miner_service::AuthLayer,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Set SERVING here; the caller turns it NOT_SERVING first when shutting down.
    pub health: tonic_health::server::HealthReporter,
}

/// Name under which the Trainer service reports health.
pub const HEALTH_NAME: &str = "miner.trainer.v1.Trainer";

/// Serves the Trainer service, health and reflection on `listener` until `shutdown`, behind the
/// trace-context layer (caller's span becomes the parent) and the control-token layer.
pub async fn serve(
    api: TrainerApi,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let ServeOptions { auth, tls, health } = opts;
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    health
        .set_serving::<pb::trainer_server::TrainerServer<TrainerApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(miner_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = miner_service::grpc_incoming(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let hr = health.clone();
    let sd = shutdown.clone();
    let serve = builder
        .layer(miner_service::TraceContextLayer)
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::trainer_server::TrainerServer::new(api))
        .serve_with_incoming_shutdown(incoming, async move {
            sd.cancelled().await;
            hr.set_not_serving::<pb::trainer_server::TrainerServer<TrainerApi>>()
                .await;
        });
    // Open streams (a health `Watch`, say) must not hold the process after the loop ended.
    miner_service::serve_with_grace(serve, shutdown, SHUTDOWN_GRACE).await?;
    Ok(())
}

/// How long open gRPC calls may run on once the loop has ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
