//! The chain client: reads (head, block hashes, metagraph, commitments) and the one write a miner makes
//! (`Commitments.set_commitment`, signed by the hotkey), over subxt's dynamic API and legacy RPCs.
//!
//! **API boundary:** only this module knows subxt. Everything is looked up by name in the metadata the node
//! serves, so one binary works against the devnet (spec 293) and finney (spec 393+).
//!
//! Choices (spec §4.2, §11): the metagraph comes from `NeuronInfoRuntimeApi.get_neurons_lite(netuid)` at the
//! block (what bittensor's `metagraph()` calls); stake is the sum of the neuron's alpha stake entries.
//! Commitments come from iterating `Commitments.CommitmentOf(netuid, *)`. Transactions are **mortal for 128
//! blocks** (like bittensor) and wait for finalization. Reads are retried with a reconnect on connection
//! errors and transient node errors (bounded, exponential backoff; each retry makes one connection
//! attempt, so `attempts` bounds the whole read); "state discarded" (a pruned node asked for an old block)
//! is an error, never a silent fall-back to the head. The head read is the exception to the backoff: the
//! scheduler polls it every second and must learn promptly that the chain is away (to follow the phase
//! from another source and to record what it cannot do), so its retries are at most 250 ms apart.
//! Writes are not retried here: a failed commit is reported with its reason and the caller decides
//! (within its phase).
//!
//! **Invariant:** two extrinsics of one hotkey never go into the same block: commits of a key are
//! serialized, and the next one waits for a head newer than the block that included the previous one.

mod commitments;
mod metagraph;
mod signer;
mod value;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use miner_keys::Hotkey;
use subxt::backend::legacy::{LegacyBackend, LegacyRpcMethods};
use subxt::backend::rpc::RpcClient;
use subxt::config::DefaultExtrinsicParamsBuilder;
use subxt::dynamic::Value;
use subxt::error::{DispatchError, RpcError};
use subxt::tx::TxStatus;
use subxt::utils::H256;
use subxt::{OnlineClient, PolkadotConfig};
use tokio::sync::{Mutex, RwLock};

pub use commitments::{Commitment, CommitmentData};
pub use metagraph::{Axon, Metagraph, Neuron};
pub use signer::HotkeySigner;

/// The on-chain limit of one `Data::RawN` field.
pub const MAX_COMMITMENT_BYTES: usize = 128;
/// Mortality of our transactions, in blocks (bittensor's `period=128`).
pub const TX_MORTALITY_BLOCKS: u64 = 128;

/// A chain endpoint by network name or URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `wss://entrypoint-finney.opentensor.ai:443` (lite; pruned state).
    Finney,
    /// `wss://test.finney.opentensor.ai:443`.
    Test,
    /// `wss://archive.chain.opentensor.ai:443` (historical reads).
    Archive,
    /// `ws://127.0.0.1:9944`.
    Local,
    /// A `ws://` or `wss://` URL.
    Url(String),
}

impl Endpoint {
    pub fn url(&self) -> &str {
        match self {
            Endpoint::Finney => "wss://entrypoint-finney.opentensor.ai:443",
            Endpoint::Test => "wss://test.finney.opentensor.ai:443",
            Endpoint::Archive => "wss://archive.chain.opentensor.ai:443",
            Endpoint::Local => "ws://127.0.0.1:9944",
            Endpoint::Url(u) => u,
        }
    }
}

impl FromStr for Endpoint {
    type Err = ChainError;

