//! `indexed_on`: a unique, strictly increasing time for every case and form change, and the two
//! indexes that list cases and forms in that order (the data APIs' `order_by=indexed_on`).
//!
//! CommCare's export client pages with `indexed_on_start=<the last object's indexed_on>`
//! (inclusive) and gives up when a page repeats, so more objects than a page sharing one value
//! would wedge it (commcare/API.md §4.2). Here the value is a clock folded over the log:
//!
//! - **Cases.** Each (event, case it touched) pair, in position order and, within one event, in
//!   case-id order, takes `max(received µs of the event, previous value + 1)`. A case's
//!   `indexed_on` is the value of its last change. Row `i` + position BE + case id holds it for
//!   the case's last position (only for cases that exist); row `I` holds the clock.
//! - **Forms.** Each event that brings a form version in force (accepted, or an edit) takes
//!   `max(received µs, previous + 1)` of the form clock. Row `j` + position BE + form id holds it
//!   for the version in force (accepted forms only); row `J` holds the clock. Archiving keeps a
//!   form's row (the listing filters archived forms out).
//!
//! Both values increase strictly with the key order of their index (position, then id), so the
//! index is keyed by position, a fold knows the key of the row it replaces without reading it
//! (a case's stored history ends at its last position; a form entry names the position of its
//! version in force), and a query finds `indexed_on_start` by a binary search over positions.
//! The received time is in milliseconds, so values only pass it when more than 1000 changes
//! share a millisecond, or when the clock of the server went back.

use domain::{Case, CaseId, FormEntry, FormId, Position, Timestamp};

use crate::{keys, Generation, ProjectionError};

/// The next value of a clock whose last value is `last`, for an event received at `at`.
pub(crate) fn next(last: u64, at: Timestamp) -> u64 {
    let micros = u64::try_from(at.0).unwrap_or(0).saturating_mul(1000);
    micros.max(last.saturating_add(1))
}

/// An index row's key: `prefix`, position BE, id.
pub(crate) fn key(prefix: u8, position: Position, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + id.len());
    k.push(prefix);
    k.extend_from_slice(&position.0.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// An index row's value: the `indexed_on` (µs since the epoch) and the received time of the
/// change (ms).
pub(crate) fn value(stamp: u64, at: Timestamp) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&stamp.to_be_bytes());
    v.extend_from_slice(&at.0.to_be_bytes());
    v
}

/// A decoded index row.
struct Row {
    position: Position,
    id: String,
    stamp: u64,
    at: Timestamp,
}

fn decode(key: &[u8], value: &[u8]) -> Result<Row, ProjectionError> {
    let bad = |reason: &str| ProjectionError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.into(),
    };
    let position = key
        .get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| bad("index key without a position"))?;
    let id = String::from_utf8_lossy(key.get(9..).unwrap_or_default()).into_owned();
    let stamp = value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| bad("index value shorter than 16 bytes"))?;
    let at = value
        .get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_be_bytes)
        .ok_or_else(|| bad("index value shorter than 16 bytes"))?;
    Ok(Row {
        position: Position(position),
        id,
        stamp,
        at: Timestamp(at),
    })
}

/// Reads a clock row (0 when absent).
pub(crate) fn read_clock(tree: &sled::Tree, name: &[u8]) -> Result<u64, ProjectionError> {
    match tree.get(name)? {
        Some(bytes) => keys::trailing_u64(&bytes).ok_or_else(|| ProjectionError::Decode {
            key: String::from_utf8_lossy(name).into_owned(),
            reason: format!("{} bytes, expected 8", bytes.len()),
        }),
        None => Ok(0),
    }
}

/// The clocks of a generation: the last `indexed_on` given to a case change and to a form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Clocks {
    pub(crate) case: u64,
    pub(crate) form: u64,
}

impl Clocks {
    pub(crate) fn record(self, batch: &mut sled::Batch) {
        batch.insert(keys::CASE_CLOCK, self.case.to_be_bytes().to_vec());
        batch.insert(keys::FORM_CLOCK, self.form.to_be_bytes().to_vec());
    }
}

/// Which objects of an index a query wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexedQuery {
    /// Only objects with `indexed_on >= start` (µs since the epoch).
    pub start: Option<u64>,
    /// Only objects with `indexed_on <= end`.
    pub end: Option<u64>,
    /// Objects to skip after the start.
    pub offset: usize,
    /// Objects to return at most.
    pub limit: usize,
    /// Forms only: archived forms too.
    pub include_archived: bool,
}

/// An object with its place in its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed<T> {
    /// Unique, strictly increasing in index order: µs since the epoch.
    pub indexed_on: u64,
    /// Received time of the event of the object's last change (its version in force, for a
    /// form).
    pub changed_at: Timestamp,
    /// Position of that event.
    pub position: Position,
    /// The object.
    pub item: T,
}

