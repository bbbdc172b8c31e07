//! Bounds on what a peer (a validator's axon, the owner's phase API, the Hub) can make this
//! daemon receive, store or connect to. Everything here is a pure function or a small reader
//! so each bound is stated once and used by every transfer:
//!
//! - [`max_shard_bytes`]: the largest `model_expgroup_<gid>` file an expert group can need
//!   (its routed experts at their expected shapes, plus the format's overhead, `.pt` zip or
//!   safetensors header). A download is refused when `Content-Length` says more, and stopped
//!   as soon as the body passes it;
//! - [`read_body_limited`]: every response body that is not a checkpoint (error bodies, JSON
//!   answers) is read with a small limit and a deadline;
//! - [`PeerAddresses`] / [`check_peer_address`]: axon addresses outside global unicast are
//!   refused unless the chain is a devnet or local chain;
//! - [`check_free_space`]: a transfer does not start when the disk cannot take it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use miner_contract::ExpertGroup;
use miner_contract::pt::DType;

/// The expected shape of one routed expert: `gate_up_proj [2·I, H]` and `down_proj [H, I]`
/// (spec §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShape {
    /// `hidden_size` (H).
    pub hidden: u64,
    /// `moe_intermediate_size` (I).
    pub intermediate: u64,
}

/// DeepSeek-V2-Lite, the subnet's model: H = 2048, I = 1408.
pub const DEEPSEEK_V2_LITE: ExpertShape = ExpertShape {
    hidden: 2048,
    intermediate: 1408,
};

/// Tensors per routed expert in a shard (`gate_up_proj`, `down_proj`).
pub const TENSORS_PER_EXPERT: u64 = 2;

impl ExpertShape {
    /// Elements of the largest tensor of one expert (`gate_up_proj`).
    pub fn max_tensor_elems(&self) -> u64 {
        2 * self.intermediate * self.hidden
    }

    /// Elements of one expert's tensors together.
    pub fn expert_elems(&self) -> u64 {
        3 * self.intermediate * self.hidden
    }
}

/// Most bytes the `.pt` zip adds per tensor: a local header (30 + name + 64-byte alignment
/// padding + ZIP64 extra), a data descriptor (24), a central-directory entry (46 + name + ZIP64
/// extra) and the tensor's part of `data.pkl` (its 40-70 character key, storage tuple, shape,
/// stride). Measured files stay under 400 bytes a tensor.
pub const PT_OVERHEAD_PER_TENSOR: u64 = 1024;
/// Most bytes the safetensors header takes per tensor (`"<key>":{"dtype":"F16","shape":[..],
/// "data_offsets":[..,..]}`, about 130 bytes).
pub const SAFETENSORS_OVERHEAD_PER_TENSOR: u64 = 512;
/// Fixed overhead of either format: `.pt` metadata records (`byteorder`, `version`,
/// `.format_version`, `.storage_alignment`, `.data/serialization_id`), ZIP64 end records and
/// an end-of-central-directory comment of up to 64 KiB; or safetensors' length prefix and
/// `__metadata__`.
pub const FORMAT_OVERHEAD_FIXED: u64 = 192 << 10;

/// Bytes `tensors` tensors of `tensor_bytes` bytes together can take in a `.pt` or
/// safetensors file, at most.
pub fn file_bound(tensor_bytes: u64, tensors: u64) -> u64 {
    let per = PT_OVERHEAD_PER_TENSOR.max(SAFETENSORS_OVERHEAD_PER_TENSOR);
    tensor_bytes
        .saturating_add(tensors.saturating_mul(per))
        .saturating_add(FORMAT_OVERHEAD_FIXED)
}

/// The largest `model_expgroup_<gid>.pt` / `.safetensors` file `group` can need with tensors
/// of `dtype`: every routed expert of the group at the subnet model's shapes
/// ([`DEEPSEEK_V2_LITE`]), plus the larger of the two formats' overheads. (exp_math, fp16:
/// 3,598,712,832 bytes of tensors + 416 KiB + 192 KiB.)
pub fn max_shard_bytes(group: &ExpertGroup, dtype: DType) -> u64 {
    max_shard_bytes_for(group, dtype, DEEPSEEK_V2_LITE)
}

/// [`max_shard_bytes`] for another expert shape.
pub fn max_shard_bytes_for(group: &ExpertGroup, dtype: DType, shape: ExpertShape) -> u64 {
    let experts = group.num_experts() as u64;
    let tensor_bytes = experts
        .saturating_mul(shape.expert_elems())
        .saturating_mul(dtype.elem_size() as u64);
    file_bound(tensor_bytes, experts.saturating_mul(TENSORS_PER_EXPERT))
}

/// The widest dtype a validator's shard is accepted in: validators save in the dtype of the
/// frozen embeddings (fp16 or bf16, spec §7.3); fp32 is allowed so a validator training in
/// full precision is not refused.
pub const WIDEST_SHARD_DTYPE: DType = DType::F32;

/// Most bytes of an error body kept (the rest is not read).
pub const MAX_ERROR_BODY: usize = 4 << 10;
/// Most bytes of a JSON answer (phase API, submission receipt).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Why [`read_body_limited`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("no response body data for {0:?}")]
    Timeout(Duration),
    #[error("reading the response body: {0}")]
    Network(String),
}

