//! Checksums of the safetensors files eio writes (checkpoints, models, folded networks,
//! black-box suite files): a flipped bit is an error naming the file, never a silently
//! different model.
//!
//! # The checksum
//! The header's `__metadata__` entry [`CHECKSUM_KEY`] (`eio.sha256`) holds the lower-case hex
//! SHA-256 of, in order:
//! 1. every other metadata entry, sorted by key: the key's bytes, a 0 byte, the value's bytes,
//!    a 0 byte (so the config and progress stored in `eio` are covered too);
//! 2. every tensor, sorted by name: the name's bytes, a 0 byte, the dtype as the header spells
//!    it (`F32`, `I64`, ...), a 0 byte, the rank and each dimension as u64 little-endian, the
//!    data's length as u64 little-endian, then the data bytes as stored.
//!
//! A metadata key one byte away from `eio.sha256` counts as a damaged checksum entry (an
//! error), so a flipped bit in the key cannot pass a file off as unsealed. Files without the
//! entry (written before eio added it, or by other tools) still load: their
//! checksum is *absent*, which [`check`] reports as [`Seal::Absent`] (not verified), never as
//! an error.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensorError, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

/// The metadata key of the checksum.
pub const CHECKSUM_KEY: &str = "eio.sha256";

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seal {
    /// The stored checksum matches (the hex digest).
    Verified(String),
    /// No checksum is stored: the file is readable but not verified.
    Absent,
}

/// Why a file failed [`check`].
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("not a readable safetensors file (truncated or corrupted?): {0}")]
    Unreadable(#[source] SafeTensorError),
    #[error("checksum mismatch: the file says {stored}, its contents hash to {computed} (the file was altered or damaged after writing)")]
    Mismatch { stored: String, computed: String },
}

/// The checksum of `tensors` and `metadata` (the [`CHECKSUM_KEY`] entry itself is skipped).
pub fn digest<'a>(
    metadata: Option<&HashMap<String, String>>,
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut h = Sha256::new();
    if let Some(metadata) = metadata {
        let mut entries: Vec<(&String, &String)> = metadata
            .iter()
            .filter(|(k, _)| k.as_str() != CHECKSUM_KEY)
            .collect();
        entries.sort();
        for (k, v) in entries {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
    }
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in tensors {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(format!("{dtype:?}").as_bytes());
        h.update([0]);
        h.update((shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update((d as u64).to_le_bytes());
        }
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    hex(&h.finalize())
}

/// Serialises `tensors` with `metadata` plus their checksum under [`CHECKSUM_KEY`].
///
/// # Errors
/// As `safetensors::serialize`.
pub fn serialize_sealed<'a, S: AsRef<str>>(
    tensors: Vec<(S, TensorView<'a>)>,
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>, SafeTensorError> {
    let sum = digest(
        Some(&metadata),
        tensors
            .iter()
            .map(|(n, v)| (n.as_ref(), v.dtype(), v.shape(), v.data())),
    );
    metadata.insert(CHECKSUM_KEY.to_string(), sum);
    let named: Vec<(String, TensorView<'a>)> = tensors
        .into_iter()
        .map(|(n, v)| (n.as_ref().to_string(), v))
        .collect();
    let bytes = safetensors::serialize(named, Some(metadata))?;
    Ok(canonical_header(bytes))
}

/// `bytes` with the header's JSON objects in key order (safetensors writes its metadata map
/// in hash order), so the same contents always give the same file.
fn canonical_header(bytes: Vec<u8>) -> Vec<u8> {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let Some(n) = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
    else {
        return bytes;
    };
    let Some(Ok(header)) = bytes
        .get(8..8 + n)
        .map(serde_json::from_slice::<serde_json::Value>)
    else {
        return bytes;
    };
    let mut text = String::new();
    write(&header, &mut text);
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Parses `bytes` as safetensors and checks the stored checksum, if any.
///
/// # Errors
/// [`IntegrityError::Unreadable`] for bytes that are not safetensors (truncated, say), and
/// [`IntegrityError::Mismatch`] when the checksum does not match.
pub fn check(bytes: &[u8]) -> Result<Seal, IntegrityError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(IntegrityError::Unreadable)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(IntegrityError::Unreadable)?;
    let metadata = header.metadata().as_ref();
    let Some(stored) = metadata.and_then(|m| m.get(CHECKSUM_KEY)) else {
        // A key one byte away from the checksum's is a damaged checksum entry, not an absent one.
        let damaged = metadata
            .into_iter()
            .flat_map(HashMap::keys)
            .find(|k| near_miss(k, CHECKSUM_KEY));
        return match damaged {
            Some(k) => Err(IntegrityError::Mismatch {
                stored: format!("(a damaged entry {k:?})"),
                computed: "(not computed)".into(),
            }),
            None => Ok(Seal::Absent),
        };
    };
    let views = tensors.tensors();
    let computed = digest(
        header.metadata().as_ref(),
        views
            .iter()
            .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
    );
    if *stored == computed {
        Ok(Seal::Verified(computed))
    } else {
        Err(IntegrityError::Mismatch {
            stored: stored.clone(),
            computed,
        })
    }
}

/// Same length, exactly one byte different.
fn near_miss(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).filter(|(x, y)| x != y).count() == 1
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let a: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = 7i64.to_le_bytes().to_vec();
        let tensors = vec![
            ("w", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
            ("count", TensorView::new(Dtype::I64, vec![], &b).unwrap()),
        ];
        let meta = HashMap::from([("eio".to_string(), "{\"epoch\": 3}".to_string())]);
        serialize_sealed(tensors, meta).unwrap()
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = sample();
        assert!(matches!(check(&bytes), Ok(Seal::Verified(_))));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(check(&b).is_err(), "byte {i} bit {bit} went unnoticed");
            }
        }
        for n in 0..bytes.len() {
            assert!(check(&bytes[..n]).is_err(), "truncated to {n} bytes");
        }
    }

    #[test]
    fn the_same_contents_give_the_same_bytes() {
        let first = sample();
        for _ in 0..20 {
            assert_eq!(sample(), first);
        }
        assert!(check(&first).is_ok());
    }

    #[test]
    fn files_without_a_checksum_are_readable_but_not_verified() {
        let a = [0u8; 8];
        let plain = safetensors::serialize(
            vec![("x", TensorView::new(Dtype::F32, vec![2], &a).unwrap())],
            None,
        )
        .unwrap();
        assert_eq!(check(&plain).unwrap(), Seal::Absent);
    }
}
