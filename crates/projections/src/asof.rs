//! Time travel: every projection as of a log position, case history and conflict forensics.
//!
//! The fold writes three kinds of rows beside the current state (see `keys`), and keeps a
//! case's recent past in its own row (`past`):
//! - a **version row** per event that touched cases, keyed by its position: the event's time,
//!   form, user and app, and every case it touched as it left them (`None` once deleted). A
//!   case's history (already in its value) names its events; history diffs consecutive rows. Keyed by position, the live fold appends them at the end
//!   of the tree: per (case, event) keys cost the forms bench a third of its throughput.
//! - a **departure row** each time a case leaves an owner (moved, or deleted): with the owner
//!   index of now, the candidates of an owner's case list at any position, each checked
//!   against its version then.
//! - a **directory row** per directory event: memberships and sharing flags at any position
//!   are a fold of those few rows, without reading the log.
//! - a case's row (keyed by owner, so an owner's cases are one range) holds its history and its
//!   **past**: how to go back from the case now to the case after each of its last 16 events.
//!   `case_at` and an owner's list as of a position answer from the row, through the past, and
//!   read a version row only for a case touched more often than that since the position. A
//!   point read per listed case (a sled leaf pulled for each) was what the list cost: 240 ms
//!   p99 at 1 000 000 events with a point read of the case and of its version, 29 ms with
//!   neither (docs/PERFORMANCE.md).
//!
//! Rows are written by the same fold as the current state ([`crate::Pending`], the bulk
//! rebuild), so `X_at(p)` answers from the same recorded facts as a replay of the log up to `p`
//! (`tests/it/timetravel.rs` checks this on random streams).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use domain::{
    AppId, Case, CaseChange, CaseId, CaseTimeline, Conflict, Directory, Event, FormEntry, FormId,
    Index, Position, RecordedEvent, Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::{codec, keys, past, DiagnosticRow, GroupView, ProjectionError, Projections};

/// What a form event did, as a version row records it (the variant order is the stored index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Action {
    Accepted,
    Edited,
    Archived,
    Unarchived,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Accepted => "accepted",
            Action::Edited => "edited",
            Action::Archived => "archived",
            Action::Unarchived => "unarchived",
        }
    }
}

/// What a version row says about the event that made it, so that history needs no log read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VersionMeta {
    /// Server received time of the event.
    pub(crate) recorded_at: Timestamp,
    /// What the event did.
    pub(crate) action: Action,
    /// The form.
    pub(crate) form: FormId,
    /// Its `meta/userID`.
    pub(crate) user: Option<String>,
    /// The app it came through.
    pub(crate) app: Option<AppId>,
    /// For an edit, the version it replaced.
    pub(crate) replaces: Option<Position>,
}

impl VersionMeta {
    /// The metadata of a form event recorded at `ev`, with `entry` the form's entry after it
    /// (archives carry no user or app of their own). `None` for events that touch no case.
    pub(crate) fn of(ev: &RecordedEvent, entry: Option<&FormEntry>) -> Option<Self> {
        let (action, form, user, app, replaces) = match &ev.event {
            Event::FormAcceptedV1(f) => (
                Action::Accepted,
                &f.form.form_id,
                f.form.user_id.clone(),
                f.form.app_id.clone(),
                None,
            ),
            Event::FormEditedV1(f) => (
                Action::Edited,
                &f.form.form_id,
                f.form.user_id.clone(),
                f.form.app_id.clone(),
                Some(f.replaces),
            ),
            Event::FormArchivedV1(a) | Event::FormUnarchivedV1(a) => (
                if matches!(ev.event, Event::FormArchivedV1(_)) {
                    Action::Archived
                } else {
                    Action::Unarchived
                },
                &a.form_id,
                entry.and_then(|e| e.user_id.clone()),
                entry.and_then(|e| e.app_id.clone()),
                None,
            ),
            _ => return None,
        };
        Some(VersionMeta {
            recorded_at: ev.recorded_at,
            action,
            form: form.clone(),
            user,
            app,
            replaces,
        })
    }
}