    fn from_str(s: &str) -> Result<Endpoint, ChainError> {
        match s.trim() {
            "finney" => Ok(Endpoint::Finney),
            "test" => Ok(Endpoint::Test),
            "archive" => Ok(Endpoint::Archive),
            "local" => Ok(Endpoint::Local),
            u if (u.starts_with("ws://") || u.starts_with("wss://")) && u.len() > 6 => {
                Ok(Endpoint::Url(u.to_owned()))
            }
            other => Err(ChainError::BadEndpoint(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.url())
    }
}

/// Errors of the chain client; each names the endpoint or the hotkey and what failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(
        "invalid chain endpoint {0:?}: expected finney, test, archive, local or a ws:// or wss:// URL"
    )]
    BadEndpoint(String),
    #[error("{what} at {url} failed after {attempts} attempts: {detail}")]
    Unavailable {
        url: String,
        what: String,
        attempts: u32,
        detail: String,
    },
    #[error("{what} at {url}: {detail}")]
    Rpc {
        url: String,
        what: String,
        detail: String,
    },
    #[error(
        "{what} at {url}: the node no longer has the state of block {block} (not an archive node); use the archive endpoint"
    )]
    StateDiscarded {
        url: String,
        what: String,
        block: u64,
    },
    #[error("block {block} does not exist at {url} (head is lower)")]
    NoSuchBlock { url: String, block: u64 },
    #[error("decode {what} from {url}: {detail}")]
    Decode {
        url: String,
        what: String,
        detail: String,
    },
    #[error("commitment of {len} bytes exceeds the {MAX_COMMITMENT_BYTES}-byte on-chain limit")]
    CommitTooLong { len: usize },
    #[error("commit by {hotkey} failed on chain in block {block}: {pallet}::{error}")]
    ExtrinsicFailed {
        hotkey: String,
        block: u64,
        pallet: String,
        error: String,
    },
    #[error("commit by {hotkey} was rejected by {url}: {reason}")]
    TxRejected {
        hotkey: String,
        url: String,
        reason: String,
    },
    #[error("commit by {hotkey} at {url}: {detail}")]
    TxUncertain {
        hotkey: String,
        url: String,
        detail: String,
    },
    #[error(
        "commit by {hotkey} was included in block {block} but storage there holds {found:?}, not what was sent"
    )]
    ReadBackMismatch {
        hotkey: String,
        block: u64,
        found: Option<String>,
    },
    #[error(
        "chain head at {url} stayed at block {head} for {waited:?} while waiting for a newer block"
    )]
    HeadStuck {
        url: String,
        head: u64,
        waited: Duration,
    },
}

/// Bounded retries with exponential backoff for reads and (re)connects.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total attempts (≥ 1).
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The same number of attempts with backoffs of at most 250 ms (for the head read).
    fn prompt(&self) -> RetryPolicy {
        let cap = Duration::from_millis(250);
        RetryPolicy {
            attempts: self.attempts,
            first_backoff: self.first_backoff.min(Duration::from_millis(100)),
            max_backoff: self.max_backoff.min(cap),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.first_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff)
    }
}

/// Proof that a commitment is on chain: the block that included it, where it reads back as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReceipt {
    pub block: u64,
    pub block_hash: H256,
    pub extrinsic_hash: H256,
}

/// One websocket connection: subxt's client and the legacy RPC methods over the same socket.
#[derive(Clone)]
struct Conn {
    api: OnlineClient<PolkadotConfig>,
    rpc: LegacyRpcMethods<PolkadotConfig>,
}

async fn open(url: &str) -> Result<Conn, subxt::Error> {
    let rpc_client = if url.starts_with("ws://") {
        RpcClient::from_insecure_url(url).await?
    } else {
        RpcClient::from_url(url).await?
    };
    let backend = LegacyBackend::<PolkadotConfig>::builder().build(rpc_client.clone());
    let api = OnlineClient::<PolkadotConfig>::from_backend(Arc::new(backend)).await?;
    Ok(Conn {
        api,
        rpc: LegacyRpcMethods::new(rpc_client),
    })
}

/// How a failed call should be handled.
enum Failure {
    /// The connection is gone or the node hiccuped: reconnect and retry.
    Transient(String),
    /// Retrying will not help.
    Fatal(ChainError),
}

fn is_connection_error(e: &subxt::Error) -> bool {
    use subxt::ext::subxt_rpcs::Error as Rpcs;
    match e {
        subxt::Error::Io(_) => true,
        subxt::Error::Rpc(RpcError::SubscriptionDropped) => true,
        subxt::Error::Rpc(RpcError::ClientError(Rpcs::Client(_)))
        | subxt::Error::Rpc(RpcError::ClientError(Rpcs::DisconnectedWillReconnect(_))) => true,
        // The node answered with a JSON-RPC error: only its internal errors are worth a retry.
        subxt::Error::Rpc(RpcError::ClientError(Rpcs::User(u))) => {
            u.code == -32603 || u.message.contains("Internal error")
        }
        _ => false,
    }
}

