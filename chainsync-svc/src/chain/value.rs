//! Reading fields out of dynamically decoded SCALE values (`scale_value::Value`), so the client works from
//! whatever metadata the node serves instead of compiled-in types.

use subxt::ext::scale_value::{Composite, Primitive, Value, ValueDef};

/// The named field `name` of a composite value.
pub(crate) fn field<'a, T>(v: &'a Value<T>, name: &str) -> Option<&'a Value<T>> {
    match &v.value {
        ValueDef::Composite(Composite::Named(fields)) => {
            fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
        }
        // A newtype wrapper around a struct: look inside.
        ValueDef::Composite(Composite::Unnamed(vals)) if vals.len() == 1 => field(&vals[0], name),
        _ => None,
    }
}

/// An unsigned integer (also through newtype wrappers such as `NetUid(u16)` or `AlphaCurrency(u64)`).
pub(crate) fn uint<T>(v: &Value<T>) -> Option<u128> {
    match &v.value {
        ValueDef::Primitive(Primitive::U128(n)) => Some(*n),
        ValueDef::Composite(c) if c.len() == 1 => c.values().next().and_then(uint),
        _ => None,
    }
}

/// A boolean.
pub(crate) fn boolean<T>(v: &Value<T>) -> Option<bool> {
    match &v.value {
        ValueDef::Primitive(Primitive::Bool(b)) => Some(*b),
        ValueDef::Composite(c) if c.len() == 1 => c.values().next().and_then(boolean),
        _ => None,
    }
}

/// Bytes of a `[u8; N]`/`Vec<u8>` value (also through newtype wrappers such as `AccountId32([u8; 32])`).
pub(crate) fn bytes<T>(v: &Value<T>) -> Option<Vec<u8>> {
    match &v.value {
        ValueDef::Composite(c) => {
            if c.len() == 1
                && let Some(b) = c.values().next().and_then(bytes)
            {
                return Some(b);
            }
            c.values()
                .map(|x| match &x.value {
                    ValueDef::Primitive(Primitive::U128(n)) => u8::try_from(*n).ok(),
                    _ => None,
                })
                .collect()
        }
        _ => None,
    }
}

/// A 32-byte account id.
pub(crate) fn account<T>(v: &Value<T>) -> Option<[u8; 32]> {
    bytes(v).and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
}

/// The elements of a sequence (`Vec<T>`, `[T; N]`, tuples).
pub(crate) fn seq<T>(v: &Value<T>) -> Option<Vec<&Value<T>>> {
    match &v.value {
        ValueDef::Composite(Composite::Unnamed(vals)) => Some(vals.iter().collect()),
        ValueDef::Composite(Composite::Named(vals)) if vals.is_empty() => Some(Vec::new()),
        _ => None,
    }
}

/// The elements of a sequence of enum values held in a newtype such as `BoundedVec<Data, _>`
/// (which decodes as a one-field composite around the sequence).
pub(crate) fn seq_of_variants<T>(v: &Value<T>) -> Option<Vec<&Value<T>>> {
    let items = seq(v)?;
    if let [only] = items.as_slice()
        && matches!(only.value, ValueDef::Composite(_))
    {
        return seq(only);
    }
    Some(items)
}

/// The variant name and its values.
pub(crate) fn variant<T>(v: &Value<T>) -> Option<(&str, Vec<&Value<T>>)> {
    match &v.value {
        ValueDef::Variant(var) => Some((var.name.as_str(), var.values.values().collect())),
        ValueDef::Composite(c) if c.len() == 1 => c.values().next().and_then(variant),
        _ => None,
    }
}
