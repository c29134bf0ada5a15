//! The JSON bodies of caseledger's own API (`/api/v1`), as types: the handlers return them and
//! the OpenAPI document (`openapi.rs`) is derived from them, so the two cannot drift.
//!
//! Where the CLI prints the same thing with `--json`, the shape is the CLI's, field for field
//! (`src/view.rs`, `src/travel.rs`); a test in `tests/it/api.rs` compares them on the seed.

use std::collections::BTreeMap;

use domain::{Case, Timestamp};
use projections::{Change, ConflictRow, DiagnosticRow, GroupView, HistoryEntry, Viewer};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

fn ts(t: Option<Timestamp>) -> Option<String> {
    t.map(|t| t.to_string())
}

/// An error: `{"error":{"code","message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A code (`unauthenticated`, `forbidden`, `not_found`, `bad_request`, `command_refused`,
/// `out_of_range`, `not_caught_up`, …) and a sentence for a person.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable.
    pub code: String,
    /// For a person.
    pub message: String,
}

/// What every write answers (as `caseledger --json` does), with the position also in the
/// `X-Caseledger-Position` header.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WriteResult {
    /// Always true (a refused command is an error).
    pub ok: bool,
    /// The last log position the write appended; when it appended nothing (it changed
    /// nothing), the position the projections were at. Pass it as `min_position` to read it.
    pub position: u64,
    /// Events appended.
    pub events: usize,
}

/// `POST /users`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewUser {
    /// The user's id.
    pub id: String,
    /// The login.
    pub username: String,
    /// A password for HTTP Basic; only its argon2id hash is recorded.
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /groups`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewGroup {
    /// The group's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Whether its members share its cases.
    #[serde(default)]
    pub case_sharing: bool,
}

/// `POST /apps`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewApp {
    /// The app's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Whether case sharing is on for it.
    #[serde(default)]
    pub case_sharing: bool,
    /// The case types its case lists show.
    #[serde(default)]
    pub case_types: Vec<String>,
}

/// `PUT …/case-sharing`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Sharing {
    /// On or off.
    pub on: bool,
}

/// A submission's outcome (`caseledger submit --json`, without `file`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmitResult {
    /// The form's instanceID.
    pub instance_id: String,
    /// `accepted`, `rejected`, `duplicate` or `edited`.
    pub outcome: String,
    /// Why it was rejected (it is stored all the same).
    pub error: Option<RejectionJson>,
    /// The last log position it wrote.
    pub position: u64,
    /// The cases it touched.
    pub cases: Vec<String>,
}

/// A rejection's code and message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RejectionJson {
    /// E.g. `invalid_case_index`.
    pub code: String,
    /// For a person.
    pub message: String,
}

impl From<&engine::SubmitOutcome> for SubmitResult {
    fn from(o: &engine::SubmitOutcome) -> Self {
        SubmitResult {
            instance_id: o.instance_id.0.clone(),
            outcome: serde_json::to_value(o.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            error: o.error.as_ref().map(|e| RejectionJson {
                code: e.code.as_str().to_owned(),
                message: e.message.clone(),
            }),
            position: o.position.0,
            cases: o.cases.iter().map(|c| c.0.clone()).collect(),
        }
    }
}

/// A case (`caseledger case show --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaseJson {
    /// Id.
    pub case_id: String,
    /// Type.
    pub case_type: String,
    /// Name.
    pub case_name: String,
    /// Owner: a user or a group.
    pub owner_id: String,
    /// The user who created it.
    pub user_id: String,
    /// External id.
    pub external_id: Option<String>,
    /// RFC 3339.
    pub opened_on: Option<String>,
    /// Who opened it.
    pub opened_by: Option<String>,
    /// RFC 3339.
    pub modified_on: Option<String>,
    /// Closed.
    pub closed: bool,
    /// RFC 3339.
    pub closed_on: Option<String>,
    /// Who closed it.
    pub closed_by: Option<String>,
    /// Dynamic properties.
    pub properties: BTreeMap<String, String>,
    /// Indices by identifier.
    pub indices: BTreeMap<String, IndexJson>,
    /// Attachments by identifier.
    pub attachments: BTreeMap<String, AttachmentJson>,
    /// The forms that touched it, in order.
    pub xform_ids: Vec<String>,
}

/// An index to another case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IndexJson {
    /// The case pointed at.
    pub case_id: String,
    /// Its type.
    pub case_type: String,
    /// `child` or `extension`.
    pub relationship: String,
}

/// An attachment of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttachmentJson {
    /// Source.
    pub src: Option<String>,
    /// `local`, `remote`, `inline`.
    pub from: Option<String>,
    /// Name.
    pub name: Option<String>,
}

