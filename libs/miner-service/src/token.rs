//! The control token: a random secret in `<run>/control/token` (mode 0600, created on first
//! start), sent as `authorization: Bearer <token>` and checked in constant time by [`AuthLayer`].
//! Temporaries of writers that died before linking the file are removed on the next start.

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;

/// File name of the token under `<run>/control/`.
pub const TOKEN_FILE: &str = "token";
/// The metadata key carrying the token.
pub const AUTHORIZATION: &str = "authorization";
/// RPC method names that change state and always need the token.
pub const MUTATING_METHODS: &[&str] = &["Stop", "LoadBaseline"];

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("control token file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "control token file {} is readable by others (mode {mode:o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("control token file {} is empty or not one line of printable ASCII", path.display())]
    Malformed { path: PathBuf },
}

/// A control token (never printed: `Debug` hides it).
#[derive(Clone)]
pub struct ControlToken(Arc<str>);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(<redacted>)")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ControlToken {
    /// A token from a known string (tests, `--token-file` contents).
    pub fn new(s: impl Into<String>) -> Result<ControlToken, String> {
        let s: String = s.into();
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token must be one word of printable ASCII".into());
        }
        Ok(ControlToken(Arc::from(s)))
    }

    /// A fresh random token (32 bytes, hex).
    pub fn generate() -> ControlToken {
        let bytes: [u8; 32] = rand::random();
        ControlToken(Arc::from(hex::encode(bytes)))
    }

    /// The secret (to put in a request; never log it).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `<run>/control/token`.
    pub fn path_in(run_dir: &Path) -> PathBuf {
        crate::control_dir(run_dir).join(TOKEN_FILE)
    }

    /// Reads a token file, refusing one that group or others can read.
    pub fn read(path: &Path) -> Result<ControlToken, TokenError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        ControlToken::new(text).map_err(|_| TokenError::Malformed {
            path: path.to_path_buf(),
        })
    }

    /// Reads `<run>/control/token`, creating it (0600, in a 0700 directory) when missing. Two
    /// services starting together agree on one token: the file appears atomically (a hard
    /// link of a fsynced temp file) and the loser reads the winner's.
    pub fn load_or_create(run_dir: &Path) -> Result<ControlToken, TokenError> {
        remove_stale_token_temporaries(&crate::control_dir(run_dir));
        let path = Self::path_in(run_dir);
        if path.exists() {
            return Self::read(&path);
        }
        let dir = crate::control_dir(run_dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        let token = Self::generate();
        let tmp = dir.join(format!(
            ".token.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(token.expose().as_bytes())
                .and_then(|_| f.write_all(b"\n"))
                .and_then(|_| f.sync_all())
                .map_err(io(&tmp))?;
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(&dir) {
                    let _ = d.sync_all();
                }
                tracing::info!(path = %path.display(), "created a new control token file");
                Ok(token)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::read(&path),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Constant-time comparison with a presented secret.
    pub fn matches(&self, presented: &str) -> bool {
        let a = self.0.as_bytes();
        let b = presented.as_bytes();
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }

    /// The `authorization` metadata value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// Removes `.token.<pid>.<nonce>.tmp` files left in `dir` by writers that died between
/// creating and linking them (a live writer's file is left alone).
pub fn remove_stale_token_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(".token.")
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !crate::pid_alive(pid)
            && std::fs::remove_file(e.path()).is_ok()
        {
            tracing::info!(path = %e.path().display(), "removed a stale control token temporary");
        }
    }
}

/// Which calls need the token: mutating ones ([`MUTATING_METHODS`]) always; every other
/// call (except gRPC health) too when `require_for_reads` (any non-loopback listener).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    token: ControlToken,
    require_for_reads: bool,
}

impl AuthLayer {
    pub fn new(token: ControlToken, require_for_reads: bool) -> AuthLayer {
        AuthLayer {
            token,
            require_for_reads,
        }
    }

    /// `require_for_reads` from the listen address: off on loopback, on elsewhere.
    pub fn for_listen(token: ControlToken, addr: std::net::SocketAddr) -> AuthLayer {
        Self::new(token, !addr.ip().is_loopback())
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

/// Why a request was refused (logged; never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Wrong,
}

impl AuthLayer {
    /// Checks one request's path and headers.
    pub fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Refusal> {
        let method = path.rsplit('/').next().unwrap_or("");
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let mutating = MUTATING_METHODS.contains(&method);
        let exempt = service == "grpc.health.v1.Health";
        if !mutating && (exempt || !self.require_for_reads) {
            return Ok(());
        }
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(Refusal::Missing);
        };
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or("")
            .trim();
        if self.token.matches(presented) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }
}

fn peer<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            req.extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.layer.check(req.uri().path(), req.headers()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(why) => {
                tracing::warn!(
                    rpc = %req.uri().path(),
                    peer = ?peer(&req),
                    reason = ?why,
                    "refused a call without a valid control token"
                );
                let status = tonic::Status::unauthenticated(match why {
                    Refusal::Missing => {
                        "this call needs the control token (authorization: Bearer <token>, from <run>/control/token)"
                    }
                    Refusal::Wrong => "wrong control token",
                });
                let resp = status.into_http::<tonic::body::Body>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
