//! Test support for the local subtensor devnet (`shared/devnet`, spec-293 runtime under chopsticks).
//!
//! [`Devnet::start`] runs `shared/devnet/start-local-subtensor.sh` (found at `<workspace>/../shared/devnet`,
//! or `$MINER_DEVNET_DIR`) in a work folder whose `node_modules` and raw chain spec come from one cache
//! (`<workspace>/target/devnet-cache`, filled once by `npm ci`, ~1-2.5 min cold), so a warm start takes ~10 s.
//! The chain only builds blocks on a transaction or on `dev_newBlock`: tests drive the clock with
//! [`Devnet::new_blocks`] or a [`BlockTicker`]. [`shared`] gives one devnet per test binary.
//!
//! **Invariant:** the chopsticks process never outlives the test process: `Drop` kills it, and a small
//! watchdog shell kills it when the process that started it is gone (a `static` is never dropped).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Errors starting or driving the devnet.
#[derive(Debug, thiserror::Error)]
pub enum DevnetError {
    #[error(
        "devnet kit not found at {0} (shared/ must sit beside the workspace, or set MINER_DEVNET_DIR)"
    )]
    KitMissing(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("devnet RPC {method} on port {port}: {detail}")]
    Rpc {
        method: String,
        port: u16,
        detail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevnetError {
    let what = what.into();
    move |source| DevnetError::Io { what, source }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `shared/devnet`: `$MINER_DEVNET_DIR`, else `<workspace>/../shared/devnet`.
pub fn kit_dir() -> Result<PathBuf, DevnetError> {
    let dir = std::env::var_os("MINER_DEVNET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/devnet"));
    if dir.join("start-local-subtensor.sh").is_file() {
        Ok(dir)
    } else {
        Err(DevnetError::KitMissing(dir))
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, and that this process has not handed out
/// before: the kernel may give a just-released port to the next `bind(0)`, so two calls in a row
/// (a service's gRPC and metrics ports) could otherwise return the same port.
pub fn free_port() -> Result<u16, DevnetError> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    // Ports already handed out stay bound until one is found, so the kernel offers others.
    let mut held = Vec::new();
    for _ in 0..256 {
        let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
        let port = l.local_addr().map_err(io("read the free port"))?.port();
        if given.insert(port) {
            return Ok(port);
        }
        held.push(l);
    }
    Err(DevnetError::Command {
        what: "find a free port".to_owned(),
        detail: "256 binds returned ports already handed out".to_owned(),
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<String, DevnetError> {
    let out = cmd.output().map_err(io(what))?;
    if !out.status.success() {
        return Err(DevnetError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}; {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fills `cache` with `node_modules` (npm ci) and `raw-spec.json` once; serialized by a file lock.
fn prepare_cache(kit: &Path, cache: &Path) -> Result<(), DevnetError> {
    std::fs::create_dir_all(cache).map_err(io(format!("create {}", cache.display())))?;
    let lock = std::fs::File::create(cache.join(".lock")).map_err(io("create the cache lock"))?;
    lock.lock().map_err(io("lock the devnet cache"))?;
    for f in ["package.json", "package-lock.json", "plain2raw.mjs"] {
        std::fs::copy(kit.join(f), cache.join(f))
            .map_err(io(format!("copy {f} into the cache")))?;
    }
    if !cache
        .join("node_modules/@acala-network/chopsticks")
        .is_dir()
    {
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(cache),
            "npm ci for the devnet (needs node/npm and the npm registry)",
        )?;
    }
    if !cache.join("raw-spec.json").is_file() {
        let tmp = cache.join("raw-spec.json.tmp");
        run(
            Command::new("node")
                .arg("plain2raw.mjs")
                .arg(kit.join("data/aura-dev_spec293_plain.json"))
                .arg(&tmp)
                .current_dir(cache),
            "build the raw chain spec",
        )?;
        std::fs::rename(&tmp, cache.join("raw-spec.json")).map_err(io("publish raw-spec.json"))?;
    }
    Ok(())
}

/// A running devnet. Dropping it kills the chain.
pub struct Devnet {
    port: u16,
    pid: u32,
    workdir: PathBuf,
}

impl std::fmt::Debug for Devnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devnet")
            .field("port", &self.port)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Devnet {
    /// Starts the devnet with the default seed (netuid 102, three neurons) on `127.0.0.1:port`,
    /// its files in `workdir`; returns once `chain_getHeader` answers.
    pub fn start(workdir: &Path, port: u16) -> Result<Devnet, DevnetError> {
        Devnet::start_with_seed(workdir, port, None)
    }

    /// As [`Devnet::start`] with another genesis seed JSON (`SEED_JSON`).
    pub fn start_with_seed(
        workdir: &Path,
        port: u16,
        seed_json: Option<&Path>,
    ) -> Result<Devnet, DevnetError> {
        let kit = kit_dir()?;
        let cache = workspace_root().join("target/devnet-cache");
        prepare_cache(&kit, &cache)?;
        std::fs::create_dir_all(workdir).map_err(io(format!("create {}", workdir.display())))?;
        let nm = workdir.join("node_modules");
        if !nm.exists() {
            std::os::unix::fs::symlink(cache.join("node_modules"), &nm)
                .map_err(io("link node_modules from the cache"))?;
        }
        let spec_is_plain_file = std::fs::symlink_metadata(workdir.join("raw-spec.json"))
            .map(|m| m.file_type().is_file())
            .unwrap_or(false);
        if !spec_is_plain_file {
            // A copy: chopsticks refuses a symlinked genesis file.
            let _ = std::fs::remove_file(workdir.join("raw-spec.json"));
            std::fs::copy(cache.join("raw-spec.json"), workdir.join("raw-spec.json"))
                .map_err(io("copy raw-spec.json from the cache"))?;
        }
        let mut cmd = Command::new(kit.join("start-local-subtensor.sh"));
        cmd.arg(workdir).arg(port.to_string()).stdin(Stdio::null());
        if let Some(seed) = seed_json {
            cmd.env("SEED_JSON", seed);
        }
        run(&mut cmd, "start-local-subtensor.sh")?;
        let pid_text = std::fs::read_to_string(workdir.join("chopsticks.pid"))
            .map_err(io("read chopsticks.pid"))?;
        let pid: u32 = pid_text.trim().parse().map_err(|_| DevnetError::Command {
            what: "read chopsticks.pid".into(),
            detail: format!("not a pid: {pid_text:?}"),
        })?;
        // Watchdog: kill the chain when this process is gone (statics are never dropped).
        let me = std::process::id();
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; kill {pid} 2>/dev/null"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("spawn the devnet watchdog"))?;
        let devnet = Devnet {
            port,
            pid,
            workdir: workdir.to_owned(),
        };
        devnet.wait_first_block(Duration::from_secs(90))?;
        Ok(devnet)
    }

    /// Builds block 1 and waits until it exists: chopsticks' first block build can fail for a few
    /// seconds (an Aura slot mismatch in the log), and transactions sent meanwhile are silently dropped.
    fn wait_first_block(&self, within: Duration) -> Result<(), DevnetError> {
        let start = Instant::now();
        loop {
            if self.head()? >= 1 {
                return Ok(());
            }
            let _ = self.new_blocks(1);
            if start.elapsed() > within {
                return Err(DevnetError::Command {
                    what: "build the first devnet block".into(),
                    detail: format!(
                        "no block 1 within {within:?}; see {}",
                        self.log_path().display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The RPC port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The chopsticks process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The chopsticks log (for failure messages).
    pub fn log_path(&self) -> PathBuf {
        self.workdir.join("chopsticks.log")
    }

    /// One JSON-RPC call over HTTP; returns `result`.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, DevnetError> {
        rpc_call(self.port, method, params)
    }

    /// Builds `n` blocks now (`dev_newBlock {count: n}`).
    pub fn new_blocks(&self, n: u32) -> Result<(), DevnetError> {
        self.rpc("dev_newBlock", json!([{ "count": n }]))
            .map(|_| ())
    }

    /// The best block number.
    pub fn head(&self) -> Result<u64, DevnetError> {
        let header = self.rpc("chain_getHeader", json!([]))?;
        header["number"]
            .as_str()
            .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| DevnetError::Rpc {
                method: "chain_getHeader".into(),
                port: self.port,
                detail: format!("no block number in {header}"),
            })
    }

    /// Writes storage at the head (`dev_setStorage`) in the seed-JSON shape
    /// (`{"Pallet": {"Item": [[[keys...], value], ...]}}`); write zeros as SCALE hex (`"0x0000"`).
    pub fn set_storage(&self, storage: Value) -> Result<(), DevnetError> {
        self.rpc("dev_setStorage", json!([storage])).map(|_| ())
    }

    /// Registers a neuron by writing the subtensor storage the runtime reads for it (`NetworksAdded`,
    /// `SubnetworkN` (raised to `uid + 1`), `Keys`, `Uids`, `IsNetworkMember`, `Owner`, `TotalHotkeyAlpha`,
    /// `Axons` when given; `Tempo` 360 for a new subnet) and funds the hotkey so it can pay fees.
    /// Writes take effect at the head. Netuid 102 (seeded at genesis) builds blocks past its first epoch
    /// (block 257; checked to block 298); a subnet *created* here gets no per-neuron vectors, and its first
    /// epoch (block `360 - (netuid + 1) % 361`) was not tried: keep such chains shorter.
    pub fn seed_neuron(&self, n: &NeuronSeed) -> Result<(), DevnetError> {
        let current_n = self
            .rpc("state_getStorage", json!([subnetwork_n_key(n.netuid)]))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .and_then(|h| hex_u16_le(&h))
            .unwrap_or(0);
        let count = current_n.max(n.uid + 1);
        let mut module = json!({
            "NetworksAdded": [[[n.netuid], true]],
            "SubnetworkN": [[[n.netuid], count]],
            "Keys": [[[n.netuid, n.uid], n.hotkey]],
            // chopsticks drops falsy values: zeros go as SCALE hex.
            "Uids": [[[n.netuid, n.hotkey], format!("0x{}", hex_le(&n.uid.to_le_bytes()))]],
            "IsNetworkMember": [[[n.hotkey, n.netuid], true]],
            "Owner": [[[n.hotkey], n.coldkey]],
            "TotalHotkeyAlpha": [[[n.hotkey, n.netuid], format!("0x{}", hex_le(&n.alpha_stake.to_le_bytes()))]],
        });
        if current_n == 0 {
            // A new subnet: give it bittensor's usual tempo so its epoch (which asserts on per-neuron vectors
            // this helper does not write) stays ~360 blocks away; a subnet without a tempo breaks block
            // building within a few blocks.
            module["Tempo"] = json!([[[n.netuid], 360]]);
        }
        if let Some((ip, port)) = n.axon {
            module["Axons"] = json!([[[n.netuid, n.hotkey], {
                "block": 1, "version": 1, "ip": u32::from(ip).to_string(), "port": port,
                "ipType": 4, "protocol": 4, "placeholder1": 0, "placeholder2": 0
            }]]);
        }
        self.set_storage(json!({
            "SubtensorModule": module,
            "System": {"Account": [[[n.hotkey], {"providers": 1, "data": {"free": "1000000000000"}}]]},
        }))
    }

    /// Starts a thread that builds one block every `every` until the ticker is dropped.
    pub fn start_ticker(&self, every: Duration) -> BlockTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let port = self.port;
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = rpc_call(port, "dev_newBlock", json!([{ "count": 1 }]));
                std::thread::sleep(every);
            }
        });
        BlockTicker {
            stop,
            handle: Some(handle),
        }
    }

    /// Kills the chain now.
    pub fn kill(&self) {
        let _ = Command::new("kill")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A neuron to register with [`Devnet::seed_neuron`].
#[derive(Debug, Clone)]
pub struct NeuronSeed<'a> {
    pub netuid: u16,
    pub uid: u16,
    /// SS58 of the hotkey.
    pub hotkey: &'a str,
    /// SS58 of the coldkey.
    pub coldkey: &'a str,
    /// Advertised axon (loopback is fine here; the runtime refuses it only through `serve_axon`).
    pub axon: Option<(std::net::Ipv4Addr, u16)>,
    /// Alpha stake in rao.
    pub alpha_stake: u64,
}

fn hex_le(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_u16_le(h: &str) -> Option<u16> {
    let h = h.strip_prefix("0x")?;
    let lo = u8::from_str_radix(h.get(0..2)?, 16).ok()?;
    let hi = u8::from_str_radix(h.get(2..4)?, 16).ok()?;
    Some(u16::from_le_bytes([lo, hi]))
}

/// Substrate's `twox_128`: two xxhash64 (seeds 0 and 1), little-endian.
fn twox_128(data: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&twox_hash::XxHash64::oneshot(0, data).to_le_bytes());
    out[8..].copy_from_slice(&twox_hash::XxHash64::oneshot(1, data).to_le_bytes());
    out
}

/// `SubtensorModule.SubnetworkN(netuid)` storage key: twox128(pallet) ‖ twox128(item) ‖ netuid (Identity).
fn subnetwork_n_key(netuid: u16) -> String {
    format!(
        "0x{}{}{}",
        hex_le(&twox_128(b"SubtensorModule")),
        hex_le(&twox_128(b"SubnetworkN")),
        hex_le(&netuid.to_le_bytes())
    )
}

/// Builds blocks in the background; stops when dropped.
pub struct BlockTicker {
    /// Set on drop; the thread checks it between blocks.
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for BlockTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A JSON-RPC call over plain HTTP/1.1 to `127.0.0.1:port` (no client library needed for loopback).
pub fn rpc_call(port: u16, method: &str, params: Value) -> Result<Value, DevnetError> {
    let err = |detail: String| DevnetError::Rpc {
        method: method.to_owned(),
        port,
        detail,
    };
    let body = json!({"id": 1, "jsonrpc": "2.0", "method": method, "params": params}).to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| err(format!("connect: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| err(e.to_string()))?;
    let req = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| err(format!("send: {e}")))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| err(format!("read: {e}")))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| err("malformed HTTP response".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(err(head.lines().next().unwrap_or_default().to_owned()));
    }
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_owned()
    };
    let v: Value =
        serde_json::from_str(&payload).map_err(|e| err(format!("bad JSON reply: {e}")))?;
    if let Some(e) = v.get("error") {
        return Err(err(e.to_string()));
    }
    Ok(v.get("result").cloned().unwrap_or(Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

static SHARED: OnceLock<Result<Devnet, String>> = OnceLock::new();

/// One devnet per test binary, on a free port, started on first use; its files (log, pid) in
/// `<workspace>/target/devnet-run/<test binary name>`.
/// Panics with the start error (tests that need the chain cannot run without it).
pub fn shared() -> &'static Devnet {
    let started = SHARED.get_or_init(|| {
        let t = Instant::now();
        let port = free_port().map_err(|e| e.to_string())?;
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "devnet".to_owned());
        let workdir = workspace_root().join("target/devnet-run").join(exe);
        let d = Devnet::start(&workdir, port).map_err(|e| e.to_string())?;
        eprintln!("devnet up on {} in {:?}", d.ws_url(), t.elapsed());
        Ok(d)
    });
    match started {
        Ok(d) => d,
        Err(e) => panic!("start the devnet: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        // A service's gRPC and metrics ports come from consecutive calls; a repeat made
        // trainer-svc fail with "Address already in use".
        let ports: Vec<u16> = (0..500).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn storage_prefix_hash_matches_substrate() {
        // twox128("System"), as every Substrate chain's System.* keys start.
        assert_eq!(
            hex_le(&twox_128(b"System")),
            "26aa394eea5630e07c48ae0c9558cef7"
        );
        assert_eq!(hex_u16_le("0x0300"), Some(3));
        assert_eq!(hex_u16_le("0x"), None);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"), "abcdef");
    }
}