/// The node's JSON-RPC error object, if the failure is one.
fn user_error(e: &subxt::Error) -> Option<&subxt::ext::subxt_rpcs::UserError> {
    match e {
        subxt::Error::Rpc(RpcError::ClientError(subxt::ext::subxt_rpcs::Error::User(u))) => Some(u),
        _ => None,
    }
}

/// An error's text including the JSON-RPC error's `data` (where nodes put the actual reason, e.g. why a
/// transaction is invalid), which subxt's `Display` leaves out.
fn error_text(e: &subxt::Error) -> String {
    match user_error(e).and_then(|u| u.data.as_ref()) {
        Some(data) => format!("{e}: {}", data.get()),
        None => e.to_string(),
    }
}

fn is_state_discarded(e: &subxt::Error) -> bool {
    let s = error_text(e);
    s.contains("State discarded")
        || s.contains("state discarded")
        || s.contains("State already discarded")
        || s.contains("UnknownBlock")
}

/// Sorts a failed read into retry-after-reconnect or give-up (with its typed error).
fn classify(url: &str, what: &str, block: Option<u64>, e: subxt::Error) -> Failure {
    if is_state_discarded(&e)
        && let Some(block) = block
    {
        return Failure::Fatal(ChainError::StateDiscarded {
            url: url.to_owned(),
            what: what.to_owned(),
            block,
        });
    }
    if is_connection_error(&e) {
        Failure::Transient(error_text(&e))
    } else {
        Failure::Fatal(ChainError::Rpc {
            url: url.to_owned(),
            what: what.to_owned(),
            detail: error_text(&e),
        })
    }
}

/// A hotkey's submission lock, holding the block that included its last extrinsic.
type KeySlot = Arc<Mutex<Option<u64>>>;

/// The chain client. Cheap to share behind an `Arc`; calls may run concurrently.
pub struct ChainClient {
    url: String,
    /// The live connection and its generation; replaced by `reconnect`.
    conn: RwLock<(u64, Conn)>,
    /// Serializes reconnects so concurrent failures open one new connection.
    reconnecting: Mutex<()>,
    retry: RetryPolicy,
    /// How long a commit may take from submission to a finalized, verified inclusion.
    tx_timeout: Duration,
    /// Per hotkey: a lock serializing its extrinsics, holding the block of its last inclusion.
    last_inclusion: Mutex<HashMap<[u8; 32], KeySlot>>,
}

impl std::fmt::Debug for ChainClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainClient")
            .field("url", &self.url)
            .finish()
    }
}

impl ChainClient {
    /// Connects (retrying per the default policy).
    pub async fn connect(endpoint: &Endpoint) -> Result<ChainClient, ChainError> {
        ChainClient::connect_with(endpoint, RetryPolicy::default()).await
    }

    /// Connects with a given retry policy.
    pub async fn connect_with(
        endpoint: &Endpoint,
        retry: RetryPolicy,
    ) -> Result<ChainClient, ChainError> {
        let url = endpoint.url().to_owned();
        let conn = connect_retrying(&url, retry).await?;
        Ok(ChainClient {
            url,
            conn: RwLock::new((0, conn)),
            reconnecting: Mutex::new(()),
            retry,
            tx_timeout: Duration::from_secs(120),
            last_inclusion: Mutex::new(HashMap::new()),
        })
    }

    /// Sets how long a commit may take until it is finalized and verified (default 120 s).
    pub fn with_tx_timeout(mut self, timeout: Duration) -> Self {
        self.tx_timeout = timeout;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn current(&self) -> (u64, Conn) {
        let g = self.conn.read().await;
        (g.0, g.1.clone())
    }

    async fn reconnect(&self, seen_generation: u64) -> Result<(), ChainError> {
        let _one = self.reconnecting.lock().await;
        if self.conn.read().await.0 != seen_generation {
            return Ok(()); // someone else already reconnected
        }
        // One attempt: the caller's retry loop is the retry (no nested backoff).
        let fresh = connect_retrying(
            &self.url,
            RetryPolicy {
                attempts: 1,
                ..self.retry
            },
        )
        .await?;
        let mut g = self.conn.write().await;
        *g = (seen_generation + 1, fresh);
        tracing::info!(url = %self.url, "reconnected to the chain");
        Ok(())
    }

    /// Runs a read with reconnect-and-retry on transient failures.
    async fn read<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ChainError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.read_with(self.retry, what, op).await
    }