/// A version row's value: the event's metadata, then every case it touched (sorted by id) as
/// it left them. Laid out by hand so that a reader finds one case without decoding the others,
/// and can decode a case without its `xform_ids` (history, whose diffs do not need them: a case
/// of 1 000 changes carries 1 000 form ids in its last versions):
///
/// `u32 BE meta length, bincode meta, u32 BE count, count × part`, where a part is
/// `u32 BE id length, id, u32 BE case length, bincode case` and a length of 0 means deleted.
pub(crate) fn encode_version(meta: &VersionMeta, cases: &[(&str, Option<&Case>)]) -> Vec<u8> {
    let meta = codec::encode(meta);
    let mut out = Vec::with_capacity(8 + meta.len() + 600 * cases.len());
    push_len(&mut out, meta.len());
    out.extend_from_slice(&meta);
    push_len(&mut out, cases.len());
    for (id, case) in cases {
        out.extend_from_slice(&encode_part(id, *case));
    }
    out
}

/// One case's part of a version row.
pub(crate) fn encode_part(id: &str, case: Option<&Case>) -> Vec<u8> {
    let case = case.map(codec::encode).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + id.len() + case.len());
    push_len(&mut out, id.len());
    out.extend_from_slice(id.as_bytes());
    push_len(&mut out, case.len());
    out.extend_from_slice(&case);
    out
}

/// Appends a length as a u32 BE (lengths here are far below 4 GiB: ids are capped, values too).
pub(crate) fn push_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

/// Reads a u32 BE length at `at`, and the bytes it announces after it.
fn take<'b>(bytes: &'b [u8], at: &mut usize) -> Option<&'b [u8]> {
    let len = bytes.get(*at..*at + 4)?;
    let len = usize::try_from(u32::from_be_bytes(len.try_into().ok()?)).ok()?;
    let start = *at + 4;
    let out = bytes.get(start..start.checked_add(len)?)?;
    *at = start + len;
    Some(out)
}

/// The bincode metadata of a version row and the bincode of one case in it (empty: deleted);
/// `None` for the case when the row does not name it. Decodes neither.
fn find_in_row<'b>(
    key: &[u8],
    value: &'b [u8],
    id: &str,
) -> Result<(&'b [u8], Option<&'b [u8]>), ProjectionError> {
    let bad = || ProjectionError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("version row of {} bytes is cut short", value.len()),
    };
    let mut at = 0;
    let meta = take(value, &mut at).ok_or_else(bad)?;
    let count = value
        .get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(bad)?;
    at += 4;
    for _ in 0..count {
        let found = take(value, &mut at).ok_or_else(bad)?;
        let case = take(value, &mut at).ok_or_else(bad)?;
        if found == id.as_bytes() {
            return Ok((meta, Some(case)));
        }
    }
    Ok((meta, None))
}

/// The fields of a [`Case`] before its `xform_ids`, in its order: bincode reads a struct's fields
/// in order, so this decodes a stored case without its form ids (checked by a test).
#[derive(Deserialize)]
struct CaseHead {
    case_id: CaseId,
    case_type: String,
    case_name: String,
    owner_id: String,
    user_id: String,
    external_id: Option<String>,
    opened_on: Option<Timestamp>,
    opened_by: Option<String>,
    modified_on: Option<Timestamp>,
    modified_on_by: Option<String>,
    closed: bool,
    closed_on: Option<Timestamp>,
    closed_by: Option<String>,
    properties: BTreeMap<String, String>,
    indices: BTreeMap<String, Index>,
    attachments: BTreeMap<String, domain::Attachment>,
}

impl From<CaseHead> for Case {
    fn from(h: CaseHead) -> Case {
        Case {
            case_id: h.case_id,
            case_type: h.case_type,
            case_name: h.case_name,
            owner_id: h.owner_id,
            user_id: h.user_id,
            external_id: h.external_id,
            opened_on: h.opened_on,
            opened_by: h.opened_by,
            modified_on: h.modified_on,
            modified_on_by: h.modified_on_by,
            closed: h.closed,
            closed_on: h.closed_on,
            closed_by: h.closed_by,
            properties: h.properties,
            indices: h.indices,
            attachments: h.attachments,
            xform_ids: Vec::new(),
        }
    }
}

/// The cases of one version row as the fold collects them: id and state after the event.
pub(crate) type RowCases<'a> = Vec<(&'a str, Option<&'a Case>)>;

