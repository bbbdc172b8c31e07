//! Listen policy: loopback by default; any other address requires TLS and a control token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why a service refuses to start listening (the binaries exit 64 with this message).
#[derive(Debug, thiserror::Error)]
pub enum ListenPolicyError {
    #[error(
        "refusing to listen on {addr} without TLS: a non-loopback address needs --tls-cert and --tls-key (and a control token); use 127.0.0.1 for local access"
    )]
    NeedsTls { addr: SocketAddr },
    #[error("refusing to listen on {addr} without a control token")]
    NeedsToken { addr: SocketAddr },
    #[error("--tls-cert and --tls-key go together (only {given} was given)")]
    HalfTls { given: &'static str },
    #[error("read TLS file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A certificate chain and its private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// From the pair of optional flags; one without the other is an error.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<TlsFiles>, ListenPolicyError> {
        match (cert, key) {
            (Some(c), Some(k)) => Ok(Some(TlsFiles {
                cert: c.to_path_buf(),
                key: k.to_path_buf(),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ListenPolicyError::HalfTls {
                given: "--tls-cert",
            }),
            (None, Some(_)) => Err(ListenPolicyError::HalfTls { given: "--tls-key" }),
        }
    }

    /// Reads both files into a tonic server TLS config (rustls, ring).
    pub fn server_config(&self) -> Result<ServerTlsConfig, ListenPolicyError> {
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
    }
}

fn read(p: &Path) -> Result<Vec<u8>, ListenPolicyError> {
    std::fs::read(p).map_err(|source| ListenPolicyError::Read {
        path: p.to_path_buf(),
        source,
    })
}

/// The policy: a loopback address is always allowed; any other one needs TLS and a token.
pub fn check_listen(addr: SocketAddr, tls: bool, has_token: bool) -> Result<(), ListenPolicyError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !tls {
        return Err(ListenPolicyError::NeedsTls { addr });
    }
    if !has_token {
        return Err(ListenPolicyError::NeedsToken { addr });
    }
    Ok(())
}

/// Client TLS trusting the PEM CA at `ca` (for `https://` targets); `domain` overrides the name
/// checked in the server certificate.
pub fn client_tls(ca: &Path, domain: Option<&str>) -> Result<ClientTlsConfig, ListenPolicyError> {
    let pem = read(ca)?;
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    if let Some(d) = domain {
        c = c.domain_name(d);
    }
    Ok(c)
}

/// Binds a service's gRPC and metrics listeners; the error names the flag and address that failed
/// (`bind --metrics-listen 127.0.0.1:8100: Address in use`).
pub async fn bind_service_listeners(
    grpc: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
) -> Result<(tokio::net::TcpListener, tokio::net::TcpListener), String> {
    let bind = |flag: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {flag} {addr}: {e}"))
    };
    Ok((
        bind("--listen", grpc).await?,
        bind("--metrics-listen", metrics).await?,
    ))
}

/// The accepted connections of a bound gRPC listener, with `TCP_NODELAY` set on each (what
/// tonic does for listeners it binds itself, and skips for `serve_with_incoming`). Without it a
/// small response written while the previous segment is unacknowledged waits for the peer's
/// delayed ACK (up to 40 ms on Linux).
pub fn grpc_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
