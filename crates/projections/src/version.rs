//! What the stored projections were written by: a *layout* version and a *rules* version.
//!
//! - The layout ([`LAYOUT_VERSION`]) is the key layout of `keys` and the value encodings of
//!   `codec`: what this code can read. Projections of another layout are unreadable here, so they
//!   are rebuilt from the log before anything answers ([`crate::Damage::Layout`], I10).
//! - The rules ([`RULES_VERSION`]) are the semantics of the fold: what `Pending`, `bulk` and the
//!   time-travel rows write for a given stream of events, with the `domain` folds they call. A
//!   rule change or a bug fix changes what the fold writes, not how it is read: projections of
//!   other rules still read, so they keep answering while a generation folded by these rules is
//!   built beside them and swapped in (the engine's upgrade rebuild).
//!
//! Both are recorded in the meta tree and written in the batch that installs a generation, so
//! they always describe the active one.

use crate::{keys, Damage};

/// The layout version of the projections this code writes and reads: the key layout of `keys`
/// and the value encodings of `codec`. Change it with any change to either; a store whose
/// projections carry another layout is rebuilt from the log before it answers (I2). A store
/// written before versions were recorded has layout 1.
///
/// - 1: cases, owner and reverse indexes, forms, tombstones, diagnostics, directory, checkpoint.
/// - 2: case values hold their history first; plus the time-travel rows (`v` version rows by
///   position, `h` owner departures, `y` directory events).
/// - 3: cases keyed by owner then id, their value led by the closed flag; the owner index maps a
///   case id to its owner.
/// - 4: case values hold the case's past (`past`) between its history and the case.
/// - 5: the directory holds credentials (users' password hashes, API keys).
/// - 6: the `indexed_on` indexes of cases and forms and their clocks (`i`, `j`, `I`, `J`).
pub const LAYOUT_VERSION: u64 = 6;

/// The rules version of the fold this code runs: change it with any change to what the fold
/// writes for the same events when the layout stays readable (a rule of SEMANTICS.md, a bug fix
/// in `Pending`, `bulk`, the time-travel rows or `domain::fold`). A store whose projections were
/// folded by other rules keeps answering from them until a rebuild by these rules is installed.
/// A store written before rules versions were recorded has rules 1.
///
/// - 1: the fold as of the split of the projection version into layout and rules.
pub const RULES_VERSION: u64 = 1;

/// The rules of a store whose meta tree predates the rules record.
const RULES_BEFORE_RECORD: u64 = 1;

/// The layout of a store whose meta tree predates the layout record.
const LAYOUT_BEFORE_RECORD: u64 = 1;

/// The meta record of the layout version; named `version` because it was the only version
/// before the split, so stores written then read as they are.
pub(crate) const LAYOUT_KEY: &[u8] = b"version";

/// The meta record of the rules version.
pub(crate) const RULES_KEY: &[u8] = b"rules";

/// What a generation of projections was written by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionVersion {
    /// Key layout and value encodings ([`LAYOUT_VERSION`]).
    pub layout: u64,
    /// Semantics of the fold ([`RULES_VERSION`]).
    pub rules: u64,
}

impl ProjectionVersion {
    /// What this code writes.
    pub const CURRENT: ProjectionVersion = ProjectionVersion {
        layout: LAYOUT_VERSION,
        rules: RULES_VERSION,
    };

    /// Adds the records of this version to `batch` (of the meta tree).
    pub(crate) fn record(self, batch: &mut sled::Batch) {
        batch.insert(LAYOUT_KEY, self.layout.to_be_bytes().to_vec());
        batch.insert(RULES_KEY, self.rules.to_be_bytes().to_vec());
    }
}

impl std::fmt::Display for ProjectionVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layout {}, rules {}", self.layout, self.rules)
    }
}

/// What the meta tree records: the version, and whether a record was missing (a fresh store, or
/// one written before the record existed) and should be written.
pub(crate) struct Stored {
    pub(crate) version: ProjectionVersion,
    pub(crate) missing: bool,
}

/// Reads the version records of `meta`; `has_active` tells a fresh store (no generation yet,
/// so this code's version) from one written before a record existed. A record that cannot be
/// read is noted in `found` and read as absent.
pub(crate) fn stored(meta: &sled::Tree, has_active: bool, found: &mut Vec<Damage>) -> Stored {
    let layout = meta_record(meta, LAYOUT_KEY, "layout version", found);
    let rules = meta_record(meta, RULES_KEY, "rules version", found);
    let version = match (layout, rules) {
        (None, None) if !has_active => ProjectionVersion::CURRENT,
        _ => ProjectionVersion {
            layout: layout.unwrap_or(LAYOUT_BEFORE_RECORD),
            rules: rules.unwrap_or(RULES_BEFORE_RECORD),
        },
    };
    Stored {
        version,
        missing: layout.is_none() || rules.is_none(),
    }
}

/// The version the meta tree records, `None` when the layout record is absent or unreadable.
pub(crate) fn recorded(meta: &sled::Tree) -> Option<ProjectionVersion> {
    let read = |key| match meta.get(key) {
        Ok(Some(bytes)) => Some(keys::trailing_u64(&bytes)),
        Ok(None) => None,
        Err(_) => Some(None),
    };
    let layout = read(LAYOUT_KEY).flatten()?;
    let rules = match read(RULES_KEY) {
        Some(rules) => rules?,
        None => RULES_BEFORE_RECORD,
    };
    Some(ProjectionVersion { layout, rules })
}

/// A u64 record of the meta tree; a record that cannot be read is noted in `found` as damage and
/// read as absent.
pub(crate) fn meta_record(
    meta: &sled::Tree,
    key: &[u8],
    what: &str,
    found: &mut Vec<Damage>,
) -> Option<u64> {
    match meta.get(key) {
        Ok(Some(bytes)) => {
            let value = keys::trailing_u64(&bytes);
            if value.is_none() {
                found.push(Damage::Meta {
                    reason: format!("{what} record of {} bytes", bytes.len()),
                });
            }
            value
        }
        Ok(None) => None,
        Err(e) => {
            found.push(Damage::Meta {
                reason: e.to_string(),
            });
            None
        }
    }
}
