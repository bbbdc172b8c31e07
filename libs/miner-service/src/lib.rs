//! Service plumbing shared by `trainer-svc` and `chainsync-svc` (and the client side used by
//! `minerctl`):
//!
//! - [`listen`]: the listen policy (loopback by default; any other address needs TLS and a
//!   token) and rustls server/client TLS settings;
//! - [`token`]: the control token file (`<run>/control/token`, mode 0600) and the tower layer
//!   that checks `authorization: Bearer <token>` in constant time;
//! - [`metrics_http`]: the bounded plain-HTTP metrics server (deadline per connection, a cap on
//!   connections, a pause after accept errors);
//! - [`endpoints`]: the endpoints file (`<run>/control/<service>.json`) a local `minerctl` reads;
//! - [`telemetry`]: `tracing` + optional OTLP export, and W3C `traceparent` propagation over
//!   gRPC metadata (client interceptor, server layer);
//! - [`shutdown`]: SIGTERM/SIGINT → a root `CancellationToken`, health NOT_SERVING first.

pub mod endpoints;
pub mod listen;
pub mod metrics_http;
pub mod shutdown;
pub mod telemetry;
pub mod token;

pub use endpoints::{Endpoints, EndpointsFile, pid_alive};
pub use listen::{
    ListenPolicyError, TlsFiles, bind_service_listeners, check_listen, grpc_incoming,
};
pub use metrics_http::{MetricsLimits, serve_metrics};
pub use shutdown::{serve_with_grace, shutdown_on_signals, wait_for_signal};
pub use telemetry::{
    LogFormat, TelemetryError, TelemetryGuard, TraceContextInterceptor, TraceContextLayer,
    init_tracing, init_tracing_with_filter,
};
pub use token::{AuthLayer, ControlToken, TokenError};

/// Directory under a run directory holding the token and the endpoints files.
pub const CONTROL_DIR: &str = "control";

/// `<run>/control`.
pub fn control_dir(run_dir: &std::path::Path) -> std::path::PathBuf {
    run_dir.join(CONTROL_DIR)
}