impl From<&Case> for CaseJson {
    fn from(c: &Case) -> Self {
        CaseJson {
            case_id: c.case_id.0.clone(),
            case_type: c.case_type.clone(),
            case_name: c.case_name.clone(),
            owner_id: c.owner_id.clone(),
            user_id: c.user_id.clone(),
            external_id: c.external_id.clone(),
            opened_on: ts(c.opened_on),
            opened_by: c.opened_by.clone(),
            modified_on: ts(c.modified_on),
            closed: c.closed,
            closed_on: ts(c.closed_on),
            closed_by: c.closed_by.clone(),
            properties: c.properties.clone(),
            indices: c
                .indices
                .iter()
                .map(|(name, ix)| {
                    (
                        name.clone(),
                        IndexJson {
                            case_id: ix.case_id.0.clone(),
                            case_type: ix.case_type.clone(),
                            relationship: ix.relationship.as_str().to_owned(),
                        },
                    )
                })
                .collect(),
            attachments: c
                .attachments
                .iter()
                .map(|(name, a)| {
                    (
                        name.clone(),
                        AttachmentJson {
                            src: a.src.clone(),
                            from: a.from.clone(),
                            name: a.name.clone(),
                        },
                    )
                })
                .collect(),
            xform_ids: c.xform_ids.iter().map(|f| f.0.clone()).collect(),
        }
    }
}

/// A group (`caseledger groups --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupJson {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Case sharing on.
    pub case_sharing: bool,
    /// Member user ids, sorted.
    pub members: Vec<String>,
}

impl From<&GroupView> for GroupJson {
    fn from(g: &GroupView) -> Self {
        GroupJson {
            id: g.id.0.clone(),
            name: g.name.clone(),
            case_sharing: g.case_sharing,
            members: g.members.clone(),
        }
    }
}

/// A diagnostic (`caseledger diagnostics --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiagnosticJson {
    /// E.g. `user_in_multiple_case_sharing_groups`.
    pub code: String,
    /// What it is about.
    pub subject: String,
    /// For a person.
    pub detail: String,
    /// The position that raised it.
    pub position: u64,
}

impl From<&DiagnosticRow> for DiagnosticJson {
    fn from(d: &DiagnosticRow) -> Self {
        DiagnosticJson {
            code: d.diagnostic.code.as_str().to_owned(),
            subject: d.diagnostic.subject.clone(),
            detail: d.diagnostic.detail.clone(),
            position: d.position.0,
        }
    }
}

/// One change of a case's history (`caseledger case history --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum ChangeJson {
    /// The case came into existence.
    Created,
    /// No live form touches it any more.
    Deleted,
    /// A field or property changed (`null`: unset).
    Property {
        /// Name.
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
    /// Closed.
    Closed,
    /// Reopened.
    Reopened,
    /// An index was set, changed or removed.
    Index {
        /// Identifier.
        name: String,
        /// Before.
        old: Option<String>,
        /// After.
        new: Option<String>,
    },
    /// An attachment was set, changed or removed.
    Attachment {
        /// Identifier.
        name: String,
        /// Before.
        old: Option<String>,
        /// After.
        new: Option<String>,
    },
}

impl From<&Change> for ChangeJson {
    fn from(c: &Change) -> Self {
        match c.clone() {
            Change::Created => ChangeJson::Created,
            Change::Deleted => ChangeJson::Deleted,
            Change::Property { name, old, new } => ChangeJson::Property { name, old, new },
            Change::Owner { old, new } => ChangeJson::Owner { old, new },
            Change::Closed => ChangeJson::Closed,
            Change::Reopened => ChangeJson::Reopened,
            Change::Index { name, old, new } => ChangeJson::Index { name, old, new },
            Change::Attachment { name, old, new } => ChangeJson::Attachment { name, old, new },
        }
    }
}

/// One entry of a case's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntryJson {
    /// Log position.
    pub position: u64,
    /// Server received time, RFC 3339.
    pub received_at: String,
    /// `accepted`, `edited`, `archived` or `unarchived`.
    pub action: String,
    /// The form's instanceID.
    pub form_id: String,
    /// The submitting user.
    pub user: Option<String>,
    /// The app.
    pub app: Option<String>,
    /// For an edit: the position of the version it replaced.
    pub replaces: Option<u64>,
    /// What changed.
    pub changes: Vec<ChangeJson>,
}

impl From<&HistoryEntry> for HistoryEntryJson {
    fn from(e: &HistoryEntry) -> Self {
        HistoryEntryJson {
            position: e.position.0,
            received_at: e.received_at.to_string(),
            action: e.action.to_owned(),
            form_id: e.form_id.clone(),
            user: e.user.clone(),
            app: e.app.clone(),
            replaces: e.replaces.map(|p| p.0),
            changes: e.changes.iter().map(ChangeJson::from).collect(),
        }
    }
}

