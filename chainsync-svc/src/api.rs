//! gRPC `miner.chainsync.v1.ChainSync`, health and reflection. The only module that knows the
//! tonic/prost types: requests are converted once, on receipt, and answers built from the
//! domain types at the end.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use miner_contract::CheckpointEntry;
use miner_proto::chainsync::v1 as pb;
use miner_proto::common::v1 as common;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::jobs::{Engine, JobKind, JobOutcome, JobRecord, PhaseView};
use crate::phase::PhaseSourceKind;

/// The service state.
#[derive(Clone)]
pub struct ChainSyncApi {
    pub engine: Arc<Engine>,
    /// Cancelled by `Stop`.
    pub shutdown: CancellationToken,
}

fn phase_msg(v: &PhaseView) -> pb::Phase {
    let i = &v.info;
    pb::Phase {
        block: i.block,
        name: i.phase_name.as_str().to_owned(),
        index: i.phase_index as u32,
        start_block: i.phase_start_block,
        end_block: i.phase_end_block,
        blocks_into_phase: i.blocks_into_phase,
        blocks_remaining: i.blocks_remaining_in_phase,
        cycle_index: i.cycle_index,
        cycle_length: i.cycle_length,
        source: match v.source {
            PhaseSourceKind::OwnerApi => pb::PhaseSource::OwnerApi as i32,
            PhaseSourceKind::Local => pb::PhaseSource::Local as i32,
        },
        skew_blocks: v.skew_blocks,
    }
}

/// A job record as the wire message.
pub fn job_msg(r: &JobRecord) -> pb::Job {
    pb::Job {
        id: r.id,
        kind: match r.kind {
            JobKind::Download => pb::JobKind::Download,
            JobKind::Commit1 => pb::JobKind::Commit1,
            JobKind::Commit2 => pb::JobKind::Commit2,
            JobKind::Submit => pb::JobKind::Submit,
        } as i32,
        phase: r.phase.clone(),
        cycle_index: r.cycle_index,
        started_block: r.started_block,
        finished_block: r.finished_block,
        model_hash: r.model_hash.clone(),
        checkpoint: r.checkpoint.clone(),
        destination: r.destination.clone(),
        outcome: match r.outcome {
            JobOutcome::Running => pb::JobOutcome::Running,
            JobOutcome::Succeeded => pb::JobOutcome::Succeeded,
            JobOutcome::Failed => pb::JobOutcome::Failed,
            JobOutcome::Missed => pb::JobOutcome::Missed,
            JobOutcome::Skipped => pb::JobOutcome::Skipped,
            JobOutcome::Cancelled => pb::JobOutcome::Cancelled,
        } as i32,
        error: r.error.clone(),
        included_block: r.included_block,
        attempts: r.attempts,
        started_unix: r.started_unix,
        finished_unix: r.finished_unix,
        hf_repo: r.hf_repo.clone(),
        hf_revision: r.hf_revision.clone(),
        bytes_done: r.bytes_done,
        bytes_total: r.bytes_total,
    }
}

/// A listed checkpoint with the committed/submitted state from the job records.
fn checkpoint_msg(e: &CheckpointEntry, jobs: &[JobRecord]) -> common::Checkpoint {
    let mut m = miner_proto::checkpoint_message(e);
    let path = m.path.clone();
    let done = |kind: JobKind| {
        jobs.iter()
            .any(|j| j.kind == kind && j.outcome == JobOutcome::Succeeded && j.checkpoint == path)
    };
    m.committed = done(JobKind::Commit2);
    m.submitted = done(JobKind::Submit);
    m
}

