//! What an event does to state: the one home of the folds that the live projections, the bulk
//! rebuild, restore, case history and time travel share.
//!
//! - [`FormFact`] is what one event says about one form id, and [`FormEntry::fold`] folds it into
//!   the form's entry (R53–R57): an edit keeps the old version's place and archived flag, a
//!   rejected edit leaves the accepted version in force. The [`FormStep`] it returns names the
//!   cases the event touched and whether they are rebuilt (R58) or folded forward.
//! - [`fold_live`] is R58: a case is its live forms' in-force blocks, in the received order of
//!   each form's first version.
//! - [`CaseTimeline`] folds one case through the changes recorded for it, in log order, so that
//!   its state after any prefix of the log is what a replay of that prefix leaves (time travel,
//!   history) — by construction, since it uses the two functions above.
//! - [`conflicts`] finds the per-property conflicts between offline edits in a case's live forms.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    apply_block, BlockApplied, Case, CaseId, Event, FormId, FormRecord, Position, Rejection,
    Timestamp,
};

/// What the log says about one form id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormEntry {
    /// In force (accepted) or rejected.
    pub accepted: bool,
    /// xmlns.
    pub xmlns: String,
    /// SHA-256 of the bytes in force.
    pub content_hash: [u8; 32],
    /// Position of the event that recorded the version in force (or the rejection).
    pub position: Position,
    /// Position of the form's first acceptance: its place in received order (R54, R57).
    pub original: Position,
    /// Archived (R57).
    pub archived: bool,
    /// App it came through.
    pub app_id: Option<crate::AppId>,
    /// `meta/userID`.
    pub user_id: Option<String>,
    /// Why it was rejected.
    pub error: Option<Rejection>,
    /// Cases the version in force touched.
    pub case_ids: Vec<CaseId>,
}

impl FormEntry {
    /// The entry of a version of a form recorded at `position`: in force when `accepted`, at its
    /// own place in received order, not archived, no error and no cases.
    pub fn recorded(form: &FormRecord, position: Position, accepted: bool) -> Self {
        FormEntry {
            accepted,
            xmlns: form.xmlns.clone(),
            content_hash: form.content_hash,
            position,
            original: position,
            archived: false,
            app_id: form.app_id.clone(),
            user_id: form.user_id.clone(),
            error: None,
            case_ids: Vec::new(),
        }
    }

    /// True when the form's blocks count (R57, R58).
    pub fn is_live(&self) -> bool {
        self.accepted && !self.archived
    }

    /// Folds one fact recorded at `position` into the entry `prev` of its form (R53–R57).
    pub fn fold(prev: Option<&FormEntry>, fact: FormFact, position: Position) -> FormStep {
        match fact {
            // decide accepts a form id only when it is new or was rejected (R53–R56), so a first
            // acceptance never replaces blocks in force: it folds forward.
            FormFact::Accepted(e) => FormStep {
                touched: e.case_ids.clone(),
                entry: Some(e),
                rebuild: false,
            },
            FormFact::Rejected(e) => {
                // A rejected edit leaves the accepted version in force (R54).
                let entry = (!prev.is_some_and(|p| p.accepted)).then_some(e);
                FormStep {
                    entry,
                    touched: Vec::new(),
                    rebuild: false,
                }
            }
            FormFact::Edited(mut e) => {
                let mut touched = prev.map(|p| p.case_ids.clone()).unwrap_or_default();
                union_into(&mut touched, &e.case_ids);
                // R54: the new version keeps the old one's place and archived state.
                e.original = prev.map_or(position, |p| p.original);
                e.archived = prev.is_some_and(|p| p.archived);
                FormStep {
                    entry: Some(e),
                    touched,
                    rebuild: true,
                }
            }
            FormFact::Archived(archived) => match prev {
                Some(p) => {
                    let mut e = p.clone();
                    e.archived = archived;
                    FormStep {
                        touched: e.case_ids.clone(),
                        entry: Some(e),
                        rebuild: true,
                    }
                }
                None => FormStep {
                    entry: None,
                    touched: Vec::new(),
                    rebuild: false,
                },
            },
        }
    }
}

fn union_into(into: &mut Vec<CaseId>, more: &[CaseId]) {
    for c in more {
        if !into.contains(c) {
            into.push(c.clone());
        }
    }
}

