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
/// 8-byte big-endian positions); its past (`past`: a u32 big-endian length, then its bytes);
/// then the bincode case. History and past before the case, so that time travel reads them
/// without decoding the case.
pub fn encode_case(case: &Case, history: &[Position], past: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + 8 * history.len() + past.len() + 512);
    out.push(u8::from(case.closed));
    push_u32(&mut out, history.len());
    encode_history_into(&mut out, history);
    push_u32(&mut out, past.len());
    out.extend_from_slice(past);
    bincode::serde::encode_into_std_write(case, &mut out, bincode::config::standard())
        .unwrap_or_default();
    out
}

fn push_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

/// Appends positions as 8-byte big-endian integers (a tombstone's value is just this).
pub fn encode_history_into(out: &mut Vec<u8>, history: &[Position]) {
    for p in history {
        out.extend_from_slice(&p.to_be_bytes());
    }
}

/// The parts of a case value, undecoded.
pub struct CaseRow<'b> {
    /// Whole positions, ascending: see [`history_index`].
    pub history: &'b [u8],
    /// The case's past (`past`).
    pub past: &'b [u8],
    /// The bincode case.
    pub case: &'b [u8],
}

/// Splits a case value into its parts.
pub fn split_case<'b>(key: &[u8], bytes: &'b [u8]) -> Result<CaseRow<'b>, ProjectionError> {
    let bad =
        |what: &str| decode_error(key, format!("case value of {} bytes: {what}", bytes.len()));
    // A u32 BE count of `unit`-byte items at `at`, and the bytes after those items.
    let counted = |at: usize, unit: usize| -> Option<(&'b [u8], usize)> {
        let count = bytes.get(at..at + 4)?;
        let count = usize::try_from(u32::from_be_bytes(count.try_into().ok()?)).ok()?;
        let end = (at + 4).checked_add(count.checked_mul(unit)?)?;
        Some((bytes.get(at + 4..end)?, end))
    };
    let (history, end) = counted(1, 8).ok_or_else(|| bad("history overruns it"))?;
    let (past, end) = counted(end, 1).ok_or_else(|| bad("past overruns it"))?;
    Ok(CaseRow {
        history,
        past,
        case: bytes.get(end..).unwrap_or_default(),
    })
}

/// True when a case value says its case is closed.
pub fn case_closed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&1)
}

/// The case, the history and the past (undecoded) of a case value.
pub fn decode_case_row<'b>(
    key: &[u8],
    bytes: &'b [u8],
) -> Result<(Case, Vec<Position>, &'b [u8]), ProjectionError> {
    let row = split_case(key, bytes)?;
    Ok((
        decode(key, row.case)?,
        decode_history(key, row.history)?,
        row.past,
    ))
}

/// The case of a case value, without decoding its history.
pub fn decode_case(key: &[u8], bytes: &[u8]) -> Result<Case, ProjectionError> {
    decode(key, split_case(key, bytes)?.case)
}

/// The history of a case value, without decoding the case.
pub fn decode_case_history(key: &[u8], bytes: &[u8]) -> Result<Vec<Position>, ProjectionError> {
    decode_history(key, split_case(key, bytes)?.history)
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

/// Where the last position up to `at` is in a history as [`split_case`] gives it (ascending,
/// whole positions), and how many positions it holds; read in place by binary search. `None`
/// when every position is after `at`.
pub fn history_index(history: &[u8], at: Position) -> Option<(usize, usize)> {
    let count = history.len() / 8;
    // The number of positions up to `at`.
    let (mut lo, mut hi) = (0, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if history_at(history, mid) <= at {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Some((lo.checked_sub(1)?, count))
}

/// The `i`th position of a history as [`split_case`] gives it (0 past its end).
pub fn history_at(history: &[u8], i: usize) -> Position {
    let mut b = [0u8; 8];
    if let Some(bytes) = history.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(bytes);
    }
    Position(u64::from_be_bytes(b))
}
