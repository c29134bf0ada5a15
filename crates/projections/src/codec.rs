//! bincode helpers for projection values, and the layout of a stored case: the bincode case
//! followed by its history.
//!
//! A case's history (positions of the events that touched it) lives in the case's own value, as
//! 8-byte big-endian positions after the bincode [`domain::Case`], and moves into the tombstone's
//! value when the case is deleted. A fold rewrites a case's value on every visit anyway, so the
//! history costs no extra write; one sled entry per (case, event) cost replay about a quarter of
//! its time (docs/PERFORMANCE.md).

use domain::{Case, Position};
use serde::{de::DeserializeOwned, Serialize};

use crate::ProjectionError;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain data structs into a Vec cannot fail; an empty value would be caught on read.
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, ProjectionError> {
    decode_prefix(key, bytes).map(|(v, _)| v)
}

/// Decodes a value from the front of `bytes`; returns it and the bytes after it.
pub fn decode_prefix<'b, T: DeserializeOwned>(
    key: &[u8],
    bytes: &'b [u8],
) -> Result<(T, &'b [u8]), ProjectionError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| decode_error(key, e.to_string()))?;
    Ok((value, bytes.get(used..).unwrap_or_default()))
}

fn decode_error(key: &[u8], reason: String) -> ProjectionError {
    ProjectionError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    }
}

/// A case value: the bincode case, then `history` as 8-byte big-endian positions.
pub fn encode_case(case: &Case, history: &[Position]) -> Vec<u8> {
    let mut out = encode(case);
    out.reserve(8 * history.len());
    encode_history_into(&mut out, history);
    out
}

/// Appends positions as 8-byte big-endian integers (a tombstone's value is just this).
pub fn encode_history_into(out: &mut Vec<u8>, history: &[Position]) {
    for p in history {
        out.extend_from_slice(&p.to_be_bytes());
    }
}

/// The case of a case value, without decoding its history.
pub fn decode_case(key: &[u8], bytes: &[u8]) -> Result<Case, ProjectionError> {
    decode(key, bytes)
}

/// The case and the history of a case value.
pub fn decode_case_with_history(
    key: &[u8],
    bytes: &[u8],
) -> Result<(Case, Vec<Position>), ProjectionError> {
    let (case, rest) = decode_prefix(key, bytes)?;
    Ok((case, decode_history(key, rest)?))
}

/// Positions written by [`encode_history_into`].
pub fn decode_history(key: &[u8], bytes: &[u8]) -> Result<Vec<Position>, ProjectionError> {
    let chunks = bytes.chunks_exact(8);
    if !chunks.remainder().is_empty() {
        return Err(decode_error(
            key,
            format!(
                "history of {} bytes is not a whole number of positions",
                bytes.len()
            ),
        ));
    }
    Ok(chunks
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            Position(u64::from_be_bytes(b))
        })
        .collect())
}