/// What one event says about one form id, for [`FormEntry::fold`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FormFact {
    /// A version was accepted (its entry, with the cases it touched).
    Accepted(FormEntry),
    /// A version was rejected.
    Rejected(FormEntry),
    /// A new version replaced the one in force (R54).
    Edited(FormEntry),
    /// The form was archived (`true`) or unarchived (R57).
    Archived(bool),
}

impl FormFact {
    /// The form id and fact of an event recorded at `position`, `None` for events that change no
    /// form entry (directory events, diagnostics, duplicates, attachments).
    pub fn of(event: &Event, position: Position) -> Option<(&FormId, FormFact)> {
        match event {
            Event::FormAcceptedV1(f) => Some((
                &f.form.form_id,
                FormFact::Accepted(FormEntry {
                    case_ids: crate::case_ids_of(&f.blocks),
                    ..FormEntry::recorded(&f.form, position, true)
                }),
            )),
            Event::FormRejectedV1(f) => Some((
                &f.form.form_id,
                FormFact::Rejected(FormEntry {
                    error: Some(f.error.clone()),
                    ..FormEntry::recorded(&f.form, position, false)
                }),
            )),
            Event::FormEditedV1(f) => Some((
                &f.form.form_id,
                FormFact::Edited(FormEntry {
                    case_ids: crate::case_ids_of(&f.blocks),
                    ..FormEntry::recorded(&f.form, position, true)
                }),
            )),
            Event::FormArchivedV1(a) => Some((&a.form_id, FormFact::Archived(true))),
            Event::FormUnarchivedV1(a) => Some((&a.form_id, FormFact::Archived(false))),
            _ => None,
        }
    }
}

/// The effect of one event on its form and the cases it touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormStep {
    /// The form's entry after the event; `None` when it did not change.
    pub entry: Option<FormEntry>,
    /// The cases whose history gains the event's position, in first-touch order.
    pub touched: Vec<CaseId>,
    /// True when the touched cases are rebuilt from their live forms (R58); false when the
    /// event's blocks fold forward onto the cases as they are.
    pub rebuild: bool,
}

/// R58: a case folded from its live forms' in-force versions, given in the received order of each
/// form's first version; `None` when no block names it (deleted, or never existed).
pub fn fold_live<'a>(
    id: &CaseId,
    versions: impl IntoIterator<Item = (&'a FormId, &'a [BlockApplied])>,
) -> Option<Case> {
    let mut case = None;
    for (form, blocks) in versions {
        for b in blocks.iter().filter(|b| b.case_id == *id) {
            case = Some(apply_block(case, b, form));
        }
    }
    case
}

/// One form's version in force, as a case's timeline knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveVersion {
    /// The form.
    pub form: FormId,
    /// Its place in received order: its first version's position.
    pub original: Position,
    /// Where the version in force was recorded.
    pub position: Position,
    /// Server received time of the version in force.
    pub recorded_at: Timestamp,
    /// The version's blocks for this case (possibly none).
    pub blocks: Vec<BlockApplied>,
    /// Archived (R57).
    pub archived: bool,
}

/// A change recorded for one case, in log order, for [`CaseTimeline::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseChange {
    /// A version of `form` was put in force at the change's position (first version: accepted;
    /// later: an edit, R54). `blocks` are its blocks for this case.
    Version {
        /// The form.
        form: FormId,
        /// The form's first version's position (equal to the change's for a first version).
        original: Position,
        /// The version's blocks for this case.
        blocks: Vec<BlockApplied>,
        /// The form's archived flag after the change: false for a first version, the flag in
        /// force for an edit (R54 keeps it), which this case's own changes may not show (the
        /// form was archived before its new version touched the case).
        archived: bool,
    },
    /// The form was archived (`true`) or unarchived (R57).
    Archive {
        /// The form.
        form: FormId,
        /// New flag.
        archived: bool,
    },
}

/// One case folded change by change, so that after the changes recorded up to a position it is
/// what a replay of the log up to that position leaves.
#[derive(Debug, Clone)]
pub struct CaseTimeline {
    id: CaseId,
    versions: Vec<LiveVersion>,
    case: Option<Case>,
}