/// The owners a case left, and where: given its owner before (`None`: absent or deleted) and its
/// versions in position order, each change of owner or deletion is a departure of the owner it
/// had.
pub(crate) fn departures<'a>(
    before: Option<&'a str>,
    versions: impl IntoIterator<Item = (Position, Option<&'a Case>)>,
) -> Vec<(&'a str, Position)> {
    let mut owner = before;
    let mut out = Vec::new();
    for (p, case) in versions {
        let now = case.map(|c| c.owner_id.as_str());
        if let Some(o) = owner {
            if now != Some(o) {
                out.push((o, p));
            }
        }
        owner = now;
    }
    out
}

/// Where a stored case's state as of a position is.
enum Last {
    /// No event up to the position touched it.
    NotYet,
    /// In its row: nothing touched it since.
    Now,
    /// As the event at `position` left it, `back` events before its last.
    At { position: Position, back: usize },
}

/// A version row that a case's history names is missing, or does not name the case.
fn missing_version(id: &CaseId, p: Position, what: &str) -> ProjectionError {
    ProjectionError::Decode {
        key: format!("version @{p}"),
        reason: format!("{what} for case {id}, which names it in its history"),
    }
}

/// A case as of a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseAt {
    /// No event up to that position touched it.
    NotYet,
    /// It existed.
    Exists(Box<Case>),
    /// Every form that touched it had been archived or edited away (R54, R57) at `since`.
    Deleted {
        /// The position that deleted it.
        since: Position,
    },
}

/// A user who could see a case (R35, R44) and since when, without a break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Viewer {
    /// The user.
    pub user: String,
    /// The position from which the case has been in the user's case list.
    pub since: Position,
    /// The owner id through which: the user itself or a case-sharing group.
    pub via: String,
}

/// One change in a case's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// The case came into existence (first block, R16, or revived by an unarchive, R57).
    Created,
    /// The case was deleted: no live form touches it any more (R54, R57).
    Deleted,
    /// A field or dynamic property changed (`None`: unset).
    Property {
        /// Name (`case_name`, `case_type`, `external_id`, `opened_on` or a property).
        name: String,
        /// Before.
        old: Option<String>,
        /// After.
        new: Option<String>,
    },
    /// The owner changed.
    Owner {
        /// Before.
        old: String,
        /// After.
        new: String,
    },
    /// The case was closed.
    Closed,
    /// The case was reopened: only an edit or archive of the closing form does that (R22, R58).
    Reopened,
    /// An index was set, changed or removed.
    Index {
        /// Identifier.
        name: String,
        /// Before: `case_id` (relationship).
        old: Option<String>,
        /// After.
        new: Option<String>,
    },
    /// An attachment was set, changed or removed.
    Attachment {
        /// Identifier.
        name: String,
        /// Before: `src`.
        old: Option<String>,
        /// After.
        new: Option<String>,
    },
}

/// One entry of a case's history: the event and what it changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Log position.
    pub position: Position,
    /// Server received time.
    #[serde(serialize_with = "Timestamp::serialize_text")]
    pub received_at: Timestamp,
    /// `accepted`, `edited`, `archived` or `unarchived`.
    pub action: &'static str,
    /// The form's instanceID.
    pub form_id: String,
    /// The submitting user (`meta/userID`).
    pub user: Option<String>,
    /// The app it came through.
    pub app: Option<String>,
    /// For an edit: the position of the version it replaced.
    pub replaces: Option<Position>,
    /// What changed, in field order.
    pub changes: Vec<Change>,
}

/// A conflict with a stable id for `conflicts show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictRow {
    /// Stable id: case id, position of `mine` and property, hashed.
    pub id: String,
    /// The conflict.
    #[serde(flatten)]
    pub conflict: Conflict,
}

impl Projections {
    /// The case as of `at` (after the event at `at`): the case's history gives the last event
    /// that touched it up to `at`, whose version row holds it as that event left it.
    pub fn case_at(&self, id: &CaseId, at: Position) -> Result<CaseAt, ProjectionError> {
        let generation = self.current();
        let last = match generation.case_row(id)? {
            Some((key, value)) => {
                let case = match Self::last_in_row(&key, &value, at)? {
                    Last::NotYet => return Ok(CaseAt::NotYet),
                    Last::Now => codec::decode_case(&key, &value)?,
                    Last::At { position, back } => {
                        match self.row_back(id, &key, &value, position, back)? {
                            Some(case) => case,
                            // Deleted then, revived since (R57).
                            None => return Ok(CaseAt::Deleted { since: position }),
                        }
                    }
                };
                return Ok(CaseAt::Exists(Box::new(case)));
            }
            None => match generation
                .tombstone_history(id)?
                .into_iter()
                .rev()
                .find(|p| *p <= at)
            {
                Some(last) => last,
                None => return Ok(CaseAt::NotYet),
            },
        };
        Ok(match self.version_case(id, last)? {
            Some(case) => CaseAt::Exists(Box::new(case)),
            None => CaseAt::Deleted { since: last },
        })
    }

