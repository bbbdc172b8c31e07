//! Logging and tracing: `tracing` to stderr (readable text, or JSON for collectors), plus
//! optional OTLP (gRPC or HTTP) export of spans, and W3C trace context across gRPC calls.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {endpoint}: {message}")]
    Otlp { endpoint: String, message: String },
    #[error("install the tracing subscriber: {0}")]
    Install(String),
}

/// Flushes and shuts the span exporter down when dropped (or on [`TelemetryGuard::shutdown`]).
/// Drop it while the Tokio runtime that built it still runs.
#[must_use = "dropping the guard shuts the exporter down"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered now (e.g. before a short-lived client exits).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }

    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.force_flush() {
                eprintln!("flush spans: {e}");
            }
            if let Err(e) = p.shutdown() {
                eprintln!("shut the span exporter down: {e}");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// Installs the global subscriber: `RUST_LOG`-style filter (default `info`), stderr in
/// `log_format`, and with `otlp_endpoint` an OTLP span exporter tagged
/// `service.name = service_name`: OTLP/gRPC for e.g. `http://127.0.0.1:4317`, OTLP/HTTP
/// (protobuf) for a URL ending in `/v1/traces` (e.g. `http://127.0.0.1:4318/v1/traces`). Also installs the W3C trace-context
/// propagator. With an endpoint it must be called inside a Tokio runtime.
pub fn init_tracing(
    service_name: &str,
    log_format: LogFormat,
    otlp_endpoint: Option<String>,
) -> Result<TelemetryGuard, TelemetryError> {
    init_tracing_with_filter(service_name, log_format, otlp_endpoint, "info")
}

/// [`init_tracing`] with another default console filter when `RUST_LOG` is unset (a CLI
/// uses `warn`). Exported spans are always kept from `info` up, whatever the console shows.
pub fn init_tracing_with_filter(
    service_name: &str,
    log_format: LogFormat,
    otlp_endpoint: Option<String>,
    default_filter: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::LevelFilter;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match log_format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let mut guard = TelemetryGuard::default();
    let otel = match otlp_endpoint.filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            let err = |message: String| TelemetryError::Otlp {
                endpoint: endpoint.clone(),
                message,
            };
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(err("needs a Tokio runtime".into()));
            }
            use opentelemetry_otlp::WithExportConfig;
            // `…/v1/traces` is an OTLP/HTTP (protobuf) URL; anything else is OTLP/gRPC.
            let exporter = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
                use opentelemetry_otlp::WithHttpConfig;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(OnRuntime {
                        handle: tokio::runtime::Handle::current(),
                        inner: std::sync::Arc::new(
                            opentelemetry_http::hyper::HyperClient::with_default_connector(
                                std::time::Duration::from_secs(10),
                                None,
                            ),
                        ),
                    })
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint.clone())
                    .build()
            } else {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .build()
            }
            .map_err(|e| err(e.to_string()))?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service_name.to_string())
                        .build(),
                )
                .build();
            let tracer = provider.tracer(service_name.to_string());
            opentelemetry::global::set_tracer_provider(provider.clone());
            guard.provider = Some(provider);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(LevelFilter::INFO),
            )
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    Ok(guard)
}

/// Runs the HTTP exporter's requests on the Tokio runtime that built it (the batch span
/// processor exports from its own thread, where Hyper finds no reactor).
#[derive(Debug)]
struct OnRuntime {
    handle: tokio::runtime::Handle,
    inner: std::sync::Arc<
        opentelemetry_http::hyper::HyperClient<hyper_util::client::legacy::connect::HttpConnector>,
    >,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<opentelemetry_http::Bytes>,
    ) -> Result<http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError> {
        let inner = self.inner.clone();
        self.handle
            .spawn(async move { inner.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Client interceptor: injects the current span's W3C `traceparent` and, when set, the
/// control token as `authorization: Bearer <token>`.
#[derive(Clone, Debug, Default)]
pub struct TraceContextInterceptor {
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl TraceContextInterceptor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also sends `token` on every call.
    pub fn with_token(token: Option<&crate::ControlToken>) -> Self {
        TraceContextInterceptor {
            bearer: token.and_then(|t| {
                let mut v = tonic::metadata::MetadataValue::try_from(t.bearer()).ok()?;
                v.set_sensitive(true);
                Some(v)
            }),
        }
    }
}

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
        });
        if let Some(b) = &self.bearer {
            req.metadata_mut()
                .insert(crate::token::AUTHORIZATION, b.clone());
        }
        Ok(req)
    }
}

/// Server layer: one `grpc.server` span per call, named after the RPC path, whose parent is
/// the caller's span when the request carries a `traceparent`.
#[derive(Clone, Debug, Default)]
pub struct TraceContextLayer;

impl<S> tower_layer::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;
    fn layer(&self, inner: S) -> TraceContextService<S> {
        TraceContextService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path,
            otel.kind = "server",
            rpc.path = %path
        );
        let _ = span.set_parent(parent);
        let fut = self.inner.call(req);
        Box::pin(fut.instrument(span))
    }
}
