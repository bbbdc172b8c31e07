//! The endpoints file `<run>/control/<service>.json`: where a running service listens, so a
//! local `minerctl --path RUN` finds it. Written atomically after binding, removed on exit.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a service records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// `trainer` or `chainsync`.
    pub service: String,
    /// The bound gRPC address (as bound: may be `0.0.0.0:…`).
    pub grpc: SocketAddr,
    /// The bound Prometheus address, if any.
    pub metrics: Option<SocketAddr>,
    pub pid: u32,
    /// Whether the gRPC listener speaks TLS.
    pub tls: bool,
    pub started_unix: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("endpoints file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("endpoints file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Endpoints {
    /// This process's endpoints.
    pub fn new(service: &str, grpc: SocketAddr, metrics: Option<SocketAddr>, tls: bool) -> Self {
        Endpoints {
            service: service.to_string(),
            grpc,
            metrics,
            pid: std::process::id(),
            tls,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }

    /// `<run>/control/<service>.json`.
    pub fn path_in(run_dir: &Path, service: &str) -> PathBuf {
        crate::control_dir(run_dir).join(format!("{service}.json"))
    }

    /// The address a local client dials: an unspecified bind address becomes loopback.
    pub fn dial_addr(&self) -> SocketAddr {
        let mut a = self.grpc;
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        a
    }

    /// Writes the file atomically (temp, fsync, rename); the guard removes it when dropped.
    pub fn write(&self, run_dir: &Path) -> Result<EndpointsFile, EndpointsError> {
        let path = Self::path_in(run_dir, &self.service);
        let err = |source| EndpointsError::Io {
            path: path.clone(),
            source,
        };
        let dir = crate::control_dir(run_dir);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let tmp = dir.join(format!(".{}.json.{}.tmp", self.service, self.pid));
        let body = serde_json::to_vec_pretty(self).map_err(|source| EndpointsError::Parse {
            path: path.clone(),
            source,
        })?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&body).and_then(|_| f.sync_all()).map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(EndpointsFile {
            path,
            pid: self.pid,
        })
    }

    /// Reads `<run>/control/<service>.json`; `Ok(None)` when there is none.
    pub fn read(run_dir: &Path, service: &str) -> Result<Option<Endpoints>, EndpointsError> {
        let path = Self::path_in(run_dir, service);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(EndpointsError::Io { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| EndpointsError::Parse { path, source })
    }
}

/// Removes the endpoints file when dropped (if it still names this process).
#[derive(Debug)]
pub struct EndpointsFile {
    path: PathBuf,
    pid: u32,
}

impl EndpointsFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EndpointsFile {
    fn drop(&mut self) {
        let ours = std::fs::read(&self.path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Endpoints>(&t).ok())
            .is_some_and(|e| e.pid == self.pid);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether a process with this pid is alive (Linux `/proc`; a zombie counts as exited).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // `pid (comm) S ...`: the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}