    /// Where a stored case's state as of `at` is, from the history in its row.
    fn last_in_row(key: &[u8], value: &[u8], at: Position) -> Result<Last, ProjectionError> {
        let history = codec::split_case(key, value)?.history;
        Ok(match codec::history_index(history, at) {
            None => Last::NotYet,
            // Nothing touched it since: the case now is the case then.
            Some((i, count)) if i + 1 == count => Last::Now,
            Some((i, count)) => Last::At {
                position: codec::history_at(history, i),
                back: count - 1 - i,
            },
        })
    }

    /// A stored case as the event at `position` left it, `back` events before its last
    /// (`None`: deleted then): from the past in its row, or its version row when that past is
    /// shorter.
    fn row_back(
        &self,
        id: &CaseId,
        key: &[u8],
        value: &[u8],
        position: Position,
        back: usize,
    ) -> Result<Option<Case>, ProjectionError> {
        let row = codec::split_case(key, value)?;
        if back <= past::len(key, row.past)? {
            let case = codec::decode(key, row.case)?;
            if let Some(case) = past::back(key, case, row.past, back)? {
                return Ok(Some(case));
            }
        }
        self.version_case(id, position)
    }

    /// The version row of the event at `p`, which names case `id` in its history.
    fn version_row(
        &self,
        id: &CaseId,
        p: Position,
    ) -> Result<(Vec<u8>, sled::IVec), ProjectionError> {
        let key = keys::version(p.0);
        match self.current().tree.get(&key)? {
            Some(value) => Ok((key, value)),
            None => Err(missing_version(id, p, "no row")),
        }
    }

    /// The whole case as the event at `p` left it (`None`: deleted), without the event's
    /// metadata.
    fn version_case(&self, id: &CaseId, p: Position) -> Result<Option<Case>, ProjectionError> {
        let (key, value) = self.version_row(id, p)?;
        let (_, case) = find_in_row(&key, &value, id.as_str())?;
        let case = case.ok_or_else(|| missing_version(id, p, "no entry"))?;
        if case.is_empty() {
            return Ok(None);
        }
        codec::decode(&key, case).map(Some)
    }

    /// The case as the event at `p` left it, with the event's metadata; without its
    /// `xform_ids` unless `whole`.
    fn version_of(
        &self,
        id: &CaseId,
        p: Position,
        whole: bool,
    ) -> Result<(VersionMeta, Option<Case>), ProjectionError> {
        let (key, value) = self.version_row(id, p)?;
        let (meta, case) = find_in_row(&key, &value, id.as_str())?;
        let meta: VersionMeta = codec::decode(&key, meta)?;
        let case = case.ok_or_else(|| missing_version(id, p, "no entry"))?;
        if case.is_empty() {
            return Ok((meta, None));
        }
        let case = if whole {
            codec::decode(&key, case)?
        } else {
            Case::from(codec::decode::<CaseHead>(&key, case)?)
        };
        Ok((meta, Some(case)))
    }

    /// The case after each event that touched it up to `at`, in position order (`None`: deleted).
    pub fn case_versions(
        &self,
        id: &CaseId,
        at: Position,
    ) -> Result<Vec<(Position, Option<Case>)>, ProjectionError> {
        Ok(self
            .versions_with_meta(id, at, true)?
            .into_iter()
            .map(|(p, _, case)| (p, case))
            .collect())
    }

    #[allow(clippy::type_complexity)]
    fn versions_with_meta(
        &self,
        id: &CaseId,
        at: Position,
        whole: bool,
    ) -> Result<Vec<(Position, VersionMeta, Option<Case>)>, ProjectionError> {
        let history = self.current().history(id)?;
        let mut out = Vec::with_capacity(history.len());
        for p in history.into_iter().filter(|p| *p <= at) {
            let (meta, case) = self.version_of(id, p, whole)?;
            out.push((p, meta, case));
        }
        Ok(out)
    }