/// A page of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPage<T> {
    /// The objects of the page, in `indexed_on` order.
    pub items: Vec<Indexed<T>>,
    /// Every object the query matches, the page's and the others.
    pub total: u64,
}

/// The position to scan from for the rows of `prefix` with a stamp `>= start`, by binary
/// search (stamps increase with positions): the first position `lo` from which every row has
/// such a stamp, less one, since the rows of one event (several cases) may straddle `start`.
fn seek(generation: &Generation, prefix: u8, start: u64) -> Result<Position, ProjectionError> {
    let first_stamp_from = |p: u64| -> Result<Option<u64>, ProjectionError> {
        let from = key(prefix, Position(p), "");
        match generation.tree.range(from..).next().transpose()? {
            Some((k, v)) if k.first() == Some(&prefix) => Ok(Some(decode(&k, &v)?.stamp)),
            _ => Ok(None),
        }
    };
    let (mut lo, mut hi) = (0u64, generation.checkpoint().0.saturating_add(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match first_stamp_from(mid)? {
            Some(s) if s < start => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(Position(lo.saturating_sub(1)))
}

/// Walks the rows of `prefix` the query matches, calling `keep` on each to filter and load it.
fn page<T>(
    generation: &Generation,
    prefix: u8,
    query: &IndexedQuery,
    mut load: impl FnMut(&str) -> Result<Option<T>, ProjectionError>,
    mut keep: impl FnMut(&T) -> bool,
) -> Result<IndexedPage<T>, ProjectionError> {
    let from = match query.start {
        Some(start) => seek(generation, prefix, start)?,
        None => Position(0),
    };
    let mut items = Vec::new();
    let mut total = 0u64;
    let mut skipped = 0usize;
    for entry in generation.tree.range(key(prefix, from, "")..) {
        let (k, v) = entry?;
        if k.first() != Some(&prefix) {
            break;
        }
        let row = decode(&k, &v)?;
        if query.start.is_some_and(|s| row.stamp < s) {
            continue;
        }
        if query.end.is_some_and(|e| row.stamp > e) {
            break;
        }
        let wanted = skipped >= query.offset && items.len() < query.limit;
        // Counting needs the object only when the listing filters on it.
        let object = if wanted || prefix == keys::FORM_INDEXED {
            load(&row.id)?
        } else {
            None
        };
        if prefix == keys::FORM_INDEXED && !object.as_ref().is_some_and(&mut keep) {
            continue;
        }
        total += 1;
        if skipped < query.offset {
            skipped += 1;
            continue;
        }
        if let (true, Some(item)) = (wanted, object) {
            items.push(Indexed {
                indexed_on: row.stamp,
                changed_at: row.at,
                position: row.position,
                item,
            });
        }
    }
    Ok(IndexedPage { items, total })
}

/// Cases in `indexed_on` order.
pub(crate) fn cases(
    generation: &Generation,
    query: &IndexedQuery,
) -> Result<IndexedPage<Case>, ProjectionError> {
    page(
        generation,
        keys::CASE_INDEXED,
        query,
        |id| generation.load_case(&CaseId::new(id)),
        |_| true,
    )
}

/// Accepted forms in `indexed_on` order, with their ids; archived ones only when asked.
pub(crate) fn forms(
    generation: &Generation,
    query: &IndexedQuery,
) -> Result<IndexedPage<(FormId, FormEntry)>, ProjectionError> {
    page(
        generation,
        keys::FORM_INDEXED,
        query,
        |id| {
            let id = FormId::new(id);
            Ok(generation.load_form(&id)?.map(|e| (id, e)))
        },
        |(_, e)| e.accepted && (query.include_archived || !e.archived),
    )
}

/// The index row of one case or form, by id, with its object: for `/case/{id}/`.
pub(crate) fn case_row(
    generation: &Generation,
    case: &Case,
    history_last: Option<Position>,
) -> Result<Option<(u64, Timestamp)>, ProjectionError> {
    let Some(p) = history_last else {
        return Ok(None);
    };
    let k = key(keys::CASE_INDEXED, p, case.case_id.as_str());
    match generation.tree.get(&k)? {
        Some(v) => decode(&k, &v).map(|r| Some((r.stamp, r.at))),
        None => Ok(None),
    }
}

/// The index row of a form's version in force.
pub(crate) fn form_row(
    generation: &Generation,
    id: &FormId,
    entry: &FormEntry,
) -> Result<Option<(u64, Timestamp)>, ProjectionError> {
    let k = key(keys::FORM_INDEXED, entry.position, id.as_str());
    match generation.tree.get(&k)? {
        Some(v) => decode(&k, &v).map(|r| Some((r.stamp, r.at))),
        None => Ok(None),
    }
}