    /// [`ChainClient::read`] under another retry policy.
    async fn read_with<T, F, Fut>(
        &self,
        retry: RetryPolicy,
        what: &str,
        op: F,
    ) -> Result<T, ChainError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempts = retry.attempts.max(1);
        let mut last = String::new();
        for attempt in 0..attempts {
            let (generation, conn) = self.current().await;
            match op(conn).await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(detail)) => {
                    tracing::warn!(url = %self.url, what, attempt = attempt + 1, %detail, "chain read failed; reconnecting");
                    last = detail;
                    if attempt + 1 < attempts {
                        tokio::time::sleep(retry.backoff(attempt)).await;
                        if let Err(e) = self.reconnect(generation).await {
                            last = e.to_string();
                        }
                    }
                }
            }
        }
        Err(ChainError::Unavailable {
            url: self.url.clone(),
            what: what.to_owned(),
            attempts,
            detail: last,
        })
    }

    fn classify(&self, what: &str, block: Option<u64>, e: subxt::Error) -> Failure {
        classify(&self.url, what, block, e)
    }

    /// The best block number (`chain_getHeader`). Retried and reconnected like every read, but
    /// with backoffs of at most 250 ms: a caller polling the head learns within about a second
    /// that the chain is away.
    pub async fn head(&self) -> Result<u64, ChainError> {
        self.read_with(self.retry.prompt(), "read the head block", |c| async move {
            match c.rpc.chain_get_header(None).await {
                Ok(Some(h)) => Ok(u64::from(h.number)),
                Ok(None) => Err(Failure::Transient("node returned no header".into())),
                Err(e) => Err(self.classify("read the head block", None, e.into())),
            }
        })
        .await
    }

    /// The hash of block `number` (`chain_getBlockHash`).
    pub async fn block_hash(&self, number: u64) -> Result<H256, ChainError> {
        self.read("read a block hash", |c| async move {
            self.hash_on(&c, number).await
        })
        .await
    }

    async fn hash_on(&self, c: &Conn, number: u64) -> Result<H256, Failure> {
        match c
            .rpc
            .chain_get_block_hash(Some(
                subxt::backend::legacy::rpc_methods::BlockNumber::from(number),
            ))
            .await
        {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Err(Failure::Fatal(ChainError::NoSuchBlock {
                url: self.url.clone(),
                block: number,
            })),
            Err(e) => Err(self.classify("read a block hash", Some(number), e.into())),
        }
    }

    /// The metagraph of `netuid` as of `block` (the head when `None`).
    pub async fn metagraph(
        &self,
        netuid: u16,
        block: Option<u64>,
    ) -> Result<Metagraph, ChainError> {
        let what = "read the metagraph";
        self.read(what, |c| async move {
            let number = match block {
                Some(n) => n,
                None => match c.rpc.chain_get_header(None).await {
                    Ok(Some(h)) => u64::from(h.number),
                    Ok(None) => return Err(Failure::Transient("node returned no header".into())),
                    Err(e) => return Err(self.classify(what, None, e.into())),
                },
            };
            let hash = self.hash_on(&c, number).await?;
            let call = subxt::dynamic::runtime_api_call(
                "NeuronInfoRuntimeApi",
                "get_neurons_lite",
                vec![Value::u128(u128::from(netuid))],
            );
            let out = c
                .api
                .runtime_api()
                .at(hash)
                .call(call)
                .await
                .map_err(|e| self.classify(what, Some(number), e))?;
            let value = out.to_value().map_err(|e| {
                Failure::Fatal(self.decode_err("NeuronInfoRuntimeApi.get_neurons_lite", e))
            })?;
            let list = value::seq(&value)
                .ok_or_else(|| Failure::Fatal(self.decode_err("get_neurons_lite", "not a list")))?;
            let mut neurons = Vec::with_capacity(list.len());
            for n in list {
                neurons.push(
                    metagraph::neuron_from_value(n)
                        .map_err(|e| Failure::Fatal(self.decode_err("a NeuronInfoLite", e)))?,
                );
            }
            neurons.sort_by_key(|n| n.uid);
            Ok(Metagraph {
                netuid,
                block: number,
                neurons,
            })
        })
        .await
    }

    fn decode_err(&self, what: &str, detail: impl std::fmt::Display) -> ChainError {
        ChainError::Decode {
            url: self.url.clone(),
            what: what.to_owned(),
            detail: detail.to_string(),
        }
    }

    /// All commitments of `netuid` in the state after block `block`, in storage-key order.
    /// Entries that are not raw bytes (or do not decode) are kept as such, never an error.
    pub async fn commitments(
        &self,
        netuid: u16,
        block: u64,
    ) -> Result<Vec<Commitment>, ChainError> {
        let what = "read the commitments";
        self.read(what, |c| async move {
            let hash = self.hash_on(&c, block).await?;
            let addr = subxt::dynamic::storage(
                "Commitments",
                "CommitmentOf",
                vec![Value::u128(u128::from(netuid))],
            );
            let storage = c.api.storage().at(hash);
            let mut it = storage
                .iter(addr)
                .await
                .map_err(|e| self.classify(what, Some(block), e))?;
            let mut out = Vec::new();
            while let Some(kv) = it.next().await {
                let kv = kv.map_err(|e| self.classify(what, Some(block), e))?;
                // CommitmentOf's hotkey hasher is Twox64Concat: the account id ends the key.
                let Some(tail) = kv
                    .key_bytes
                    .len()
                    .checked_sub(32)
                    .map(|s| &kv.key_bytes[s..])
                else {
                    continue;
                };
                let mut public = [0u8; 32];
                public.copy_from_slice(tail);
                let (reg_block, data) = match kv.value.to_value() {
                    Ok(v) => commitments::registration_from_value(&v),
                    Err(e) => (None, CommitmentData::Undecodable(e.to_string())),
                };
                out.push(Commitment {
                    hotkey: miner_keys::ss58_encode(&public),
                    hotkey_public: public,
                    block: reg_block,
                    data,
                });
            }
            Ok(out)
        })
        .await
    }

    /// One hotkey's commitment at a block hash (`None` if it has none).
    async fn commitment_at(
        &self,
        c: &Conn,
        netuid: u16,
        public: [u8; 32],
        hash: H256,
    ) -> Result<Option<CommitmentData>, subxt::Error> {
        let addr = subxt::dynamic::storage(
            "Commitments",
            "CommitmentOf",
            vec![Value::u128(u128::from(netuid)), Value::from_bytes(public)],
        );
        let Some(thunk) = c.api.storage().at(hash).fetch(&addr).await? else {
            return Ok(None);
        };
        Ok(Some(match thunk.to_value() {
            Ok(v) => commitments::registration_from_value(&v).1,
            Err(e) => CommitmentData::Undecodable(e.to_string()),
        }))
    }

    /// Commits `data` (≤ 128 bytes) for `netuid`, signed by `hotkey`. Returns once the extrinsic is in a
    /// finalized block with `ExtrinsicSuccess` and the storage at that block holds exactly `data`.
    pub async fn set_commitment(
        &self,
        hotkey: &Hotkey,
        netuid: u16,
        data: &[u8],
    ) -> Result<CommitReceipt, ChainError> {
        if data.len() > MAX_COMMITMENT_BYTES {
            return Err(ChainError::CommitTooLong { len: data.len() });
        }
        let slot = {
            let mut map = self.last_inclusion.lock().await;
            map.entry(hotkey.public()).or_default().clone()
        };
        let mut last = slot.lock().await;
        let deadline = Instant::now() + self.tx_timeout;
        // Also a health check: a dropped connection is re-established here, before the write.
        let head = self.head().await?;
        if let Some(prev) = *last
            && head <= prev
        {
            self.wait_for_head_above(prev, deadline).await?;
        }
        let receipt = self.submit_commitment(hotkey, netuid, data, deadline).await;
        // A failed extrinsic was still included (and used its nonce) in that block.
        match &receipt {
            Ok(CommitReceipt { block, .. })
            | Err(ChainError::ExtrinsicFailed { block, .. })
            | Err(ChainError::ReadBackMismatch { block, .. }) => *last = Some(*block),
            Err(_) => {}
        }
        receipt
    }

    async fn wait_for_head_above(&self, block: u64, deadline: Instant) -> Result<(), ChainError> {
        let start = Instant::now();
        loop {
            let head = self.head().await?;
            if head > block {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ChainError::HeadStuck {
                    url: self.url.clone(),
                    head,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn submit_commitment(
        &self,
        hotkey: &Hotkey,
        netuid: u16,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CommitReceipt, ChainError> {
        let who = hotkey.ss58().to_owned();
        let uncertain = |detail: String| ChainError::TxUncertain {
            hotkey: who.clone(),
            url: self.url.clone(),
            detail,
        };
        let (_, c) = self.current().await;
        let call = subxt::dynamic::tx(
            "Commitments",
            "set_commitment",
            vec![
                Value::u128(u128::from(netuid)),
                commitments::commitment_info_value(data),
            ],
        );
        let params = DefaultExtrinsicParamsBuilder::<PolkadotConfig>::new()
            .mortal(TX_MORTALITY_BLOCKS)
            .build();
        let signer = HotkeySigner::new(hotkey);
        let mut progress = match c
            .api
            .tx()
            .sign_and_submit_then_watch(&call, &signer, params)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                return Err(if is_connection_error(&e) {
                    uncertain(format!("submit: {}", error_text(&e)))
                } else {
                    ChainError::TxRejected {
                        hotkey: who.clone(),
                        url: self.url.clone(),
                        reason: error_text(&e),
                    }
                });
            }
        };
        let extrinsic_hash = progress.extrinsic_hash();
        let in_block = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(remaining, progress.next()).await {
                Err(_) => {
                    return Err(uncertain(format!(
                        "not finalized within {:?} (extrinsic {extrinsic_hash:?})",
                        self.tx_timeout
                    )));
                }
                Ok(None) => {
                    return Err(uncertain(format!(
                        "the node stopped reporting the extrinsic's status (extrinsic {extrinsic_hash:?})"
                    )));
                }
                Ok(Some(Err(e))) => return Err(uncertain(format!("watch: {e}"))),
                Ok(Some(Ok(s))) => s,
            };
            match status {
                TxStatus::InFinalizedBlock(b) => break b,
                TxStatus::Invalid { message }
                | TxStatus::Dropped { message }
                | TxStatus::Error { message } => {
                    return Err(ChainError::TxRejected {
                        hotkey: who.clone(),
                        url: self.url.clone(),
                        reason: message,
                    });
                }
                _ => continue,
            }
        };
        let block_hash = in_block.block_hash();
        let block = match c.rpc.chain_get_header(Some(block_hash)).await {
            Ok(Some(h)) => u64::from(h.number),
            Ok(None) => return Err(uncertain(format!("block {block_hash:?} has no header"))),
            Err(e) => return Err(uncertain(format!("read the inclusion block: {e}"))),
        };
        match in_block.wait_for_success().await {
            Ok(events) => {
                let success = events.iter().any(|ev| {
                    ev.map(|ev| {
                        ev.pallet_name() == "System" && ev.variant_name() == "ExtrinsicSuccess"
                    })
                    .unwrap_or(false)
                });
                if !success {
                    return Err(uncertain(format!(
                        "no ExtrinsicSuccess event for the extrinsic in block {block}"
                    )));
                }
            }
            Err(subxt::Error::Runtime(d)) => {
                let (pallet, error) = dispatch_error_name(&d);
                return Err(ChainError::ExtrinsicFailed {
                    hotkey: who,
                    block,
                    pallet,
                    error,
                });
            }
            Err(e) => return Err(uncertain(format!("read the extrinsic's events: {e}"))),
        }
        let found = self
            .commitment_at(&c, netuid, hotkey.public(), block_hash)
            .await
            .map_err(|e| uncertain(format!("read the commitment back: {e}")))?;
        match found {
            Some(CommitmentData::Raw(b)) if b == data => Ok(CommitReceipt {
                block,
                block_hash,
                extrinsic_hash,
            }),
            other => Err(ChainError::ReadBackMismatch {
                hotkey: who,
                block,
                found: other.map(|d| match d {
                    CommitmentData::Raw(b) => String::from_utf8_lossy(&b).into_owned(),
                    d => format!("{d:?}"),
                }),
            }),
        }
    }
}

/// `(pallet, error)` names of a dispatch error.
fn dispatch_error_name(d: &DispatchError) -> (String, String) {
    match d {
        DispatchError::Module(m) => match m.details() {
            Ok(det) => (det.pallet.name().to_owned(), det.variant.name.clone()),
            Err(_) => ("unknown pallet".to_owned(), m.details_string()),
        },
        other => ("System".to_owned(), format!("{other:?}")),
    }
}

async fn connect_retrying(url: &str, retry: RetryPolicy) -> Result<Conn, ChainError> {
    let attempts = retry.attempts.max(1);
    let mut last = String::new();
    for attempt in 0..attempts {
        match open(url).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                last = e.to_string();
                tracing::warn!(url, attempt = attempt + 1, error = %last, "connect to the chain failed");
                if attempt + 1 < attempts {
                    tokio::time::sleep(retry.backoff(attempt)).await;
                }
            }
        }
    }
    Err(ChainError::Unavailable {
        url: url.to_owned(),
        what: "connect".to_owned(),
        attempts,
        detail: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use subxt::ext::subxt_rpcs::{Error as Rpcs, UserError};

    fn user(code: i32, message: &str, data: Option<&str>) -> subxt::Error {
        subxt::Error::Rpc(RpcError::ClientError(Rpcs::User(UserError {
            code,
            message: message.to_owned(),
            data: data.map(|d| serde_json::value::RawValue::from_string(d.to_owned()).unwrap()),
        })))
    }

    #[test]
    fn pruned_state_is_a_typed_error_not_a_retry() {
        let e = user(
            4003,
            "Client error",
            Some(r#""UnknownBlock: State already discarded for 0xab""#),
        );
        match classify("wss://node", "read the commitments", Some(7), e) {
            Failure::Fatal(ChainError::StateDiscarded { block: 7, url, .. }) => {
                assert_eq!(url, "wss://node")
            }
            Failure::Fatal(other) => panic!("{other}"),
            Failure::Transient(t) => panic!("transient {t}"),
        }
    }

    #[test]
    fn internal_errors_and_lost_connections_are_retried() {
        assert!(matches!(
            classify("u", "w", None, user(-32603, "Internal error", None)),
            Failure::Transient(_)
        ));
        let lost = subxt::Error::Rpc(RpcError::ClientError(Rpcs::Client(Box::new(
            std::io::Error::other("connection reset"),
        ))));
        assert!(matches!(
            classify("u", "w", None, lost),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(
                "u",
                "w",
                None,
                subxt::Error::Rpc(RpcError::SubscriptionDropped)
            ),
            Failure::Transient(_)
        ));
    }

    #[test]
    fn other_node_errors_carry_their_data() {
        let e = user(
            1010,
            "Invalid Transaction",
            Some(r#""Inability to pay some fees""#),
        );
        match classify("u", "submit", None, e) {
            Failure::Fatal(err) => {
                let text = err.to_string();
                assert!(
                    text.contains("Invalid Transaction") && text.contains("Inability to pay"),
                    "{text}"
                );
            }
            Failure::Transient(t) => panic!("transient {t}"),
        }
    }

    #[test]
    fn the_head_read_retries_as_often_but_promptly() {
        let p = RetryPolicy::default().prompt();
        assert_eq!(p.attempts, RetryPolicy::default().attempts);
        let total: Duration = (0..p.attempts - 1).map(|a| p.backoff(a)).sum();
        assert!(total <= Duration::from_secs(1), "{total:?}");
    }

    #[test]
    fn retry_backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        let got: Vec<u128> = (0..4).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
    }
}