    /// Directory events up to `at`, in position order.
    fn directory_events(&self, at: Position) -> Result<Vec<RecordedEvent>, ProjectionError> {
        let generation = self.current();
        let mut out = Vec::new();
        let range = keys::directory_event(0)..=keys::directory_event(at.0);
        for item in generation.tree.range(range) {
            let (key, value) = item?;
            out.push(codec::decode(&key, &value)?);
        }
        Ok(out)
    }

    /// Users, groups, memberships, sharing flags and apps as of `at`.
    pub fn directory_at(&self, at: Position) -> Result<Directory, ProjectionError> {
        let mut dir = Directory::default();
        for ev in self.directory_events(at)? {
            dir.apply_recorded(&ev);
        }
        Ok(dir)
    }

    /// Groups (all, or those listing `user`) as of `at`, sorted by id.
    pub fn groups_at(
        &self,
        user: Option<&str>,
        at: Position,
    ) -> Result<Vec<GroupView>, ProjectionError> {
        Ok(crate::group_views(&self.directory_at(at)?, user))
    }

    /// Cases owned by `owner` as of `at`, sorted by case id; closed ones only when asked. The
    /// candidates are the cases it holds now, one range of the tree whose rows carry their
    /// history, and those that left it (moved or deleted) since. A case untouched since `at` is
    /// its row; one touched since is its version at `at`, kept when owned by `owner` then.
    pub fn cases_by_owner_at(
        &self,
        owner: &str,
        include_closed: bool,
        at: Position,
    ) -> Result<Vec<Case>, ProjectionError> {
        let generation = self.current();
        let keep = |case: &Case| case.owner_id == owner && (include_closed || !case.closed);
        let mut out = Vec::new();
        let mut held = HashSet::new();
        let prefix = keys::case_prefix(owner.as_bytes());
        for item in generation.tree.scan_prefix(&prefix) {
            let (key, value) = item?;
            let id = key.get(prefix.len()..).unwrap_or_default();
            let id = CaseId::new(String::from_utf8_lossy(id));
            match Self::last_in_row(&key, &value, at)? {
                Last::NotYet => {}
                // Its row is under `owner`: owned by it.
                Last::Now => {
                    if include_closed || !codec::case_closed(&value) {
                        out.push(codec::decode_case(&key, &value)?);
                    }
                }
                Last::At { position, back } => {
                    if let Some(case) = self.row_back(&id, &key, &value, position, back)? {
                        if keep(&case) {
                            out.push(case);
                        }
                    }
                }
            }
            held.insert(id);
        }
        let mut departed = BTreeSet::new();
        let prefix = keys::departed_prefix(owner);
        for item in generation.tree.scan_prefix(&prefix) {
            let (key, _) = item?;
            let rest = key.get(prefix.len()..).unwrap_or_default();
            let id = rest.get(..rest.len().saturating_sub(8)).unwrap_or_default();
            let id = CaseId::new(String::from_utf8_lossy(id));
            if !held.contains(&id) {
                departed.insert(id);
            }
        }
        if departed.is_empty() {
            return Ok(out);
        }
        for id in departed {
            if let CaseAt::Exists(case) = self.case_at(&id, at)? {
                if keep(&case) {
                    out.push(*case);
                }
            }
        }
        out.sort_by(|a, b| a.case_id.cmp(&b.case_id));
        Ok(out)
    }

    /// What `user` could see as of `at` (R35, R44): cases owned by the user or by a case-sharing
    /// group the user was in *then*, with the sharing flags of then. Sorted by case id.
    pub fn cases_for_user_at(
        &self,
        user: &str,
        include_closed: bool,
        at: Position,
    ) -> Result<Vec<Case>, ProjectionError> {
        crate::union_of_owners(self.directory_at(at)?.owner_ids(user), |owner| {
            self.cases_by_owner_at(owner, include_closed, at)
        })
    }

    /// Diagnostics raised up to `at`, in position order.
    pub fn diagnostics_at(&self, at: Position) -> Result<Vec<DiagnosticRow>, ProjectionError> {
        let generation = self.current();
        let mut out = Vec::new();
        let end = keys::diagnostic(at.0, u32::MAX);
        for item in generation.tree.range(vec![keys::DIAGNOSTIC]..=end) {
            let (key, value) = item?;
            out.push(codec::decode(&key, &value)?);
        }
        Ok(out)
    }

