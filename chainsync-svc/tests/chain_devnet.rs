//! The chain client against the real devnet (subtensor spec-293 runtime under chopsticks, `shared/devnet`).
//! One devnet per test binary (`miner_devnet::shared`), tests serialized, a ticker building a block every
//! 1.5 s (the devnet builds blocks only on a transaction or on request).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chainsync_svc::chain::{ChainClient, ChainError, CommitmentData, Endpoint, RetryPolicy};
use miner_devnet::{BlockTicker, Devnet};
use miner_keys::Hotkey;
use serde_json::json;
use subxt::dynamic::Value;
use subxt::ext::scale_encode::EncodeAsType;
use subxt::{OnlineClient, PolkadotConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const NETUID: u16 = 102;
const UID0_HOTKEY: &str = "5FEc1TfRxmvKbMwQ8UpbszLa2AdXzTbcjK1ACXQBrhgGA9EF";
const BOB: &str = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty";
const CHARLIE: &str = "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y";
const COLDKEY: &str = "5GeiR6w3ad5JxpwdUS3ADPLexL5SDrbav3k8J5D7WfHTh1Q5";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static TICKER: OnceLock<BlockTicker> = OnceLock::new();

fn devnet() -> &'static Devnet {
    let d = miner_devnet::shared();
    TICKER.get_or_init(|| d.start_ticker(Duration::from_millis(1500)));
    d
}

fn example_wallet() -> PathBuf {
    miner_devnet::kit_dir()
        .expect("shared/devnet")
        .join("data/example_wallet")
}

fn uid0_hotkey() -> Hotkey {
    Hotkey::load(&example_wallet(), "miners", "miner_1", None)
        .expect("load the example wallet's hotkey")
}

async fn client(d: &Devnet) -> ChainClient {
    ChainClient::connect(&Endpoint::Url(d.ws_url()))
        .await
        .expect("connect to the devnet")
        .with_tx_timeout(Duration::from_secs(30))
}

#[tokio::test]
async fn head_and_block_hashes() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let c = client(d).await;
    let head = c.head().await.unwrap();
    assert!(head >= 1, "head {head}");
    let h1 = c.block_hash(head).await.unwrap();
    let h0 = c.block_hash(0).await.unwrap();
    assert_ne!(h0, h1);
    let err = c.block_hash(head + 1_000_000).await.unwrap_err();
    assert!(matches!(err, ChainError::NoSuchBlock { .. }), "{err}");
    assert!(err.to_string().contains(&d.ws_url()), "{err}");
    // The head moves as the ticker builds blocks.
    let start = Instant::now();
    while c.head().await.unwrap() <= head {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "head did not move"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metagraph_of_netuid_102_matches_the_seed() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let c = client(d).await;
    let mg = c.metagraph(NETUID, None).await.unwrap();
    assert_eq!(mg.netuid, NETUID);
    assert_eq!(mg.neurons.len(), 3, "{mg:?}");
    let n0 = mg.by_uid(0).unwrap();
    assert_eq!(n0.hotkey, UID0_HOTKEY);
    assert_eq!(n0.coldkey, COLDKEY);
    assert_eq!(n0.axon.ip.to_string(), "127.0.0.1");
    assert_eq!(n0.axon.port, 8091);
    assert!(n0.validator_permit);
    assert_eq!(n0.stake_rao, 5_000_000_000_000);
    assert_eq!(n0.stake(), 5000.0);
    let n1 = mg.by_hotkey(BOB).unwrap();
    assert_eq!((n1.uid, n1.axon.port, n1.validator_permit), (1, 8092, true));
    assert_eq!(n1.stake_rao, 2_000_000_000_000);
    let n2 = mg.by_hotkey(CHARLIE).unwrap();
    assert_eq!(n2.uid, 2);
    assert!(!n2.validator_permit);
    assert!(!n2.axon.is_served(), "{:?}", n2.axon);
    assert_eq!(n2.stake_rao, 1_000_000_000);
    // At a past block too (genesis state already has the seed).
    let past = c.metagraph(NETUID, Some(1)).await.unwrap();
    assert_eq!(past.block, 1);
    assert_eq!(past.neurons.len(), 3);
    // An unknown subnet has no neurons.
    assert!(c.metagraph(4000, None).await.unwrap().neurons.is_empty());
}

