//! Key layout of a projection tree. One tree holds every projection of one generation so that a
//! single `sled::Batch` (atomic) writes all of them together with the checkpoint (I4).
//!
//! | prefix | key rest | value |
//! | --- | --- | --- |
//! | `c` | u32 BE owner length, owner id, case id | 1 = closed, its history (u32 BE count, positions BE), then bincode [`domain::Case`] (`codec`) |
//! | `o` | case id | its owner id: where its `c` row is |
//! | `f` | form id | bincode `FormEntry` |
//! | `d` | position BE, u32 BE index | bincode diagnostic row |
//! | `r` | u32 BE target length, target case id, case id | 1 = extension, 0 = child |
//! | `x` | case id | history of a deleted case: positions BE (its tombstone) |
//! | `v` | position BE | the event at that position and every case it touched as it left them (`asof`) |
//! | `h` | u32 BE owner length, owner id, case id, position BE | empty: the case left this owner at that position (moved or deleted) |
//! | `y` | position BE | bincode [`domain::RecordedEvent`] of a directory event |
//! | `i` | position BE, case id | `indexed_on` µs BE, received ms BE: the case's last change (`indexed`) |
//! | `j` | position BE, form id | `indexed_on` µs BE, received ms BE: an accepted form's version in force |
//! | `I` | — | the case `indexed_on` clock, µs BE |
//! | `J` | — | the form `indexed_on` clock, µs BE |
//! | `D` | — | bincode [`domain::Directory`] |
//! | `K` | — | checkpoint position BE |
//!
//! Length prefixes keep one id from being a prefix of another (`u-1` vs `u-10`).
//!
//! Cases are keyed by their owner, so that an owner's cases are one range of the tree: a case
//! list, now or as of a position, is a range scan instead of a point read per case (sled 0.34.7
//! pulls a whole leaf of up to 16 entries for each point read that misses its cache). The `o`
//! row finds a case by id; it is written only when the case appears, moves or is deleted.

pub const CASE: u8 = b'c';
pub const OWNER: u8 = b'o';
pub const FORM: u8 = b'f';
pub const DIAGNOSTIC: u8 = b'd';
pub const REVERSE: u8 = b'r';
pub const TOMBSTONE: u8 = b'x';
pub const VERSION: u8 = b'v';
pub const DEPARTED: u8 = b'h';
pub const DIRECTORY_EVENT: u8 = b'y';
pub const CASE_INDEXED: u8 = b'i';
pub const FORM_INDEXED: u8 = b'j';
pub const CASE_CLOCK: &[u8] = b"I";
pub const FORM_CLOCK: &[u8] = b"J";
pub const DIRECTORY: &[u8] = b"D";
pub const CHECKPOINT: &[u8] = b"K";

/// Prefix of the cases `owner` holds.
pub fn case_prefix(owner: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + owner.len() + 40);
    k.push(CASE);
    k.extend_from_slice(&u32::try_from(owner.len()).unwrap_or(u32::MAX).to_be_bytes());
    k.extend_from_slice(owner);
    k
}

/// The row of case `id`, held by `owner`.
pub fn case(owner: &[u8], id: &str) -> Vec<u8> {
    let mut k = case_prefix(owner);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The row naming the owner of case `id`.
pub fn owner(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(OWNER);
    k.extend_from_slice(id.as_bytes());
    k
}

fn len_prefixed(prefix: u8, a: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + a.len() + 16);
    k.push(prefix);
    k.extend_from_slice(&u32::try_from(a.len()).unwrap_or(u32::MAX).to_be_bytes());
    k.extend_from_slice(a.as_bytes());
    k
}

pub fn form(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(FORM);
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn diagnostic(position: u64, n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(DIAGNOSTIC);
    k.extend_from_slice(&position.to_be_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The trailing 8 bytes of a key as a big-endian u64.
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    let bytes: [u8; 8] = key.get(start..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub fn reverse_prefix(target: &str) -> Vec<u8> {
    len_prefixed(REVERSE, target)
}

pub fn reverse(target: &str, case: &str) -> Vec<u8> {
    let mut k = reverse_prefix(target);
    k.extend_from_slice(case.as_bytes());
    k
}

pub fn tombstone(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(TOMBSTONE);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The version row of the event at `position`. Keyed by position, so the live fold appends it
/// at the end of the tree (a random key costs sled several times more).
pub fn version(position: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(VERSION);
    k.extend_from_slice(&position.to_be_bytes());
    k
}

/// Prefix of the rows of cases that left `owner`.
pub fn departed_prefix(owner: &str) -> Vec<u8> {
    len_prefixed(DEPARTED, owner)
}

/// The row saying `case` left `owner` at `position`.
pub fn departed(owner: &str, case: &str, position: u64) -> Vec<u8> {
    let mut k = departed_prefix(owner);
    k.extend_from_slice(case.as_bytes());
    k.extend_from_slice(&position.to_be_bytes());
    k
}

/// The row of the directory event at `position`.
pub fn directory_event(position: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(DIRECTORY_EVENT);
    k.extend_from_slice(&position.to_be_bytes());
    k
}