    /// Diagnostics raised after `after` up to `upto`, in position order (a change feed's step).
    pub fn diagnostics_between(
        &self,
        after: Position,
        upto: Position,
    ) -> Result<Vec<DiagnosticRow>, ProjectionError> {
        let generation = self.current();
        let mut out = Vec::new();
        let start = keys::diagnostic(after.0.saturating_add(1), 0);
        let end = keys::diagnostic(upto.0, u32::MAX);
        if start > end {
            return Ok(out);
        }
        for item in generation.tree.range(start..=end) {
            let (key, value) = item?;
            out.push(codec::decode(&key, &value)?);
        }
        Ok(out)
    }

    /// The users whose case list held the case at `at` (closed or open: the case was theirs to
    /// see), and since which position without a break.
    pub fn who_could_see(&self, id: &CaseId, at: Position) -> Result<Vec<Viewer>, ProjectionError> {
        let versions: Vec<(Position, Option<Case>)> = self
            .versions_with_meta(id, at, false)?
            .into_iter()
            .map(|(p, _, case)| (p, case))
            .collect();
        let dir_events = self.directory_events(at)?;
        let mut points: BTreeSet<Position> = versions.iter().map(|(p, _)| *p).collect();
        points.extend(dir_events.iter().map(|e| e.position));
        let mut dir = Directory::default();
        let mut dir_iter = dir_events.iter().peekable();
        let mut case_iter = versions.iter().peekable();
        let mut owner: Option<String> = None;
        let mut since: BTreeMap<String, (Position, String)> = BTreeMap::new();
        for p in points {
            while let Some(ev) = dir_iter.next_if(|e| e.position <= p) {
                dir.apply_recorded(ev);
            }
            while let Some((_, case)) = case_iter.next_if(|(q, _)| *q <= p) {
                owner = case.as_ref().map(|c| c.owner_id.clone());
            }
            let visible: BTreeMap<String, String> = match &owner {
                Some(o) => viewers_of(&dir, o),
                None => BTreeMap::new(),
            };
            since.retain(|u, (_, via)| visible.get(u) == Some(via));
            for (u, via) in visible {
                since.entry(u).or_insert((p, via));
            }
        }
        Ok(since
            .into_iter()
            .map(|(user, (since, via))| Viewer { user, since, via })
            .collect())
    }