/// The miner's two commits: MinerCommit1 `{"m":sig}`, then MinerCommit2 `{"e","h","v"}`; validators read
/// the first at `MinerCommit1.end + 1` and must still see it after the second overwrote it.
#[tokio::test]
async fn commits_are_included_read_back_and_kept_in_history() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let c = client(d).await;
    let key = uid0_hotkey();
    let model_hash = "a1f3a4babc0e24a94158be35977d2dacaa767a35fc0ed159";
    let sig = miner_keys::b64url_nopad_encode(&key.sign(model_hash.as_bytes()));
    let commit1 = format!(r#"{{"m":"{sig}"}}"#);
    assert_eq!(commit1.len(), 94);
    let before = c.head().await.unwrap();

    let t = Instant::now();
    let r1 = c
        .set_commitment(&key, NETUID, commit1.as_bytes())
        .await
        .unwrap();
    eprintln!(
        "commit 1 included, finalized and read back in {:?}",
        t.elapsed()
    );
    assert!(
        r1.block > before,
        "included in {} after head {before}",
        r1.block
    );
    assert_eq!(c.block_hash(r1.block).await.unwrap(), r1.block_hash);

    let commit2 = format!(r#"{{"e":0,"h":"{model_hash}","v":8081320}}"#);
    let r2 = c
        .set_commitment(&key, NETUID, commit2.as_bytes())
        .await
        .unwrap();
    assert!(
        r2.block > r1.block,
        "second commit in {} not after {}",
        r2.block,
        r1.block
    );

    // At the first commit's block: the signature commit, verifiable against the hotkey (what a validator does).
    let at1 = c.commitments(NETUID, r1.block).await.unwrap();
    let mine = at1
        .iter()
        .find(|x| x.hotkey == UID0_HOTKEY)
        .expect("our commitment at block 1");
    assert_eq!(mine.text(), Some(commit1.as_str()));
    assert_eq!(mine.block, Some(r1.block));
    let v: serde_json::Value = serde_json::from_str(mine.text().unwrap()).unwrap();
    let sig_bytes = miner_keys::b64url_nopad_decode(v["m"].as_str().unwrap()).unwrap();
    let sig_arr: [u8; 64] = sig_bytes.try_into().unwrap();
    assert!(miner_keys::verify(
        &mine.hotkey_public,
        model_hash.as_bytes(),
        &sig_arr
    ));

    // At the second commit's block (and at the head): overwritten.
    for block in [r2.block, c.head().await.unwrap()] {
        let now = c.commitments(NETUID, block).await.unwrap();
        let mine = now.iter().find(|x| x.hotkey == UID0_HOTKEY).unwrap();
        assert_eq!(mine.text(), Some(commit2.as_str()), "at block {block}");
    }
    // Two commits of one key at once: serialized into two different blocks, both verified.
    let t = Instant::now();
    let (a, b) = tokio::join!(
        c.set_commitment(&key, NETUID, br#"{"m":"a"}"#),
        c.set_commitment(&key, NETUID, br#"{"m":"b"}"#)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.block, b.block);
    eprintln!("two serialized commits took {:?}", t.elapsed());
    // Before the first commit of this test, not the first commit.
    let earlier = c.commitments(NETUID, before).await.unwrap();
    assert!(
        earlier
            .iter()
            .all(|x| x.hotkey != UID0_HOTKEY || x.text() != Some(commit1.as_str())),
        "{earlier:?}"
    );
}

#[tokio::test]
async fn commit_from_a_hotkey_without_a_uid_is_reported_as_a_failure() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let dave = Hotkey::from_uri("//Dave").unwrap();
    // Fund it so the fee is paid and the call itself is dispatched.
    d.set_storage(json!({"System": {"Account": [[[dave.ss58()], {"providers": 1, "data": {"free": "1000000000000"}}]]}}))
        .unwrap();
    let c = client(d).await;
    let err = c
        .set_commitment(&dave, NETUID, br#"{"m":"x"}"#)
        .await
        .unwrap_err();
    match &err {
        ChainError::ExtrinsicFailed {
            pallet,
            error,
            hotkey,
            ..
        } => {
            assert_eq!(
                (pallet.as_str(), error.as_str()),
                ("Commitments", "AccountNotAllowedCommit")
            );
            assert_eq!(hotkey, dave.ss58());
        }
        other => panic!("expected ExtrinsicFailed(AccountNotAllowedCommit), got {other}"),
    }
    assert!(err.to_string().contains("AccountNotAllowedCommit"), "{err}");
    let head = c.head().await.unwrap();
    let all = c.commitments(NETUID, head).await.unwrap();
    assert!(all.iter().all(|x| x.hotkey != dave.ss58()));

    // Too long: refused before anything is sent.
    let key = uid0_hotkey();
    let err = c
        .set_commitment(&key, NETUID, &[b'x'; 129])
        .await
        .unwrap_err();
    assert!(
        matches!(err, ChainError::CommitTooLong { len: 129 }),
        "{err}"
    );
}

/// Seeds `Commitments.CommitmentOf(102, who)` with raw SCALE bytes (via `dev_setStorage` key/value pairs).
async fn seed_commitment(
    d: &Devnet,
    api: &OnlineClient<PolkadotConfig>,
    who: &Hotkey,
    value: Option<Value>,
    raw: Option<&[u8]>,
) {
    let addr = subxt::dynamic::storage(
        "Commitments",
        "CommitmentOf",
        vec![
            Value::u128(u128::from(NETUID)),
            Value::from_bytes(who.public()),
        ],
    );
    let key = api.storage().address_bytes(&addr).unwrap();
    let bytes = match (value, raw) {
        (Some(v), _) => {
            let md = api.metadata();
            let entry = md
                .pallet_by_name("Commitments")
                .unwrap()
                .storage()
                .unwrap()
                .entry_by_name("CommitmentOf")
                .unwrap();
            let mut out = Vec::new();
            v.encode_as_type_to(entry.entry_type().value_ty(), md.types(), &mut out)
                .unwrap();
            out
        }
        (None, Some(r)) => r.to_vec(),
        (None, None) => unreachable!(),
    };
    d.set_storage(json!([[
        format!("0x{}", hex::encode(key)),
        format!("0x{}", hex::encode(bytes))
    ]]))
    .unwrap();
}

fn registration(block: u128, data: Value) -> Value {
    Value::named_composite([
        ("deposit", Value::u128(0)),
        ("block", Value::u128(block)),
        (
            "info",
            Value::named_composite([("fields", Value::unnamed_composite([data]))]),
        ),
    ])
}

#[tokio::test]
async fn garbage_commitments_of_other_neurons_are_tolerated() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let api = OnlineClient::<PolkadotConfig>::from_insecure_url(d.ws_url())
        .await
        .unwrap();
    let bob = Hotkey::from_uri("//Bob").unwrap();
    let charlie = Hotkey::from_uri("//Charlie").unwrap();
    let eve = Hotkey::from_uri("//Eve").unwrap();
    let ferdie = Hotkey::from_uri("//Ferdie").unwrap();
    let not_utf8 = [0xffu8, 0xfe, 0x00, 0x80];
    seed_commitment(
        d,
        &api,
        &bob,
        Some(registration(
            3,
            Value::variant(
                "Raw4",
                subxt::ext::scale_value::Composite::unnamed([Value::from_bytes(not_utf8)]),
            ),
        )),
        None,
    )
    .await;
    seed_commitment(
        d,
        &api,
        &charlie,
        Some(registration(
            3,
            Value::variant(
                "Sha256",
                subxt::ext::scale_value::Composite::unnamed([Value::from_bytes([7u8; 32])]),
            ),
        )),
        None,
    )
    .await;
    seed_commitment(d, &api, &eve, None, Some(&[0xde, 0xad])).await;
    seed_commitment(
        d,
        &api,
        &ferdie,
        Some(registration(
            3,
            Value::variant(
                "Raw8",
                subxt::ext::scale_value::Composite::unnamed([Value::from_bytes(*b"not json")]),
            ),
        )),
        None,
    )
    .await;
    d.new_blocks(1).unwrap();

    let c = client(d).await;
    let head = c.head().await.unwrap();
    let all = c.commitments(NETUID, head).await.unwrap();
    let of = |k: &Hotkey| {
        all.iter()
            .find(|x| x.hotkey == k.ss58())
            .unwrap_or_else(|| panic!("{} missing in {all:?}", k.ss58()))
    };
    assert_eq!(of(&bob).data, CommitmentData::Raw(not_utf8.to_vec()));
    assert_eq!(of(&bob).text(), None);
    assert_eq!(of(&charlie).data, CommitmentData::Other("Sha256".into()));
    assert!(
        matches!(of(&eve).data, CommitmentData::Undecodable(_)),
        "{:?}",
        of(&eve)
    );
    assert_eq!(of(&ferdie).text(), Some("not json"));
    // Our own commit still works next to them.
    let key = uid0_hotkey();
    let r = c
        .set_commitment(&key, NETUID, br#"{"m":"after-garbage"}"#)
        .await
        .unwrap();
    let at = c.commitments(NETUID, r.block).await.unwrap();
    assert_eq!(
        at.iter().find(|x| x.hotkey == UID0_HOTKEY).unwrap().text(),
        Some(r#"{"m":"after-garbage"}"#)
    );
}

/// A TCP relay standing in for the network path to the node, so the connection can be cut and restored.
struct NetworkPath {
    task: tokio::task::JoinHandle<()>,
}

impl NetworkPath {
    async fn open(listen: u16, node: u16) -> NetworkPath {
        let listener = TcpListener::bind(("127.0.0.1", listen)).await.unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", node)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        let _ = outbound.shutdown().await;
                    }
                });
            }
        });
        NetworkPath { task }
    }

    /// Cuts every connection and stops listening.
    fn cut(self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn dropped_connection_gives_a_clear_error_and_reconnects() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let port = miner_devnet::free_port().unwrap();
    let url = format!("ws://127.0.0.1:{port}");
    let path = NetworkPath::open(port, d.port()).await;
    let retry = RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
    };
    let c = ChainClient::connect_with(&Endpoint::Url(url.clone()), retry)
        .await
        .unwrap();
    let head = c.head().await.unwrap();
    path.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let err = c.head().await.unwrap_err();
    assert!(
        matches!(err, ChainError::Unavailable { attempts: 3, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("read the head block") && text.contains(&url),
        "{text}"
    );

    // The path comes back: the same client reconnects on its next call.
    let path = NetworkPath::open(port, d.port()).await;
    let again = c.head().await.unwrap();
    assert!(again >= head);
    let mg = c.metagraph(NETUID, None).await.unwrap();
    assert_eq!(mg.neurons.len(), 3);
    path.cut();

    // Nothing listening at all: connect fails with the endpoint named.
    let closed = miner_devnet::free_port().unwrap();
    let err = ChainClient::connect_with(&Endpoint::Url(format!("ws://127.0.0.1:{closed}")), retry)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "connect at ws://127.0.0.1:{closed} failed after 3 attempts"
        )),
        "{err}"
    );
}

