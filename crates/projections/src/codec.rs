//! bincode helpers for projection values, and the layout of a stored case: its closed flag, its
//! history, then the bincode case.
//!
//! A case's history (positions of the events that touched it) lives in the case's own value, as
//! a count and 8-byte big-endian positions before the bincode [`domain::Case`], and moves into
//! the tombstone's value when the case is deleted. The closed flag comes first so that an open
//! case list skips closed cases without decoding them. A fold rewrites a case's value on every visit anyway, so the
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

/// A case value: 1 when closed, else 0; its history (a u32 big-endian count, then that many
/// 8-byte big-endian positions); then the bincode case. History before the case, so that time
/// travel reads it without decoding the case.
pub fn encode_case(case: &Case, history: &[Position]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 8 * history.len() + 256);
    out.push(u8::from(case.closed));
    out.extend_from_slice(
        &u32::try_from(history.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    encode_history_into(&mut out, history);
    bincode::serde::encode_into_std_write(case, &mut out, bincode::config::standard())
        .unwrap_or_default();
    out
}

/// Appends positions as 8-byte big-endian integers (a tombstone's value is just this).
pub fn encode_history_into(out: &mut Vec<u8>, history: &[Position]) {
    for p in history {
        out.extend_from_slice(&p.to_be_bytes());
    }
}

/// True when a case value says its case is closed.
pub fn case_closed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&1)
}

/// Splits a case value into its history bytes (whole positions, see [`last_up_to`]) and its
/// case bytes.
pub fn split_case<'b>(
    key: &[u8],
    bytes: &'b [u8],
) -> Result<(&'b [u8], &'b [u8]), ProjectionError> {
    let bytes = bytes.get(1..).unwrap_or_default();
    let count = bytes
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| decode_error(key, format!("case value of {} bytes", bytes.len())))?;
    let end = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(8))
        .and_then(|n| n.checked_add(4))
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| {
            decode_error(
                key,
                format!("history of {count} positions overruns the value"),
            )
        })?;
    Ok((
        bytes.get(4..end).unwrap_or_default(),
        bytes.get(end..).unwrap_or_default(),
    ))
}

/// The case of a case value, without decoding its history.
pub fn decode_case(key: &[u8], bytes: &[u8]) -> Result<Case, ProjectionError> {
    let (_, case) = split_case(key, bytes)?;
    decode(key, case)
}

/// The history of a case value, without decoding the case.
pub fn decode_case_history(key: &[u8], bytes: &[u8]) -> Result<Vec<Position>, ProjectionError> {
    let (history, _) = split_case(key, bytes)?;
    decode_history(key, history)
}

/// The case and the history of a case value.
pub fn decode_case_with_history(
    key: &[u8],
    bytes: &[u8],
) -> Result<(Case, Vec<Position>), ProjectionError> {
    let (history, case) = split_case(key, bytes)?;
    Ok((decode(key, case)?, decode_history(key, history)?))
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

/// The last position up to `at` of a history as [`split_case`] gives it (ascending, whole
/// positions), and whether it is the last of all; read in place by binary search.
pub fn last_up_to(history: &[u8], at: Position) -> Option<(Position, bool)> {
    let count = history.len() / 8;
    let nth = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(history.get(i * 8..i * 8 + 8).unwrap_or(&[0; 8]));
        Position(u64::from_be_bytes(b))
    };
    // The number of positions up to `at`.
    let (mut lo, mut hi) = (0, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if nth(mid) <= at {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let last = lo.checked_sub(1)?;
    Some((nth(last), lo == count))
}