    /// The log position the phone had last synced to when it sent the form version recorded at
    /// `p`: its `X-CommCareHQ-LastSyncToken` (`<position>-…`, R48), recorded by decide right
    /// after the form's event (after its attachments, if any). `None` without a token, or
    /// with one this store did not issue.
    fn synced_at(&self, form: &FormId, p: Position) -> Result<Option<Position>, ProjectionError> {
        let Some(reader) = self.reader() else {
            return Ok(None);
        };
        for next in 1..=2u64 {
            let Some(e) = reader(Position(p.0.saturating_add(next)))? else {
                return Ok(None);
            };
            match &e.event {
                Event::FormAttachmentsV1(a) if a.form_id == *form => continue,
                Event::FormLastSyncTokenV1(t) if t.form_id == *form => {
                    let base = t
                        .token
                        .split_once('-')
                        .and_then(|(position, _)| position.parse().ok())
                        .map(Position)
                        .filter(|base| *base < p);
                    return Ok(base);
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    fn read_event(&self, case: &CaseId, p: Position) -> Result<RecordedEvent, ProjectionError> {
        crate::read_logged(self.reader().as_ref(), case, p)
    }

    /// Every change to a case, oldest first: the event that made it and what it changed. Reads
    /// the case's version rows only, not the log.
    pub fn case_history(&self, id: &CaseId) -> Result<Vec<HistoryEntry>, ProjectionError> {
        // Diffs do not look at xform_ids: leave them undecoded.
        let versions = self.versions_with_meta(id, Position(u64::MAX), false)?;
        let mut out = Vec::with_capacity(versions.len());
        let mut before: Option<Case> = None;
        for (p, meta, after) in versions {
            out.push(HistoryEntry {
                position: p,
                received_at: meta.recorded_at,
                action: meta.action.name(),
                form_id: meta.form.0,
                user: meta.user,
                app: meta.app.map(|a| a.0),
                replaces: meta.replaces,
                changes: diff(before.as_ref(), after.as_ref()),
            });
            before = after;
        }
        Ok(out)
    }

    /// The case's timeline rebuilt from the log: every form version that touched it.
    fn timeline(&self, id: &CaseId) -> Result<CaseTimeline, ProjectionError> {
        let history = self.history(id)?;
        let mut timeline = CaseTimeline::new(id.clone());
        for p in history {
            let ev = self.read_event(id, p)?;
            let change = match &ev.event {
                Event::FormAcceptedV1(f) => CaseChange::Version {
                    form: f.form.form_id.clone(),
                    original: p,
                    blocks: f.blocks.clone(),
                    archived: false,
                },
                Event::FormEditedV1(f) => {
                    // The entry in force: its place, and its archived flag, which is the one at
                    // the edit unless an archive or unarchive of the form followed; those touch
                    // this case too and come later in its history, so the final state is exact.
                    let entry = self.form(&f.form.form_id)?;
                    CaseChange::Version {
                        form: f.form.form_id.clone(),
                        original: entry.as_ref().map_or(p, |e| e.original),
                        blocks: f.blocks.clone(),
                        archived: entry.is_some_and(|e| e.archived),
                    }
                }
                Event::FormArchivedV1(a) => CaseChange::Archive {
                    form: a.form_id.clone(),
                    archived: true,
                },
                Event::FormUnarchivedV1(a) => CaseChange::Archive {
                    form: a.form_id.clone(),
                    archived: false,
                },
                _ => continue,
            };
            timeline.apply(p, ev.recorded_at, change);
        }
        Ok(timeline)
    }

    /// The conflicts between offline edits of one case (issue 9 §4), judged by the sync token
    /// a form came with where it has one (issue 10), else by the phone-side times.
    pub fn case_conflicts(&self, id: &CaseId) -> Result<Vec<ConflictRow>, ProjectionError> {
        let timeline = self.timeline(id)?;
        let mut synced = BTreeMap::new();
        for v in timeline.versions() {
            if let Some(base) = self.synced_at(&v.form, v.position)? {
                synced.insert(v.position, base);
            }
        }
        Ok(domain::conflicts(id, timeline.versions(), &synced)
            .into_iter()
            .map(|c| ConflictRow {
                id: conflict_id(&c),
                conflict: c,
            })
            .collect())
    }

    /// Conflicts of every case that drew an `out_of_order_edit` diagnostic (R65), the only cases
    /// where a block can have overwritten a value set on a phone later; `user` keeps those where
    /// the user made either side.
    pub fn conflicts(&self, user: Option<&str>) -> Result<Vec<ConflictRow>, ProjectionError> {
        let mut cases: BTreeSet<String> = BTreeSet::new();
        for row in self.diagnostics()? {
            if row.diagnostic.code == domain::DiagnosticCode::OutOfOrderEdit {
                cases.insert(row.diagnostic.subject);
            }
        }
        let mut out = Vec::new();
        for c in cases {
            for row in self.case_conflicts(&CaseId::new(c))? {
                if user.is_none_or(|u| row.conflict.mine.user == u || row.conflict.theirs.user == u)
                {
                    out.push(row);
                }
            }
        }
        out.sort_by_key(|r| (r.conflict.mine.position, r.conflict.property.clone()));
        Ok(out)
    }
}

/// The users who see cases owned by `owner` in `dir` (R35), with the owner id through which.
fn viewers_of(dir: &Directory, owner: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if dir.users.contains_key(&domain::UserId::new(owner)) {
        out.insert(owner.to_owned(), owner.to_owned());
    }
    if let Some(g) = dir.groups.get(&domain::GroupId::new(owner)) {
        if g.case_sharing {
            for m in &g.members {
                out.entry(m.0.clone()).or_insert_with(|| owner.to_owned());
            }
        }
    }
    out
}

fn conflict_id(c: &Conflict) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(c.case_id.as_str().as_bytes());
    h.update([0]);
    h.update(c.mine.position.to_be_bytes());
    h.update(c.property.as_bytes());
    let digest = h.finalize();
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn index_text(ix: &Index) -> String {
    format!("{} ({})", ix.case_id, ix.relationship.as_str())
}

fn diff_maps<V>(
    out: &mut Vec<Change>,
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    text: impl Fn(&V) -> String,
    make: impl Fn(String, Option<String>, Option<String>) -> Change,
) {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let (o, n) = (old.get(name).map(&text), new.get(name).map(&text));
        if o != n {
            out.push(make(name.clone(), o, n));
        }
    }
}

/// What changed from `old` to `new`.
fn diff(old: Option<&Case>, new: Option<&Case>) -> Vec<Change> {
    let mut out = Vec::new();
    let empty;
    let (old, new) = match (old, new) {
        (_, None) => return vec![Change::Deleted],
        (None, Some(n)) => {
            out.push(Change::Created);
            empty = Case::empty(n.case_id.clone());
            (&empty, n)
        }
        (Some(o), Some(n)) => (o, n),
    };
    let fields = [
        (
            "case_type",
            Some(old.case_type.clone()),
            Some(new.case_type.clone()),
        ),
        (
            "case_name",
            Some(old.case_name.clone()),
            Some(new.case_name.clone()),
        ),
        (
            "external_id",
            old.external_id.clone(),
            new.external_id.clone(),
        ),
        (
            "opened_on",
            old.opened_on.map(|t| t.to_string()),
            new.opened_on.map(|t| t.to_string()),
        ),
    ];
    for (name, o, n) in fields {
        let blank = |v: &Option<String>| v.as_deref().is_none_or(str::is_empty);
        if o != n && !(blank(&o) && blank(&n)) {
            out.push(Change::Property {
                name: name.to_owned(),
                old: o.filter(|v| !v.is_empty()),
                new: n.filter(|v| !v.is_empty()),
            });
        }
    }
    diff_maps(
        &mut out,
        &old.properties,
        &new.properties,
        Clone::clone,
        |name, old, new| Change::Property { name, old, new },
    );
    if old.owner_id != new.owner_id {
        out.push(Change::Owner {
            old: old.owner_id.clone(),
            new: new.owner_id.clone(),
        });
    }
    match (old.closed, new.closed) {
        (false, true) => out.push(Change::Closed),
        (true, false) => out.push(Change::Reopened),
        _ => {}
    }
    diff_maps(
        &mut out,
        &old.indices,
        &new.indices,
        index_text,
        |name, old, new| Change::Index { name, old, new },
    );
    diff_maps(
        &mut out,
        &old.attachments,
        &new.attachments,
        |a| a.src.clone().or_else(|| a.from.clone()).unwrap_or_default(),
        |name, old, new| Change::Attachment { name, old, new },
    );
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// `CaseHead` reads a stored case's fields before `xform_ids`, whatever they hold.
    #[test]
    fn a_case_head_decodes_every_field_but_the_form_ids() {
        let mut case = Case::empty(CaseId::new("c1"));
        case.case_type = "pregnancy".into();
        case.owner_id = "g".into();
        case.external_id = Some("x".into());
        case.opened_on = Some(Timestamp(5));
        case.closed = true;
        case.properties.insert("risk".into(), "high".into());
        case.indices.insert(
            "parent".into(),
            Index {
                case_id: CaseId::new("p"),
                case_type: "t".into(),
                relationship: domain::Relationship::Extension,
            },
        );
        case.attachments.insert(
            "photo".into(),
            domain::Attachment {
                src: Some("a.jpg".into()),
                from: None,
                name: None,
            },
        );
        case.xform_ids = vec![FormId::new("f1"), FormId::new("f2")];
        let bytes = codec::encode(&case);
        let head = Case::from(codec::decode::<CaseHead>(b"k", &bytes).expect("head"));
        assert_eq!(
            head,
            Case {
                xform_ids: Vec::new(),
                ..case
            }
        );
    }

    /// A version row finds each of its cases, deleted ones as empty, and names none other.
    #[test]
    fn a_version_row_finds_each_case_without_decoding_the_others() {
        let meta = VersionMeta {
            recorded_at: Timestamp(1),
            action: Action::Accepted,
            form: FormId::new("f"),
            user: None,
            app: None,
            replaces: None,
        };
        let a = Case::empty(CaseId::new("a"));
        let row = encode_version(&meta, &[("a", Some(&a)), ("b", None)]);
        let (m, found) = find_in_row(b"k", &row, "a").expect("row");
        assert_eq!(codec::decode::<VersionMeta>(b"k", m).expect("meta"), meta);
        assert_eq!(
            codec::decode::<Case>(b"k", found.expect("a")).expect("case"),
            a
        );
        assert_eq!(find_in_row(b"k", &row, "b").expect("row").1, Some(&[][..]));
        assert_eq!(find_in_row(b"k", &row, "c").expect("row").1, None);
        assert!(
            find_in_row(b"k", &row[..row.len() - 1], "b").is_err(),
            "cut short"
        );
    }
}