impl CaseTimeline {
    /// A case before anything touched it.
    pub fn new(id: CaseId) -> Self {
        CaseTimeline {
            id,
            versions: Vec::new(),
            case: None,
        }
    }

    /// The case now (`None`: never created, or deleted).
    pub fn case(&self) -> Option<&Case> {
        self.case.as_ref()
    }

    /// Every form version that touched the case and is in force, in received order of first
    /// versions, archived ones included.
    pub fn versions(&self) -> &[LiveVersion] {
        &self.versions
    }

    /// Applies a change recorded at `position` (received at `recorded_at`). Changes must come in
    /// log order. A first version that comes after every other form folds forward; anything else
    /// rebuilds the case from its live forms (R58), exactly as the projections do.
    pub fn apply(&mut self, position: Position, recorded_at: Timestamp, change: CaseChange) {
        let forward = match change {
            CaseChange::Version {
                form,
                original,
                blocks,
                archived,
            } => match self.versions.iter_mut().find(|v| v.form == form) {
                Some(v) => {
                    v.position = position;
                    v.recorded_at = recorded_at;
                    v.blocks = blocks;
                    v.archived = archived;
                    false
                }
                None => {
                    let last = self.versions.iter().map(|v| v.original).max();
                    let forward = !archived && last.is_none_or(|l| l < original);
                    let at = self
                        .versions
                        .iter()
                        .position(|v| v.original > original)
                        .unwrap_or(self.versions.len());
                    self.versions.insert(
                        at,
                        LiveVersion {
                            form,
                            original,
                            position,
                            recorded_at,
                            blocks,
                            archived,
                        },
                    );
                    forward
                }
            },
            CaseChange::Archive { form, archived } => {
                if let Some(v) = self.versions.iter_mut().find(|v| v.form == form) {
                    v.archived = archived;
                }
                false
            }
        };
        let id = &self.id;
        if forward {
            if let Some(v) = self.versions.last() {
                let mut case = self.case.take();
                for b in v.blocks.iter().filter(|b| b.case_id == *id) {
                    case = Some(apply_block(case, b, &v.form));
                }
                self.case = case;
            }
        } else {
            self.case = fold_live(
                id,
                self.versions
                    .iter()
                    .filter(|v| !v.archived)
                    .map(|v| (&v.form, v.blocks.as_slice())),
            );
        }
    }
}

/// One side of a conflict: a form version's change to a property.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictSide {
    /// The form.
    pub form: FormId,
    /// Where its version in force was recorded (time-travel there to see it applied).
    pub position: Position,
    /// The block's user.
    pub user: String,
    /// The phone-side time of the block (`date_modified`, else the server received time, R9).
    #[serde(serialize_with = "Timestamp::serialize_text")]
    pub phone_time: Timestamp,
    /// The value it set.
    pub value: String,
}

/// A per-property conflict between two offline edits (issue 9 §4): `mine` was made on the phone
/// before `theirs` but arrived after it, so it overwrote a newer value. Received order wins, as
/// in CommCare: the result is `mine`'s value unless a later block changed it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// Case.
    pub case_id: CaseId,
    /// Property (dynamic property or a reserved one mapped to a field, R18).
    pub property: String,
    /// The value before either change (`None`: unset).
    pub base: Option<String>,
    /// The change that arrived first but was made later on the phone.
    pub theirs: ConflictSide,
    /// The change that arrived later but was made earlier on the phone.
    pub mine: ConflictSide,
    /// The value the case holds after `mine` (received order wins).
    pub result: String,
    /// The position just before `theirs` was applied, where `base` is in force.
    pub base_position: Position,
}

