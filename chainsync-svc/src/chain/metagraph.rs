//! The metagraph of a subnet at a block, from `NeuronInfoRuntimeApi.get_neurons_lite(netuid)` (the call
//! bittensor's `metagraph()` makes; spec §4.2), decoded by field name from the node's metadata.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use subxt::ext::scale_value::Value;

use super::value::{account, boolean, field, seq, uint};

/// A neuron's advertised axon. Unserved neurons have ip `0.0.0.0` and port 0 (as bittensor shows them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axon {
    pub ip: IpAddr,
    pub port: u16,
}

impl Axon {
    /// Whether the neuron ever served an axon.
    pub fn is_served(&self) -> bool {
        !self.ip.is_unspecified() || self.port != 0
    }
}

/// One neuron of the metagraph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neuron {
    pub uid: u16,
    /// SS58 (format 42) of the hotkey.
    pub hotkey: String,
    pub hotkey_public: [u8; 32],
    /// SS58 of the owning coldkey.
    pub coldkey: String,
    pub active: bool,
    pub axon: Axon,
    /// Sum of the neuron's stake entries on this subnet, in rao (alpha, 1e-9).
    pub stake_rao: u64,
    pub validator_permit: bool,
    /// Block of the neuron's last weight update.
    pub last_update: u64,
}

impl Neuron {
    /// Stake in whole units (rao / 1e9), as bittensor's `neuron.stake` float.
    pub fn stake(&self) -> f64 {
        self.stake_rao as f64 / 1e9
    }
}

/// The neurons of `netuid` as of `block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metagraph {
    pub netuid: u16,
    pub block: u64,
    /// Sorted by uid.
    pub neurons: Vec<Neuron>,
}

impl Metagraph {
    pub fn by_hotkey(&self, ss58: &str) -> Option<&Neuron> {
        self.neurons.iter().find(|n| n.hotkey == ss58)
    }

    pub fn by_uid(&self, uid: u16) -> Option<&Neuron> {
        self.neurons.iter().find(|n| n.uid == uid)
    }
}

fn ip_of(ip: u128, ip_type: u128) -> IpAddr {
    match (ip_type, u32::try_from(ip)) {
        (6, _) => IpAddr::V6(Ipv6Addr::from(ip)),
        (_, Ok(v4)) => IpAddr::V4(Ipv4Addr::from(v4)),
        (_, Err(_)) => IpAddr::V6(Ipv6Addr::from(ip)),
    }
}

/// Decodes one `NeuronInfoLite`. `Err` names the missing field.
pub(crate) fn neuron_from_value<T>(v: &Value<T>) -> Result<Neuron, String> {
    let get = |name: &'static str| field(v, name).ok_or_else(|| format!("no field {name}"));
    let hotkey_public = account(get("hotkey")?).ok_or("hotkey is not an account id")?;
    let coldkey = account(get("coldkey")?).ok_or("coldkey is not an account id")?;
    let uid = uint(get("uid")?)
        .and_then(|u| u16::try_from(u).ok())
        .ok_or("uid is not a u16")?;
    let axon_v = get("axon_info")?;
    let ip = field(axon_v, "ip").and_then(uint).unwrap_or(0);
    let ip_type = field(axon_v, "ip_type").and_then(uint).unwrap_or(4);
    let port = field(axon_v, "port")
        .and_then(uint)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0);
    // stake: Vec<(coldkey, Compact<amount>)>
    let mut stake: u128 = 0;
    for entry in seq(get("stake")?).ok_or("stake is not a list")? {
        let parts = seq(entry).ok_or("stake entry is not a pair")?;
        let amount = parts
            .get(1)
            .and_then(|a| uint(a))
            .ok_or("stake amount missing")?;
        stake = stake.saturating_add(amount);
    }
    Ok(Neuron {
        uid,
        hotkey: miner_keys::ss58_encode(&hotkey_public),
        hotkey_public,
        coldkey: miner_keys::ss58_encode(&coldkey),
        active: field(v, "active").and_then(boolean).unwrap_or(false),
        axon: Axon {
            ip: ip_of(ip, ip_type),
            port,
        },
        stake_rao: u64::try_from(stake).unwrap_or(u64::MAX),
        validator_permit: field(v, "validator_permit")
            .and_then(boolean)
            .unwrap_or(false),
        last_update: field(v, "last_update")
            .and_then(uint)
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0),
    })
}