/// Reads at most `limit` bytes of `resp`'s body, never waiting longer than `idle` for the next
/// piece. `truncate`: a longer body is cut at `limit` (for error bodies shown to an operator);
/// otherwise it is an error (a JSON answer must be whole). The connection is dropped, not
/// drained, when the body is longer.
pub async fn read_body_limited(
    mut resp: reqwest::Response,
    limit: usize,
    idle: Duration,
    truncate: bool,
) -> Result<Vec<u8>, BodyError> {
    if let Some(n) = resp.content_length()
        && n > limit as u64
        && !truncate
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut out = Vec::new();
    loop {
        let chunk = tokio::time::timeout(idle, resp.chunk())
            .await
            .map_err(|_| BodyError::Timeout(idle))?
            .map_err(|e| BodyError::Network(super::download::error_chain(&e)))?;
        let Some(chunk) = chunk else {
            return Ok(out);
        };
        let room = limit - out.len();
        if chunk.len() > room {
            if truncate {
                out.extend_from_slice(&chunk[..room]);
                return Ok(out);
            }
            return Err(BodyError::TooLarge { limit });
        }
        out.extend_from_slice(&chunk);
    }
}

/// An error body as one printable line: at most 200 characters, control characters escaped.
pub fn error_text(body: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(body).chars().take(200).collect();
    s.escape_debug().to_string()
}

/// Which validator axon addresses may be connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeerAddresses {
    /// Only global unicast addresses (a public network: finney, test, archive).
    #[default]
    GlobalOnly,
    /// Also loopback and private addresses (a devnet or local chain).
    AllowLocal,
}

impl PeerAddresses {
    /// `AllowLocal` for a chain reached on loopback (`local`, `ws://127.0.0.1:...`,
    /// `ws://localhost:...`) or a private address; `GlobalOnly` for everything else.
    pub fn for_chain_url(url: &str) -> PeerAddresses {
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let local = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || !is_global_unicast(ip));
        if local {
            PeerAddresses::AllowLocal
        } else {
            PeerAddresses::GlobalOnly
        }
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 192 && b == 0 && c == 0))
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_global_v4(v4);
    }
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x0064 && s[1] == 0xff9b)
        || s[0] == 0x0100)
}

/// Whether `ip` is a global unicast address (not loopback, private, link-local, shared,
/// multicast, documentation, reserved or unspecified).
pub fn is_global_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

/// Refuses an axon address `policy` does not allow; the error says why.
pub fn check_peer_address(ip: &str, policy: PeerAddresses) -> Result<(), String> {
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("axon address {ip:?} is not an IP address"))?;
    let ok = match policy {
        PeerAddresses::GlobalOnly => is_global_unicast(addr),
        PeerAddresses::AllowLocal => !(addr.is_unspecified() || addr.is_multicast()),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "axon address {addr} is not a global unicast address (allowed only on a devnet or local chain)"
        ))
    }
}

/// Reserve kept free beyond what a transfer needs (other writers, the manifest, the journal).
pub const FREE_SPACE_RESERVE: u64 = 64 << 20;

/// Refuses to start writing `need` bytes under `dir` when the filesystem has less than
/// `need` + [`FREE_SPACE_RESERVE`] available to us.
pub fn check_free_space(dir: &Path, need: u64) -> Result<(), String> {
    let st = rustix::fs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    let avail = st.f_bavail.saturating_mul(st.f_frsize);
    let want = need.saturating_add(FREE_SPACE_RESERVE);
    if avail < want {
        return Err(format!(
            "not enough free space in {}: {avail} bytes available, {need} needed (+{FREE_SPACE_RESERVE} reserve)",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_math_bound_is_its_tensors_plus_the_overhead() {
        let g = ExpertGroup::builtin("exp_math").unwrap();
        assert_eq!(g.num_experts(), 208);
        let fp16 = max_shard_bytes(&g, DType::F16);
        // Spec §7.3: 3,598,712,832 bytes of fp16 tensors in 416 tensors.
        assert_eq!(fp16, 3_598_712_832 + 416 * 1024 + (192 << 10));
        assert_eq!(max_shard_bytes(&g, DType::BF16), fp16);
        assert!(max_shard_bytes(&g, DType::F32) > 2 * 3_598_712_832);
    }

    #[test]
    fn global_unicast_excludes_local_and_special_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_global_unicast(ip.parse().unwrap()), "{ip}");
            assert!(check_peer_address(ip, PeerAddresses::GlobalOnly).is_err(), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_global_unicast(ip.parse().unwrap()), "{ip}");
            assert!(check_peer_address(ip, PeerAddresses::GlobalOnly).is_ok(), "{ip}");
        }
        assert!(check_peer_address("127.0.0.1", PeerAddresses::AllowLocal).is_ok());
        assert!(check_peer_address("0.0.0.0", PeerAddresses::AllowLocal).is_err());
        assert!(check_peer_address("evil.example", PeerAddresses::AllowLocal).is_err());
    }

    #[test]
    fn chain_urls_decide_whether_local_axons_are_allowed() {
        use PeerAddresses::*;
        for (url, want) in [
            ("ws://127.0.0.1:9944", AllowLocal),
            ("ws://localhost:9944", AllowLocal),
            ("ws://[::1]:9944/", AllowLocal),
            ("ws://10.0.0.5:9944", AllowLocal),
            ("wss://entrypoint-finney.opentensor.ai:443", GlobalOnly),
            ("wss://8.8.8.8:443", GlobalOnly),
            ("wss://127.0.0.1.evil.example:443", GlobalOnly),
        ] {
            assert_eq!(PeerAddresses::for_chain_url(url), want, "{url}");
        }
    }

    #[test]
    fn free_space_check_refuses_what_cannot_fit() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_free_space(d.path(), 1).is_ok());
        let err = check_free_space(d.path(), u64::MAX / 2).unwrap_err();
        assert!(err.contains("not enough free space"), "{err}");
    }
}
