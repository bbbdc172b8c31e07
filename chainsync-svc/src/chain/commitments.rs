//! `Commitments.CommitmentOf(netuid, hotkey) -> Registration { deposit, block, info: CommitmentInfo { fields } }`,
//! decoded by field name; commitments that are not what a miner or validator writes are kept as such
//! (never an error for the whole read).

use subxt::ext::scale_value::{Composite, Value};

use super::value::{bytes, field, seq_of_variants, uint, variant};

/// What a commitment's first field holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitmentData {
    /// `Data::RawN` bytes (what bittensor's `set_commitment` writes).
    Raw(Vec<u8>),
    /// Another `Data` variant (e.g. a hash), by name.
    Other(String),
    /// No fields.
    Empty,
    /// The stored value does not decode with the node's metadata.
    Undecodable(String),
}

/// One hotkey's commitment on a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commitment {
    /// SS58 (format 42) of the committing hotkey.
    pub hotkey: String,
    pub hotkey_public: [u8; 32],
    /// The block the commitment was made at (`Registration.block`), when decodable.
    pub block: Option<u64>,
    pub data: CommitmentData,
}

impl Commitment {
    /// The raw bytes of a `Raw` commitment.
    pub fn raw(&self) -> Option<&[u8]> {
        match &self.data {
            CommitmentData::Raw(b) => Some(b),
            _ => None,
        }
    }

    /// The raw bytes as UTF-8 (bittensor's `decode_metadata`), if they are.
    pub fn text(&self) -> Option<&str> {
        self.raw().and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// Decodes a `Registration` value into (block, data).
pub(crate) fn registration_from_value<T>(v: &Value<T>) -> (Option<u64>, CommitmentData) {
    let block = field(v, "block")
        .and_then(uint)
        .and_then(|b| u64::try_from(b).ok());
    let Some(fields) = field(v, "info")
        .and_then(|i| field(i, "fields"))
        .and_then(seq_of_variants)
    else {
        return (block, CommitmentData::Undecodable("no info.fields".into()));
    };
    let Some(first) = fields.first() else {
        return (block, CommitmentData::Empty);
    };
    let data = match variant(first) {
        Some((name, values)) if name.starts_with("Raw") => match values.first().map(|x| bytes(x)) {
            Some(Some(b)) => CommitmentData::Raw(b),
            None => CommitmentData::Raw(Vec::new()),
            Some(None) => CommitmentData::Undecodable(format!("{name} without bytes")),
        },
        Some((name, _)) => CommitmentData::Other(name.to_owned()),
        None => CommitmentData::Undecodable("first field is not a Data variant".into()),
    };
    (block, data)
}

/// The `CommitmentInfo { fields: [Data::RawN(bytes)] }` value of `set_commitment`.
pub(crate) fn commitment_info_value(data: &[u8]) -> Value {
    let raw = Value::variant(
        format!("Raw{}", data.len()),
        Composite::unnamed([Value::from_bytes(data)]),
    );
    Value::named_composite([("fields", Value::unnamed_composite([raw]))])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(fields: Vec<Value>) -> Value {
        Value::named_composite([
            ("deposit", Value::u128(0)),
            ("block", Value::u128(42)),
            (
                "info",
                // BoundedVec decodes as a one-field wrapper around the sequence.
                Value::named_composite([(
                    "fields",
                    Value::unnamed_composite([Value::unnamed_composite(fields)]),
                )]),
            ),
        ])
    }

    #[test]
    fn decodes_raw_other_and_empty_fields() {
        let raw = registration(vec![Value::variant(
            "Raw3",
            Composite::unnamed([Value::from_bytes(b"abc")]),
        )]);
        assert_eq!(
            registration_from_value(&raw),
            (Some(42), CommitmentData::Raw(b"abc".to_vec()))
        );
        let one_byte = registration(vec![Value::variant(
            "Raw1",
            Composite::unnamed([Value::from_bytes(b"{")]),
        )]);
        assert_eq!(
            registration_from_value(&one_byte).1,
            CommitmentData::Raw(b"{".to_vec())
        );
        let zero = registration(vec![Value::variant(
            "Raw0",
            Composite::unnamed([Value::from_bytes(b"")]),
        )]);
        assert_eq!(
            registration_from_value(&zero).1,
            CommitmentData::Raw(Vec::new())
        );
        let other = registration(vec![Value::variant(
            "Sha256",
            Composite::unnamed([Value::from_bytes([1u8; 32])]),
        )]);
        assert_eq!(
            registration_from_value(&other).1,
            CommitmentData::Other("Sha256".into())
        );
        assert_eq!(
            registration_from_value(&registration(vec![])).1,
            CommitmentData::Empty
        );
        assert!(matches!(
            registration_from_value(&Value::u128(1)).1,
            CommitmentData::Undecodable(_)
        ));
    }

    #[test]
    fn set_commitment_value_names_the_raw_variant_by_length() {
        let v = commitment_info_value(&[b'x'; 94]);
        let fields = field(&v, "fields").and_then(seq_of_variants).unwrap();
        let (name, vals) = variant(fields[0]).unwrap();
        assert_eq!(name, "Raw94");
        assert_eq!(bytes(vals[0]).unwrap(), vec![b'x'; 94]);
    }
}