#[test]
fn endpoints_parse_by_name_or_url() {
    assert_eq!(
        "finney".parse::<Endpoint>().unwrap().url(),
        "wss://entrypoint-finney.opentensor.ai:443"
    );
    assert_eq!(
        "archive".parse::<Endpoint>().unwrap().url(),
        "wss://archive.chain.opentensor.ai:443"
    );
    assert_eq!(
        "test".parse::<Endpoint>().unwrap().url(),
        "wss://test.finney.opentensor.ai:443"
    );
    assert_eq!(
        "local".parse::<Endpoint>().unwrap().url(),
        "ws://127.0.0.1:9944"
    );
    assert_eq!(
        "ws://10.0.0.1:9944".parse::<Endpoint>().unwrap().url(),
        "ws://10.0.0.1:9944"
    );
    let err = "mainnet".parse::<Endpoint>().unwrap_err();
    assert!(err.to_string().contains("\"mainnet\""), "{err}");
}

/// A test can register its own neuron (another subnet here, so netuid 102 keeps its three) and commit with it.
#[tokio::test]
async fn a_seeded_neuron_shows_in_the_metagraph_and_can_commit() {
    let _serial = SERIAL.lock().await;
    let d = devnet();
    let key = Hotkey::from_uri("//SeededMiner").unwrap();
    d.seed_neuron(&miner_devnet::NeuronSeed {
        netuid: 103,
        uid: 0,
        hotkey: key.ss58(),
        coldkey: COLDKEY,
        axon: Some((std::net::Ipv4Addr::new(127, 0, 0, 1), 9100)),
        alpha_stake: 7_000_000_000,
    })
    .unwrap();
    let c = client(d).await;
    let mg = c.metagraph(103, None).await.unwrap();
    assert_eq!(mg.neurons.len(), 1, "{mg:?}");
    let n = &mg.neurons[0];
    assert_eq!(
        (n.uid, n.hotkey.as_str(), n.coldkey.as_str()),
        (0, key.ss58(), COLDKEY)
    );
    assert_eq!(
        (n.axon.ip.to_string(), n.axon.port),
        ("127.0.0.1".to_owned(), 9100)
    );
    assert_eq!(n.stake_rao, 7_000_000_000);

    let r = c
        .set_commitment(&key, 103, br#"{"m":"seeded"}"#)
        .await
        .unwrap();
    let on103 = c.commitments(103, r.block).await.unwrap();
    assert_eq!(on103.len(), 1, "{on103:?}");
    assert_eq!(on103[0].text(), Some(r#"{"m":"seeded"}"#));
    let on102 = c.commitments(NETUID, r.block).await.unwrap();
    assert!(on102.iter().all(|x| x.hotkey != key.ss58()));
    assert_eq!(
        c.metagraph(NETUID, Some(r.block))
            .await
            .unwrap()
            .neurons
            .len(),
        3
    );
}
