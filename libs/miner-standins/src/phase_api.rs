//! `PhaseApiStandIn`: the owner's phase service (spec §3.3) on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::sync::oneshot;

use crate::BlockSource;
use crate::owner_schedule::OwnerSchedule;

/// What the stand-in serves; shared with the test, which may change it at any time.
pub struct PhaseApiState {
    pub schedule: OwnerSchedule,
    pub block: BlockSource,
    pub whitelist: Mutex<Vec<String>>,
    /// 0 = up; otherwise every request is answered with this status ("down").
    pub down_status: AtomicU16,
    /// Requests received (all routes).
    pub hits: AtomicU64,
}

/// The owner phase service stand-in; stops when dropped.
pub struct PhaseApiStandIn {
    addr: SocketAddr,
    state: Arc<PhaseApiState>,
    _stop: oneshot::Sender<()>,
}

impl PhaseApiStandIn {
    /// Binds 127.0.0.1:0 and serves the routes from `block` and `whitelist`.
    pub async fn start(
        schedule: OwnerSchedule,
        block: BlockSource,
        whitelist: Vec<String>,
    ) -> std::io::Result<Self> {
        let state = Arc::new(PhaseApiState {
            schedule,
            block,
            whitelist: Mutex::new(whitelist),
            down_status: AtomicU16::new(0),
            hits: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/", get(index))
            .route("/get_phase", get(get_phase))
            .route("/blocks_until_next_phase", get(blocks_until_next_phase))
            .route("/previous_phase_blocks", get(previous_phase_blocks))
            .route("/get_validator_whitelist", get(whitelist_route))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(PhaseApiStandIn {
            addr,
            state,
            _stop: tx,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &Arc<PhaseApiState> {
        &self.state
    }

    /// Answer every request with `status` (e.g. 503) until [`PhaseApiStandIn::set_up`].
    pub fn set_down(&self, status: u16) {
        self.state.down_status.store(status, Ordering::SeqCst);
    }

    pub fn set_up(&self) {
        self.state.down_status.store(0, Ordering::SeqCst);
    }

    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }
}

fn gate(state: &PhaseApiState) -> Option<Response> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    match state.down_status.load(Ordering::SeqCst) {
        0 => None,
        s => Some(
            (
                StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "phase service down",
            )
                .into_response(),
        ),
    }
}

async fn index(State(st): State<Arc<PhaseApiState>>) -> Response {
    if let Some(r) = gate(&st) {
        return r;
    }
    axum::Json(
        json!({"message": "phase service stand-in", "cycle_length": st.schedule.cycle_length()}),
    )
    .into_response()
}

async fn get_phase(State(st): State<Arc<PhaseApiState>>) -> Response {
    if let Some(r) = gate(&st) {
        return r;
    }
    axum::Json(st.schedule.get_phase((st.block)())).into_response()
}

async fn blocks_until_next_phase(State(st): State<Arc<PhaseApiState>>) -> Response {
    if let Some(r) = gate(&st) {
        return r;
    }
    axum::Json(st.schedule.blocks_until_next_phase((st.block)())).into_response()
}

async fn previous_phase_blocks(State(st): State<Arc<PhaseApiState>>) -> Response {
    if let Some(r) = gate(&st) {
        return r;
    }
    axum::Json(st.schedule.previous_phase_blocks((st.block)())).into_response()
}

async fn whitelist_route(State(st): State<Arc<PhaseApiState>>) -> Response {
    if let Some(r) = gate(&st) {
        return r;
    }
    let list = st.whitelist.lock().map(|l| l.clone()).unwrap_or_default();
    axum::Json(list).into_response()
}
