//! Substrate secret URIs and hard (`//`) derivation for sr25519, as `sp_core::sr25519::Pair::from_string`.
//!
//! Root key: BIP39 phrase → entropy → `substrate_bip39::mini_secret_from_entropy(entropy, password)` →
//! `expand_to_keypair(Ed25519)`. A hard junction `//j` maps `j` to a 32-byte chain code (a number: its u64
//! little-endian bytes; otherwise the SCALE-encoded string, blake2b-256 hashed when longer than 32 bytes,
//! else zero-padded) and derives `secret.hard_derive_mini_secret_key(Some(chain code), b"")`, expanded in
//! Ed25519 mode (schnorrkel's merlin-transcript HDKD, which `sp_core` calls).

use blake2::Blake2b;
use blake2::Digest;
use blake2::digest::consts::U32;
use schnorrkel::derive::ChainCode;
use schnorrkel::{ExpansionMode, Keypair, MiniSecretKey};
use zeroize::Zeroizing;

use crate::KeyError;

/// Substrate's development phrase (the root of `//Alice`, `//Bob`, …).
pub const DEV_PHRASE: &str =
    "bottom drive obey lake curtain smoke basket hold race lonely fit walk";

pub(crate) fn keypair_from_phrase(phrase: &str, password: &str) -> Result<Keypair, KeyError> {
    let mnemonic = bip39::Mnemonic::parse_in_normalized(bip39::Language::English, phrase)
        .map_err(|_| KeyError::BadUri("not a valid BIP39 English phrase".to_owned()))?;
    let entropy = Zeroizing::new(mnemonic.to_entropy());
    let mini = substrate_bip39::mini_secret_from_entropy(&entropy, password)
        .map_err(|_| KeyError::BadUri("cannot derive a seed from the phrase".to_owned()))?;
    Ok(mini.expand_to_keypair(ExpansionMode::Ed25519))
}

fn scale_compact_len(n: usize, out: &mut Vec<u8>) {
    if n < 1 << 6 {
        out.push((n as u8) << 2);
    } else if n < 1 << 14 {
        out.extend_from_slice(&(((n as u16) << 2) | 1).to_le_bytes());
    } else {
        out.extend_from_slice(&(((n as u32) << 2) | 2).to_le_bytes());
    }
}

/// The chain code of a junction, as `sp_core::DeriveJunction::from(&str)`.
pub(crate) fn chain_code(junction: &str) -> [u8; 32] {
    let encoded: Vec<u8> = match junction.parse::<u64>() {
        Ok(n) => n.to_le_bytes().to_vec(),
        Err(_) => {
            let mut v = Vec::with_capacity(junction.len() + 4);
            scale_compact_len(junction.len(), &mut v);
            v.extend_from_slice(junction.as_bytes());
            v
        }
    };
    let mut cc = [0u8; 32];
    if encoded.len() > 32 {
        cc.copy_from_slice(&Blake2b::<U32>::digest(&encoded));
    } else {
        cc[..encoded.len()].copy_from_slice(&encoded);
    }
    cc
}

pub(crate) fn hard_derive(parent: &Keypair, junction: &str) -> Keypair {
    let (mini, _) = parent
        .secret
        .hard_derive_mini_secret_key(Some(ChainCode(chain_code(junction))), b"");
    mini.expand_to_keypair(ExpansionMode::Ed25519)
}

pub(crate) fn keypair_from_uri(uri: &str) -> Result<Keypair, KeyError> {
    let (body, password) = match uri.find("///") {
        Some(i) => (&uri[..i], &uri[i + 3..]),
        None => (uri, ""),
    };
    let (root, path) = match body.find('/') {
        Some(i) => (&body[..i], &body[i..]),
        None => (body, ""),
    };
    let root = root.trim();
    let mut keypair = if root.is_empty() {
        keypair_from_phrase(DEV_PHRASE, password)?
    } else if root.starts_with("0x") {
        let seed = crate::keyfile::hex_n::<32>(root)
            .ok_or_else(|| KeyError::BadUri("seed is not 32 bytes of hex".to_owned()))?;
        MiniSecretKey::from_bytes(seed.as_ref())
            .map_err(|_| KeyError::BadUri("invalid seed".to_owned()))?
            .expand_to_keypair(ExpansionMode::Ed25519)
    } else {
        keypair_from_phrase(root, password)?
    };
    let mut rest = path;
    while !rest.is_empty() {
        let Some(after) = rest.strip_prefix("//") else {
            return Err(KeyError::BadUri(
                "soft (single-slash) derivation is not supported".to_owned(),
            ));
        };
        let end = after.find('/').unwrap_or(after.len());
        let junction = &after[..end];
        if junction.is_empty() {
            return Err(KeyError::BadUri("empty derivation junction".to_owned()));
        }
        keypair = hard_derive(&keypair, junction);
        rest = &after[end..];
    }
    Ok(keypair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ss58_encode;

    fn ss58_of(uri: &str) -> String {
        ss58_encode(&keypair_from_uri(uri).unwrap().public.to_bytes())
    }

    #[test]
    fn well_known_dev_keys() {
        assert_eq!(
            ss58_of("//Alice"),
            "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
        );
        assert_eq!(
            ss58_of("//Bob"),
            "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
        );
        assert_eq!(
            ss58_of("//Charlie"),
            "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y"
        );
        // The dev phrase itself is the well-known root account.
        assert_eq!(ss58_of(""), ss58_of(DEV_PHRASE));
    }

    #[test]
    fn numeric_and_long_junctions_give_distinct_keys() {
        let a = ss58_of("//1");
        let b = ss58_of("//Alice//1");
        let long = ss58_of("//a-junction-name-that-is-longer-than-thirty-two-bytes");
        assert_ne!(a, b);
        assert_ne!(long, a);
    }

    #[test]
    fn refuses_soft_junctions_and_bad_phrases() {
        assert!(keypair_from_uri("/Alice").is_err());
        assert!(keypair_from_uri("not a phrase//Alice").is_err());
    }
}
