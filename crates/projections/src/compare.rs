//! Key-by-key comparison of two generations: the live one and a rebuild from the log
//! (`caseledger replay --verify`). By I3 they hold the same values; every key where they do not
//! is a [`Difference`], named by its kind and id with a summary of each side.

use domain::Directory;

use crate::{codec, keys, past, DiagnosticRow, FormEntry, Generation, ProjectionError};

/// What a projection key holds, from its prefix (`keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyKind {
    /// A case and its history, under its owner.
    Case,
    /// The owner of a case: where its row is.
    Owner,
    /// An entry of the reverse index (extensions, R45).
    Reverse,
    /// A form's status.
    Form,
    /// A diagnostic.
    Diagnostic,
    /// A deleted case's history.
    Tombstone,
    /// The users, groups and apps.
    Directory,
    /// The checkpoint.
    Checkpoint,
    /// A case as of an event (time travel).
    CaseVersion,
    /// A case leaving an owner (time travel).
    OwnerDeparture,
    /// A directory event (time travel).
    DirectoryEvent,
    /// A case's or form's `indexed_on` row, or one of their clocks.
    Indexed,
    /// A key this code does not know.
    Other,
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyKind::Case => "case",
            KeyKind::Owner => "owner-index",
            KeyKind::Reverse => "reverse-index",
            KeyKind::Form => "form",
            KeyKind::Diagnostic => "diagnostic",
            KeyKind::Tombstone => "tombstone",
            KeyKind::Directory => "directory",
            KeyKind::Checkpoint => "checkpoint",
            KeyKind::CaseVersion => "case-version",
            KeyKind::OwnerDeparture => "owner-departure",
            KeyKind::DirectoryEvent => "directory-event",
            KeyKind::Indexed => "indexed-on",
            KeyKind::Other => "other",
        })
    }
}

/// One key where the live projections and a rebuild from the log disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// What the key holds.
    pub kind: KeyKind,
    /// The id the key names (`owner/case`, case id, `target/case`, form id, `@position#n`), or
    /// empty for the directory and the checkpoint.
    pub id: String,
    /// The live value, summarised; `None` when the live generation lacks the key.
    pub live: Option<String>,
    /// The rebuilt value, summarised; `None` when the rebuild lacks the key.
    pub rebuilt: Option<String>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
        write!(
            f,
            "{} {}: live {} | rebuilt {}",
            self.kind,
            self.id,
            side(&self.live),
            side(&self.rebuilt)
        )
    }
}

/// Every key where `live` and `rebuilt` differ, in key order. Values that differ in bytes but
/// decode to equal values are equal.
pub(crate) fn generations(
    live: &Generation,
    rebuilt: &Generation,
) -> Result<Vec<Difference>, ProjectionError> {
    let mut out = Vec::new();
    let mut a = live.tree.iter();
    let mut b = rebuilt.tree.iter();
    let mut next_a = a.next().transpose()?;
    let mut next_b = b.next().transpose()?;
    loop {
        match (&next_a, &next_b) {
            (None, None) => break,
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                if va != vb {
                    if let Some(d) = differ(ka, Some(va), Some(vb)) {
                        out.push(d);
                    }
                }
                next_a = a.next().transpose()?;
                next_b = b.next().transpose()?;
            }
            (Some((ka, va)), Some((kb, _))) if ka < kb => {
                out.extend(differ(ka, Some(va), None));
                next_a = a.next().transpose()?;
            }
            (Some((ka, va)), None) => {
                out.extend(differ(ka, Some(va), None));
                next_a = a.next().transpose()?;
            }
            (_, Some((kb, vb))) => {
                out.extend(differ(kb, None, Some(vb)));
                next_b = b.next().transpose()?;
            }
        }
    }
    Ok(out)
}

/// The difference at `key`, or `None` when both sides decode to equal values.
fn differ(key: &[u8], live: Option<&[u8]>, rebuilt: Option<&[u8]>) -> Option<Difference> {
    let kind = kind(key);
    let live_v = live.map(|v| describe(kind, key, v));
    let rebuilt_v = rebuilt.map(|v| describe(kind, key, v));
    if let (Some(l), Some(r)) = (&live_v, &rebuilt_v) {
        if l.full.is_some() && l.full == r.full {
            return None;
        }
    }
    // Short summaries that read the same would hide the difference: show the whole values.
    let same_summary =
        matches!((&live_v, &rebuilt_v), (Some(l), Some(r)) if l.summary == r.summary);
    let shown = |d: Option<Described>| {
        d.map(|d| match (same_summary, d.full) {
            (true, Some(full)) => full,
            (_, _) => d.summary,
        })
    };
    Some(Difference {
        kind,
        id: id(kind, key),
        live: shown(live_v),
        rebuilt: shown(rebuilt_v),
    })
}

fn kind(key: &[u8]) -> KeyKind {
    if key == keys::DIRECTORY {
        return KeyKind::Directory;
    }
    if key == keys::CHECKPOINT {
        return KeyKind::Checkpoint;
    }
    if key == keys::CASE_CLOCK || key == keys::FORM_CLOCK {
        return KeyKind::Indexed;
    }
    match key.first() {
        Some(&keys::CASE) => KeyKind::Case,
        Some(&keys::OWNER) => KeyKind::Owner,
        Some(&keys::REVERSE) => KeyKind::Reverse,
        Some(&keys::FORM) => KeyKind::Form,
        Some(&keys::DIAGNOSTIC) => KeyKind::Diagnostic,
        Some(&keys::TOMBSTONE) => KeyKind::Tombstone,
        Some(&keys::VERSION) => KeyKind::CaseVersion,
        Some(&keys::DEPARTED) => KeyKind::OwnerDeparture,
        Some(&keys::DIRECTORY_EVENT) => KeyKind::DirectoryEvent,
        Some(&keys::CASE_INDEXED | &keys::FORM_INDEXED) => KeyKind::Indexed,
        _ => KeyKind::Other,
    }
}