/// Who could see a case (`caseledger case who-could-see --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WhoCouldSeeJson {
    /// The case.
    pub case_id: String,
    /// The position looked at.
    pub at: u64,
    /// The users whose case list held it.
    pub viewers: Vec<ViewerJson>,
}

/// A user who could see a case, since when, and through which owner id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ViewerJson {
    /// The user.
    pub user: String,
    /// Since this position, without a break.
    pub since: u64,
    /// The user itself or a case-sharing group.
    pub via: String,
}

impl From<&Viewer> for ViewerJson {
    fn from(v: &Viewer) -> Self {
        ViewerJson {
            user: v.user.clone(),
            since: v.since.0,
            via: v.via.clone(),
        }
    }
}

/// A conflict three-way (`caseledger conflicts --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictJson {
    /// Stable id, for `/conflicts/{id}`.
    pub id: String,
    /// The case.
    pub case_id: String,
    /// The property.
    pub property: String,
    /// The value before either change.
    pub base: Option<String>,
    /// This form's value.
    pub mine: String,
    /// The value it overwrote.
    pub theirs: String,
    /// What is in force (received order wins).
    pub result: String,
    /// Where to time-travel to.
    pub positions: ConflictPositions,
    /// Both sides in full.
    pub sides: ConflictSides,
}

/// The positions of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictPositions {
    /// Base in force here.
    pub base: u64,
    /// Theirs applied here.
    pub theirs: u64,
    /// Mine applied here.
    pub mine: u64,
}

/// Both sides of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictSides {
    /// The change that was overwritten.
    pub theirs: ConflictSideJson,
    /// The change made earlier on its phone that overwrote it.
    pub mine: ConflictSideJson,
}

/// One side of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictSideJson {
    /// The form.
    pub form_id: String,
    /// Where it was applied.
    pub position: u64,
    /// Its user.
    pub user: String,
    /// When the phone made it, RFC 3339.
    pub phone_time: String,
    /// The value it set.
    pub value: String,
}

impl From<&ConflictRow> for ConflictJson {
    fn from(row: &ConflictRow) -> Self {
        let c = &row.conflict;
        let side = |s: &domain::ConflictSide| ConflictSideJson {
            form_id: s.form.0.clone(),
            position: s.position.0,
            user: s.user.clone(),
            phone_time: s.phone_time.to_string(),
            value: s.value.clone(),
        };
        ConflictJson {
            id: row.id.clone(),
            case_id: c.case_id.0.clone(),
            property: c.property.clone(),
            base: c.base.clone(),
            mine: c.mine.value.clone(),
            theirs: c.theirs.value.clone(),
            result: c.result.clone(),
            positions: ConflictPositions {
                base: c.base_position.0,
                theirs: c.theirs.position.0,
                mine: c.mine.position.0,
            },
            sides: ConflictSides {
                theirs: side(&c.theirs),
                mine: side(&c.mine),
            },
        }
    }
}

/// One log event on the SSE stream (`data:` of `/events`; its `id:` is `position`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventJson {
    /// Log position.
    pub position: u64,
    /// Server received time, RFC 3339.
    pub recorded_at: String,
    /// The command that produced it.
    pub command_id: String,
    /// Event type name (`FormAccepted`, `MemberAdded`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Type version.
    pub version: u16,
    /// The event's fields as stored, but raw submission and attachment bytes, which are given
    /// by length only.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

/// What changed in a user's case list at one log position: SSE event `changes` of
/// `/users/{user_id}/cases/feed`, its `id:` that position (one event per position, so that
/// `Last-Event-ID` resumes exactly). The first event, `snapshot`, is the list where the feed
/// starts (as `entered`), unless the stream resumes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CaseListChanges {
    /// The position that made the changes.
    pub position: u64,
    /// Cases that came into the list, as they are now.
    pub entered: Vec<CaseJson>,
    /// Cases that left it, as they were.
    pub left: Vec<CaseJson>,
    /// Cases in the list before and after that changed.
    pub changed: Vec<CaseJson>,
}

/// A case as one log position left it: SSE event `case` of `/cases/{case_id}/feed`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CaseChange {
    /// The position.
    pub position: u64,
    /// `exists`, `deleted` (every form that touched it was archived or edited away) or
    /// `not_yet` (only in a `snapshot`).
    pub state: String,
    /// The case, when it exists.
    pub case: Option<CaseJson>,
}

/// Diagnostics one log position raised: SSE event `diagnostics` of `/diagnostics/feed`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiagnosticsRaised {
    /// The position.
    pub position: u64,
    /// What it raised.
    pub diagnostics: Vec<DiagnosticJson>,
}
