//! Targets: a local run directory (`--path`), explicit addresses, or a fleet file (`--hosts`).

use std::path::{Path, PathBuf};

use miner_service::{ControlToken, Endpoints};
use serde::Deserialize;

use crate::cli::TargetArgs;
use crate::exit::{CliError, Exit};

/// One service to talk to.
#[derive(Debug, Clone)]
pub struct ServiceTarget {
    /// `http://…` or `https://…`.
    pub uri: String,
    pub ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
    pub token: Option<ControlToken>,
    /// The local process (from the endpoints file), to wait for its exit.
    pub pid: Option<u32>,
}

/// A service slot of a host: configured, or why not.
#[derive(Debug, Clone)]
pub enum Slot {
    Target(ServiceTarget),
    /// Not configured (not asked for on the command line / in the fleet entry).
    None,
    /// Expected but not running (e.g. no endpoints file in the run directory).
    Down(String),
}

/// One miner: a trainer/chainsync pair.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub trainer: Slot,
    pub chainsync: Slot,
}

/// An entry of the fleet file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEntry {
    pub name: String,
    /// A local run directory instead of addresses.
    pub path: Option<PathBuf>,
    pub trainer: Option<String>,
    pub chainsync: Option<String>,
    /// PEM CA certificate for TLS (implies https).
    pub ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(alias = "miners", alias = "miner", alias = "host")]
    hosts: Vec<FleetEntry>,
}

/// Parses a fleet file: YAML for `.yaml`/`.yml`, TOML otherwise.
pub fn parse_fleet(path: &Path) -> Result<Vec<FleetEntry>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            if e.kind() == std::io::ErrorKind::NotFound {
                Exit::NoInput
            } else {
                Exit::Other
            },
            format!("hosts file {}: {e}", path.display()),
        )
    })?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let parsed: FleetFile = if yaml {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.to_string())
    }
    .map_err(|e| CliError::new(Exit::Data, format!("hosts file {}: {e}", path.display())))?;
    if parsed.hosts.is_empty() {
        return Err(CliError::new(
            Exit::Data,
            format!("hosts file {}: no hosts", path.display()),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for h in &parsed.hosts {
        if !seen.insert(h.name.clone()) {
            return Err(CliError::new(
                Exit::Data,
                format!(
                    "hosts file {}: host {:?} appears twice",
                    path.display(),
                    h.name
                ),
            ));
        }
    }
    Ok(parsed.hosts)
}

fn read_token(path: &Path) -> Result<ControlToken, CliError> {
    ControlToken::read(path).map_err(|e| {
        let exit = match &e {
            miner_service::TokenError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Exit::NoInput
            }
            miner_service::TokenError::Io { .. } => Exit::NoInput,
            _ => Exit::Data,
        };
        CliError::new(exit, e.to_string())
    })
}

/// `host:port` → `http://host:port` (or https with a CA); full URIs pass through.
pub fn to_uri(addr: &str, tls: bool) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

fn explicit(
    addr: Option<&str>,
    ca: Option<&Path>,
    domain: Option<&str>,
    token: &Option<ControlToken>,
) -> Slot {
    match addr {
        None => Slot::None,
        Some(a) => Slot::Target(ServiceTarget {
            uri: to_uri(a, ca.is_some()),
            ca: ca.map(Path::to_path_buf),
            tls_domain: domain.map(str::to_string),
            token: token.clone(),
            pid: None,
        }),
    }
}

/// The services of a local run directory, from its endpoints and token files.
fn local(
    name: &str,
    run: &Path,
    ca: Option<&Path>,
    domain: Option<&str>,
    token: Option<ControlToken>,
) -> Result<Host, CliError> {
    if !run.is_dir() {
        return Err(CliError::new(
            Exit::NoInput,
            format!("run directory {} does not exist", run.display()),
        ));
    }
    let token = match token {
        Some(t) => Some(t),
        None => {
            let p = ControlToken::path_in(run);
            if p.exists() {
                Some(read_token(&p)?)
            } else {
                None
            }
        }
    };
    let slot = |service: &str, binary: &str| -> Result<Slot, CliError> {
        let ep =
            Endpoints::read(run, service).map_err(|e| CliError::new(Exit::Data, e.to_string()))?;
        Ok(match ep {
            None => Slot::Down(format!(
                "{binary} is not running (no {})",
                Endpoints::path_in(run, service).display()
            )),
            Some(ep) if !miner_service::pid_alive(ep.pid) => Slot::Down(format!(
                "{binary} is not running (pid {} in {} has exited)",
                ep.pid,
                Endpoints::path_in(run, service).display()
            )),
            Some(ep) => Slot::Target(ServiceTarget {
                uri: to_uri(&ep.dial_addr().to_string(), ep.tls),
                ca: ca.map(Path::to_path_buf),
                tls_domain: domain.map(str::to_string),
                token: token.clone(),
                pid: Some(ep.pid),
            }),
        })
    };
    Ok(Host {
        name: name.to_string(),
        trainer: slot("trainer", "trainer-svc")?,
        chainsync: slot("chainsync", "chainsync-svc")?,
    })
}

/// Resolves the command line into hosts.
pub fn resolve(t: &TargetArgs) -> Result<Vec<Host>, CliError> {
    let token = match &t.token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    if let Some(file) = &t.hosts {
        let base = file.parent().unwrap_or(Path::new("."));
        return parse_fleet(file)?
            .into_iter()
            .map(|e| {
                let abs = |p: &PathBuf| {
                    if p.is_absolute() {
                        p.clone()
                    } else {
                        base.join(p)
                    }
                };
                let token = match &e.token_file {
                    Some(p) => Some(read_token(&abs(p))?),
                    None => None,
                };
                let ca = e.ca.as_ref().map(abs);
                if let Some(run) = &e.path {
                    return local(
                        &e.name,
                        &abs(run),
                        ca.as_deref(),
                        e.tls_domain.as_deref(),
                        token,
                    );
                }
                if e.trainer.is_none() && e.chainsync.is_none() {
                    return Err(CliError::new(
                        Exit::Data,
                        format!(
                            "hosts file {}: host {:?} has neither path, trainer nor chainsync",
                            file.display(),
                            e.name
                        ),
                    ));
                }
                Ok(Host {
                    name: e.name.clone(),
                    trainer: explicit(
                        e.trainer.as_deref(),
                        ca.as_deref(),
                        e.tls_domain.as_deref(),
                        &token,
                    ),
                    chainsync: explicit(
                        e.chainsync.as_deref(),
                        ca.as_deref(),
                        e.tls_domain.as_deref(),
                        &token,
                    ),
                })
            })
            .collect();
    }
    if let Some(run) = &t.path {
        return Ok(vec![local(
            "local",
            run,
            t.ca.as_deref(),
            t.tls_domain.as_deref(),
            token,
        )?]);
    }
    if t.trainer.is_none() && t.chainsync.is_none() {
        return Err(CliError::new(
            Exit::Usage,
            "no target: pass --path RUN, --trainer/--chainsync ADDR, or --hosts FILE",
        ));
    }
    Ok(vec![Host {
        name: "local".into(),
        trainer: explicit(
            t.trainer.as_deref(),
            t.ca.as_deref(),
            t.tls_domain.as_deref(),
            &token,
        ),
        chainsync: explicit(
            t.chainsync.as_deref(),
            t.ca.as_deref(),
            t.tls_domain.as_deref(),
            &token,
        ),
    }])
}