/// The id a key names, readable.
fn id(kind: KeyKind, key: &[u8]) -> String {
    let rest = key.get(1..).unwrap_or_default();
    match kind {
        KeyKind::Owner | KeyKind::Form | KeyKind::Tombstone => {
            String::from_utf8_lossy(rest).into_owned()
        }
        KeyKind::Case | KeyKind::Reverse => {
            let len = rest
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, |b| u32::from_be_bytes(b) as usize);
            let body = rest.get(4..).unwrap_or_default();
            let split = len.min(body.len());
            let (a, b) = body.split_at(split);
            format!(
                "{}/{}",
                String::from_utf8_lossy(a),
                String::from_utf8_lossy(b)
            )
        }
        KeyKind::Diagnostic => {
            let position = rest
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            let n = rest
                .get(8..12)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_be_bytes);
            format!("@{position}#{n}")
        }
        KeyKind::Directory | KeyKind::Checkpoint => String::new(),
        KeyKind::CaseVersion | KeyKind::OwnerDeparture | KeyKind::DirectoryEvent => {
            // The id (or owner and id) then a big-endian position.
            let split = rest.len().saturating_sub(8);
            let (name, position) = rest.split_at(split);
            let position = <[u8; 8]>::try_from(position).map_or(0, u64::from_be_bytes);
            let name: Vec<u8> = name.iter().copied().filter(|b| *b != 0).collect();
            format!("{}@{position}", String::from_utf8_lossy(&name))
        }
        KeyKind::Indexed => {
            // A position then an id; a clock is its one-letter name.
            let position = rest.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok());
            match position {
                Some(p) => format!(
                    "{}@{}",
                    String::from_utf8_lossy(rest.get(8..).unwrap_or_default()),
                    u64::from_be_bytes(p)
                ),
                None => String::from_utf8_lossy(key).into_owned(),
            }
        }
        KeyKind::Other => String::from_utf8_lossy(key).into_owned(),
    }
}

/// A value as a short summary, and in full when it decodes.
struct Described {
    summary: String,
    full: Option<String>,
}

fn describe(kind: KeyKind, key: &[u8], bytes: &[u8]) -> Described {
    let decoded = |r: Result<(String, String), ProjectionError>| match r {
        Ok((summary, full)) => Described {
            summary,
            full: Some(full),
        },
        Err(e) => Described {
            summary: format!("undecodable {} bytes ({e})", bytes.len()),
            full: None,
        },
    };
    match kind {
        KeyKind::Case => decoded(codec::decode_case_row(key, bytes).and_then(|(c, h, past)| {
            let back = past::len(key, past)?;
            Ok((
                format!(
                    "owner {}, {}, type {}, name {:?}, {} properties, {} forms, history of {} events, {back} back",
                    c.owner_id,
                    if c.closed { "closed" } else { "open" },
                    c.case_type,
                    c.case_name,
                    c.properties.len(),
                    c.xform_ids.len(),
                    h.len()
                ),
                format!("{c:?} history {h:?} past {past:?}"),
            ))
        })),
        KeyKind::Owner => {
            let owner = format!("owner {}", String::from_utf8_lossy(bytes));
            Described {
                full: Some(owner.clone()),
                summary: owner,
            }
        }
        KeyKind::Reverse => flag(bytes, "extension", "child"),
        KeyKind::Form => decoded(codec::decode::<FormEntry>(key, bytes).map(|f| {
            let mut s = format!(
                "{} @{} (first @{})",
                if f.accepted { "accepted" } else { "rejected" },
                f.position,
                f.original
            );
            if f.archived {
                s.push_str(", archived");
            }
            s.push_str(&format!(", {} case(s)", f.case_ids.len()));
            (s, format!("{f:?}"))
        })),
        KeyKind::Diagnostic => decoded(codec::decode::<DiagnosticRow>(key, bytes).map(|d| {
            (
                format!(
                    "{:?} {} @{}: {}",
                    d.diagnostic.code, d.diagnostic.subject, d.position, d.diagnostic.detail
                ),
                format!("{d:?}"),
            )
        })),
        KeyKind::Tombstone => decoded(codec::decode_history(key, bytes).map(|h| {
            (
                format!("deleted, history of {} events", h.len()),
                format!("{h:?}"),
            )
        })),
        KeyKind::Directory => decoded(codec::decode::<Directory>(key, bytes).map(|d| {
            (
                format!(
                    "{} users, {} groups, {} apps",
                    d.users.len(),
                    d.groups.len(),
                    d.apps.len()
                ),
                format!("{d:?}"),
            )
        })),
        KeyKind::Checkpoint => match keys::trailing_u64(bytes) {
            Some(p) if bytes.len() == 8 => Described {
                summary: format!("@{p}"),
                full: Some(format!("@{p}")),
            },
            _ => Described {
                summary: format!("undecodable {} bytes", bytes.len()),
                full: None,
            },
        },
        KeyKind::CaseVersion
        | KeyKind::OwnerDeparture
        | KeyKind::DirectoryEvent
        | KeyKind::Indexed
        | KeyKind::Other => {
            Described {
                summary: format!("{} bytes", bytes.len()),
                full: Some(format!("{bytes:?}")),
            }
        }
    }
}

/// A one-byte index value: 1 is `one`, 0 is `zero`.
fn flag(bytes: &[u8], one: &str, zero: &str) -> Described {
    let summary = match bytes {
        [1] => one.to_owned(),
        [0] => zero.to_owned(),
        other => format!("unexpected {other:?}"),
    };
    Described {
        full: Some(summary.clone()),
        summary,
    }
}
