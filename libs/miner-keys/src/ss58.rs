//! SS58 addresses (the base58 account format of Substrate chains).
//!
//! Layout: `base58(prefix ‖ public key ‖ checksum[..2])` where the checksum is
//! `blake2b-512(b"SS58PRE" ‖ prefix ‖ public key)`. Bittensor uses format 42, whose prefix is one byte.

use blake2::{Blake2b512, Digest};

/// The SS58 address format of Bittensor (the generic Substrate format).
pub const SS58_FORMAT_BITTENSOR: u16 = 42;

/// Why a string is not an SS58 address of a 32-byte account.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Ss58Error {
    #[error("decode ss58 address {0:?}: not base58")]
    NotBase58(String),
    #[error("decode ss58 address {0:?}: wrong length")]
    BadLength(String),
    #[error("decode ss58 address {0:?}: checksum mismatch")]
    BadChecksum(String),
    #[error("decode ss58 address {0:?}: reserved or invalid address format")]
    BadFormat(String),
    #[error("ss58 address {address:?} has format {found}, expected {expected}")]
    WrongFormat {
        address: String,
        found: u16,
        expected: u16,
    },
}

fn checksum(data: &[u8]) -> [u8; 2] {
    let mut h = Blake2b512::new();
    h.update(b"SS58PRE");
    h.update(data);
    let out = h.finalize();
    [out[0], out[1]]
}

/// Encodes a public key as an SS58 address with format 42.
pub fn ss58_encode(public: &[u8; 32]) -> String {
    ss58_encode_with_format(SS58_FORMAT_BITTENSOR, public)
}

/// Encodes a public key as an SS58 address with the given format (0..16383).
pub fn ss58_encode_with_format(format: u16, public: &[u8; 32]) -> String {
    let format = format & 0x3fff;
    let mut data = Vec::with_capacity(36);
    if format < 64 {
        data.push(format as u8);
    } else {
        // Two-byte prefix, as in Substrate's `Ss58Codec::to_ss58check_with_version`.
        let first = (((format & 0x00fc) >> 2) | 0x0040) as u8;
        let second = ((format >> 8) | ((format & 0x0003) << 6)) as u8;
        data.push(first);
        data.push(second);
    }
    data.extend_from_slice(public);
    let sum = checksum(&data);
    data.extend_from_slice(&sum);
    bs58::encode(data).into_string()
}

/// Decodes an SS58 address of any format into (format, public key).
pub fn ss58_decode_with_format(address: &str) -> Result<(u16, [u8; 32]), Ss58Error> {
    let data = bs58::decode(address)
        .into_vec()
        .map_err(|_| Ss58Error::NotBase58(address.to_owned()))?;
    let first = *data
        .first()
        .ok_or_else(|| Ss58Error::BadLength(address.to_owned()))?;
    let (prefix_len, format) = match first {
        0..=63 => (1usize, u16::from(first)),
        64..=127 => {
            let second = *data
                .get(1)
                .ok_or_else(|| Ss58Error::BadLength(address.to_owned()))?;
            let lower = (first << 2) | (second >> 6);
            let upper = second & 0b0011_1111;
            (2usize, u16::from(lower) | (u16::from(upper) << 8))
        }
        _ => return Err(Ss58Error::BadFormat(address.to_owned())),
    };
    if data.len() != prefix_len + 32 + 2 {
        return Err(Ss58Error::BadLength(address.to_owned()));
    }
    let body_end = prefix_len + 32;
    if checksum(&data[..body_end]) != data[body_end..] {
        return Err(Ss58Error::BadChecksum(address.to_owned()));
    }
    let mut public = [0u8; 32];
    public.copy_from_slice(&data[prefix_len..body_end]);
    Ok((format, public))
}

/// Decodes an SS58 address with format 42 (Bittensor) into its public key.
pub fn ss58_decode(address: &str) -> Result<[u8; 32], Ss58Error> {
    let (format, public) = ss58_decode_with_format(address)?;
    if format != SS58_FORMAT_BITTENSOR {
        return Err(Ss58Error::WrongFormat {
            address: address.to_owned(),
            found: format,
            expected: SS58_FORMAT_BITTENSOR,
        });
    }
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Alice's well-known public key and address.
    const ALICE_HEX: &str = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d";
    const ALICE_SS58: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";

    #[test]
    fn encodes_and_decodes_alice() {
        let mut pk = [0u8; 32];
        hex::decode_to_slice(ALICE_HEX, &mut pk).unwrap();
        assert_eq!(ss58_encode(&pk), ALICE_SS58);
        assert_eq!(ss58_decode(ALICE_SS58).unwrap(), pk);
    }

    #[test]
    fn two_byte_formats_round_trip() {
        let pk = [7u8; 32];
        for format in [64u16, 255, 1000, 16383] {
            let a = ss58_encode_with_format(format, &pk);
            assert_eq!(ss58_decode_with_format(&a).unwrap(), (format, pk));
            assert!(matches!(
                ss58_decode(&a),
                Err(Ss58Error::WrongFormat { .. })
            ));
        }
    }

    #[test]
    fn rejects_a_corrupted_address() {
        let mut s = ALICE_SS58.to_owned();
        s.replace_range(10..11, if &s[10..11] == "a" { "b" } else { "a" });
        assert!(ss58_decode(&s).is_err());
        assert!(matches!(ss58_decode("0OIl"), Err(Ss58Error::NotBase58(_))));
        assert!(matches!(ss58_decode("5Grw"), Err(Ss58Error::BadLength(_))));
    }
}