/// Finds the conflicts among a case's live versions (in received order of first versions, as
/// [`CaseTimeline::versions`] gives them): for every property a block sets, when the last change
/// to it came from another form that this block's phone had not seen. A version whose form came
/// with the phone's last sync token (`X-CommCareHQ-LastSyncToken`) has its base in `synced`
/// (the version's position → the log position the token restored): a change recorded after
/// that base was not seen. Without a token, the phone-side times tell: a change made later on
/// its phone than this block was not seen either.
pub fn conflicts(
    id: &CaseId,
    versions: &[LiveVersion],
    synced: &BTreeMap<Position, Position>,
) -> Vec<Conflict> {
    struct Last {
        side: ConflictSide,
        before: Option<String>,
        original: Position,
    }
    let mut last: BTreeMap<String, Last> = BTreeMap::new();
    let mut out = Vec::new();
    for v in versions.iter().filter(|v| !v.archived) {
        for b in v.blocks.iter().filter(|b| b.case_id == *id) {
            for (name, value) in &b.actions.update {
                let side = ConflictSide {
                    form: v.form.clone(),
                    position: v.position,
                    user: b.user.clone(),
                    phone_time: b.date,
                    value: value.clone(),
                };
                let before = last.get(name).map(|l| l.side.value.clone());
                if let Some(l) = last.get(name) {
                    let unseen = match synced.get(&v.position) {
                        Some(base) => l.side.position > *base,
                        None => b.date < l.side.phone_time,
                    };
                    if l.side.form != v.form && unseen && l.side.value != *value {
                        out.push(Conflict {
                            case_id: id.clone(),
                            property: name.clone(),
                            base: l.before.clone(),
                            theirs: l.side.clone(),
                            mine: side.clone(),
                            result: value.clone(),
                            base_position: Position(l.original.0.saturating_sub(1)),
                        });
                    }
                }
                last.insert(
                    name.clone(),
                    Last {
                        side,
                        before,
                        original: v.original,
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{Actions, FormRecord};

    fn record(id: &str, hash: u8) -> FormRecord {
        FormRecord {
            form_id: FormId::new(id),
            xmlns: "x".into(),
            app_id: None,
            user_id: Some("u".into()),
            content_hash: [hash; 32],
            raw: Vec::new().into(),
        }
    }

    fn entry(id: &str, hash: u8, p: u64, cases: &[&str]) -> FormEntry {
        FormEntry {
            case_ids: cases.iter().map(|c| CaseId::new(*c)).collect(),
            ..FormEntry::recorded(&record(id, hash), Position(p), true)
        }
    }

    fn block(case: &str, date: i64, user: &str, update: &[(&str, &str)]) -> BlockApplied {
        BlockApplied {
            case_id: CaseId::new(case),
            date: Timestamp(date),
            user: user.into(),
            actions: Actions {
                update: update
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Actions::default()
            },
        }
    }

    /// R54: an edit keeps the old version's place and archived flag, and touches the cases of
    /// both versions, which are rebuilt.
    #[test]
    fn r54_an_edit_keeps_place_and_archived_flag_and_rebuilds_both_versions_cases() {
        let mut old = entry("f", 1, 3, &["a", "b"]);
        old.archived = true;
        let step = FormEntry::fold(
            Some(&old),
            FormFact::Edited(entry("f", 2, 9, &["b", "c"])),
            Position(9),
        );
        let new = step.entry.expect("entry");
        assert_eq!(
            (new.position, new.original, new.archived),
            (Position(9), Position(3), true)
        );
        assert_eq!(
            step.touched,
            [CaseId::new("a"), CaseId::new("b"), CaseId::new("c")]
        );
        assert!(step.rebuild);
    }

    /// R54: a rejected edit leaves the accepted version in force; R56: a rejected form that was
    /// never accepted is recorded as rejected.
    #[test]
    fn r54_a_rejected_edit_leaves_the_accepted_version_in_force() {
        let accepted = entry("f", 1, 3, &["a"]);
        let mut rejected = entry("f", 2, 5, &[]);
        rejected.accepted = false;
        let step = FormEntry::fold(
            Some(&accepted),
            FormFact::Rejected(rejected.clone()),
            Position(5),
        );
        assert_eq!(step.entry, None);
        assert!(step.touched.is_empty());
        let step = FormEntry::fold(None, FormFact::Rejected(rejected.clone()), Position(5));
        assert_eq!(step.entry, Some(rejected));
    }

    /// R57, R58: archiving removes a form's blocks from the rebuild; the timeline of a case
    /// folds forward while forms arrive in order and rebuilds on an archive.
    #[test]
    fn r58_the_timeline_rebuilds_from_live_forms_on_archive() {
        let mut t = CaseTimeline::new(CaseId::new("a"));
        let change = |form: &str, original: u64, b: BlockApplied| CaseChange::Version {
            form: FormId::new(form),
            original: Position(original),
            blocks: vec![b],
            archived: false,
        };
        t.apply(
            Position(1),
            Timestamp(1),
            change("f1", 1, block("a", 1, "u", &[("p", "1")])),
        );
        t.apply(
            Position(2),
            Timestamp(2),
            change("f2", 2, block("a", 2, "u", &[("p", "2")])),
        );
        assert_eq!(t.case().map(|c| c.properties["p"].as_str()), Some("2"));
        t.apply(
            Position(3),
            Timestamp(3),
            CaseChange::Archive {
                form: FormId::new("f2"),
                archived: true,
            },
        );
        assert_eq!(t.case().map(|c| c.properties["p"].as_str()), Some("1"));
        t.apply(
            Position(4),
            Timestamp(4),
            CaseChange::Archive {
                form: FormId::new("f1"),
                archived: true,
            },
        );
        assert!(t.case().is_none(), "no live form left: deleted");
    }

    /// Issue 9 §4: a block made earlier on the phone than the change it overwrote is a conflict
    /// (base, theirs, mine, result); the same form, or a later phone time, is not.
    #[test]
    fn a_late_arriving_earlier_edit_is_a_conflict_with_base_theirs_mine() {
        let v = |form: &str, p: u64, blocks: Vec<BlockApplied>| LiveVersion {
            form: FormId::new(form),
            original: Position(p),
            position: Position(p),
            recorded_at: Timestamp(p as i64),
            blocks,
            archived: false,
        };
        let versions = vec![
            v("reg", 1, vec![block("a", 10, "david", &[("risk", "none")])]),
            v(
                "maria",
                2,
                vec![block("a", 40, "maria", &[("risk", "low"), ("x", "1")])],
            ),
            v(
                "david",
                3,
                vec![block("a", 30, "david", &[("risk", "high")])],
            ),
            v("later", 4, vec![block("a", 50, "ana", &[("x", "2")])]),
        ];
        let found = conflicts(&CaseId::new("a"), &versions, &BTreeMap::new());
        assert_eq!(found.len(), 1, "{found:#?}");
        let c = &found[0];
        assert_eq!(c.property, "risk");
        assert_eq!(c.base.as_deref(), Some("none"));
        assert_eq!(
            (c.theirs.value.as_str(), c.theirs.user.as_str()),
            ("low", "maria")
        );
        assert_eq!(
            (c.mine.value.as_str(), c.mine.user.as_str()),
            ("high", "david")
        );
        assert_eq!(c.result, "high");
        assert_eq!(c.base_position, Position(1));
    }

    /// Issue 10: a form sent with the phone's last sync token is judged by what that restore
    /// held: a change recorded after the token's position was not seen, whatever the phone
    /// clocks say; one recorded at or before it was seen.
    #[test]
    fn a_sync_token_decides_what_the_phone_had_seen() {
        let v = |form: &str, p: u64, blocks: Vec<BlockApplied>| LiveVersion {
            form: FormId::new(form),
            original: Position(p),
            position: Position(p),
            recorded_at: Timestamp(p as i64),
            blocks,
            archived: false,
        };
        // Phone times in order (no conflict by the clocks), but david synced at position 1,
        // before maria's change at 2.
        let versions = vec![
            v("reg", 1, vec![block("a", 10, "david", &[("risk", "none")])]),
            v(
                "maria",
                2,
                vec![block("a", 20, "maria", &[("risk", "low")])],
            ),
            v(
                "david",
                3,
                vec![block("a", 30, "david", &[("risk", "high")])],
            ),
        ];
        let by_clock = conflicts(&CaseId::new("a"), &versions, &BTreeMap::new());
        assert!(by_clock.is_empty(), "{by_clock:#?}");
        let stale = BTreeMap::from([(Position(3), Position(1))]);
        let found = conflicts(&CaseId::new("a"), &versions, &stale);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(
            (found[0].theirs.value.as_str(), found[0].mine.value.as_str()),
            ("low", "high")
        );
        // Synced after maria's change: seen, so no conflict, even against a later phone time.
        let fresh = BTreeMap::from([(Position(3), Position(2))]);
        let mut later = versions.clone();
        later[1] = v(
            "maria",
            2,
            vec![block("a", 90, "maria", &[("risk", "low")])],
        );
        assert!(conflicts(&CaseId::new("a"), &later, &fresh).is_empty());
    }
}