type PhaseStream = Pin<Box<dyn Stream<Item = Result<pb::Phase, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::chain_sync_server::ChainSync for ChainSyncApi {
    async fn get_phase(
        &self,
        _req: Request<pb::GetPhaseRequest>,
    ) -> Result<Response<pb::Phase>, Status> {
        match self.engine.phase() {
            Some(v) => Ok(Response::new(phase_msg(&v))),
            None => Err(Status::unavailable(
                "the phase is not known yet (chain head not read)",
            )),
        }
    }

    type WatchPhaseStream = PhaseStream;

    async fn watch_phase(
        &self,
        _req: Request<pb::WatchPhaseRequest>,
    ) -> Result<Response<PhaseStream>, Status> {
        let mut rx = self.engine.watch_phase();
        let shutdown = self.shutdown.clone();
        let stream = async_stream_phase(move |tx| async move {
            let mut last_block = None;
            loop {
                let cur = rx.borrow_and_update().clone();
                if let Some(v) = cur
                    && last_block != Some(v.head)
                {
                    last_block = Some(v.head);
                    if tx.send(Ok(phase_msg(&v))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_checkpoints(
        &self,
        _req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let run = self.engine.run_dir().clone();
        let jobs = self.engine.log.newest_first(0);
        let list = tokio::task::spawn_blocking(move || {
            run.list().map(|entries| {
                entries
                    .iter()
                    .map(|e| checkpoint_msg(e, &jobs))
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: list,
        }))
    }

    async fn get_jobs(
        &self,
        req: Request<pb::GetJobsRequest>,
    ) -> Result<Response<pb::GetJobsResponse>, Status> {
        let limit = req.into_inner().limit as usize;
        let jobs = self
            .engine
            .log
            .newest_first(limit)
            .iter()
            .map(job_msg)
            .collect();
        Ok(Response::new(pb::GetJobsResponse { jobs }))
    }

    async fn load_baseline(
        &self,
        _req: Request<pb::LoadBaselineRequest>,
    ) -> Result<Response<pb::LoadBaselineResponse>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("the daemon is stopping"));
        }
        let Some(view) = self.engine.phase() else {
            return Err(Status::unavailable(
                "the phase is not known yet (chain head not read)",
            ));
        };
        let rec = self.engine.spawn_job(JobKind::Download, view.info, true);
        Ok(Response::new(pb::LoadBaselineResponse {
            job: Some(job_msg(&rec)),
        }))
    }

    async fn stop(
        &self,
        _req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        self.shutdown.cancel();
        Ok(Response::new(pb::StopResponse {
            accepted: true,
            message:
                "stopping: running jobs are cancelled (a commit in flight finishes), pins released"
                    .into(),
        }))
    }
}

/// A stream fed by a task through a small channel.
fn async_stream_phase<F, Fut>(f: F) -> PhaseStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Phase, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The health reporter of the service (set NOT_SERVING first on shutdown).
pub type Health = tonic_health::server::HealthReporter;

/// How the gRPC listener is secured.
pub struct ServeOptions {
    /// Checks `authorization: Bearer <token>` (`LoadBaseline` and `Stop` always; all calls off
    /// loopback).
    pub auth: miner_service::AuthLayer,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Set SERVING here; turned NOT_SERVING as soon as `shutdown` is cancelled.
    pub health: Health,
}

/// Name under which the ChainSync service reports health.
pub const HEALTH_NAME: &str = "miner.chainsync.v1.ChainSync";

/// How long open gRPC calls (a `WatchPhase` stream, say) may run on once the servers stop.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves ChainSync, health and reflection on `listener` until `stop`, behind the trace-context
/// layer and the control-token layer; health turns NOT_SERVING as soon as `shutdown` is
/// cancelled.
pub async fn serve(
    api: ChainSyncApi,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    stop: CancellationToken,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let ServeOptions { auth, tls, health } = opts;
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    health
        .set_serving::<pb::chain_sync_server::ChainSyncServer<ChainSyncApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(miner_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let hr = health.clone();
    let watcher = tokio::spawn(async move {
        shutdown.cancelled().await;
        hr.set_not_serving::<pb::chain_sync_server::ChainSyncServer<ChainSyncApi>>()
            .await;
    });
    let incoming = miner_service::grpc_incoming(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let sd = stop.clone();
    let serve = builder
        .layer(miner_service::TraceContextLayer)
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::chain_sync_server::ChainSyncServer::new(api))
        .serve_with_incoming_shutdown(incoming, async move { sd.cancelled().await });
    let r = miner_service::serve_with_grace(serve, stop, SHUTDOWN_GRACE).await;
    watcher.abort();
    r?;
    Ok(())
}
