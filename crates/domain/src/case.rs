//! Case state and the pure application of one case block to it (R11–R31, R24).
//!
//! [`apply_block`] is the single definition of "what a block does to a case". `decide` runs it to
//! validate a form and find diagnostics; projections run it to fold recorded events; a rebuild
//! (R58) runs it over a case's live forms. All three therefore agree by construction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Actions, CaseId, FormId, Relationship, Timestamp};

/// Names that would overwrite system state and are ignored as properties (R19).
pub const RESTRICTED_PROPERTIES: [&str; 7] = [
    "case_id",
    "closed",
    "closed_on",
    "closed_by",
    "modified_on",
    "user_id",
    "doc_type",
];

/// A live index of a case (R25).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Referenced case.
    pub case_id: CaseId,
    /// Referenced case's type as declared by the index.
    pub case_type: String,
    /// Child or extension.
    pub relationship: Relationship,
}

/// Attachment metadata (R31).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// `src`.
    pub src: Option<String>,
    /// `from`.
    pub from: Option<String>,
    /// `name`.
    pub name: Option<String>,
}

/// A case with CommCare's fields (R32).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    /// Id.
    pub case_id: CaseId,
    /// Type.
    pub case_type: String,
    /// Name.
    pub case_name: String,
    /// Who the case belongs to: user, group or location id (R33).
    pub owner_id: String,
    /// User of the last block applied (R24, R33).
    pub user_id: String,
    /// `external_id`.
    pub external_id: Option<String>,
    /// First block's date, or `date_opened`.
    pub opened_on: Option<Timestamp>,
    /// First block's user.
    pub opened_by: Option<String>,
    /// Latest block date; never moves backwards (R24).
    pub modified_on: Option<Timestamp>,
    /// The user of the block that set `modified_on` (for R65).
    pub modified_on_by: Option<String>,
    /// Closed (R21, R22: never reopened by an update).
    pub closed: bool,
    /// When closed.
    pub closed_on: Option<Timestamp>,
    /// Who closed it.
    pub closed_by: Option<String>,
    /// Dynamic properties (R17, R77: strings, never parsed).
    pub properties: BTreeMap<String, String>,
    /// Live indices by identifier.
    pub indices: BTreeMap<String, Index>,
    /// Attachments by identifier.
    pub attachments: BTreeMap<String, Attachment>,
    /// Forms that touched the case, once each, in received order (R13).
    pub xform_ids: Vec<FormId>,
}

impl Case {
    /// An empty case; R16 stubs start here.
    pub fn empty(case_id: CaseId) -> Self {
        Case {
            case_id,
            case_type: String::new(),
            case_name: String::new(),
            owner_id: String::new(),
            user_id: String::new(),
            external_id: None,
            opened_on: None,
            opened_by: None,
            modified_on: None,
            modified_on_by: None,
            closed: false,
            closed_on: None,
            closed_by: None,
            properties: BTreeMap::new(),
            indices: BTreeMap::new(),
            attachments: BTreeMap::new(),
            xform_ids: Vec::new(),
        }
    }
}

/// A case block as recorded in a `FormAccepted` event: date, user and owner resolved by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockApplied {
    /// Case.
    pub case_id: CaseId,
    /// `date_modified`, or the server received time when absent (R9).
    pub date: Timestamp,
    /// Block `user_id`, else `meta/userID` (R9); empty if neither exists.
    pub user: String,
    /// The actions; `create.owner_id` holds the server-resolved owner (R37, R38).
    pub actions: Actions,
}

/// Applies one block to a case (or to nothing: R16 stub), recording `form_id` in `xform_ids` once.
///
/// Order inside the block is fixed: create, update, close, index, attachment (R11), then the
/// bookkeeping of R24.
pub fn apply_block(case: Option<Case>, block: &BlockApplied, form_id: &FormId) -> Case {
    let mut case = case.unwrap_or_else(|| Case::empty(block.case_id.clone()));
    let a = &block.actions;
    if let Some(create) = &a.create {
        // R15: create overwrites name, type and (when given) owner; nothing else.
        case.case_type.clone_from(&create.case_type);
        case.case_name.clone_from(&create.case_name);
        if let Some(owner) = &create.owner_id {
            case.owner_id.clone_from(owner);
        }
        if let Some(ext) = &create.external_id {
            case.external_id = Some(ext.clone());
        }
        if let Some(opened) = create.date_opened {
            case.opened_on = Some(opened);
        }
    }
    for (name, value) in &a.update {
        match name.as_str() {
            // R18: reserved names map to fields.
            "case_name" => case.case_name.clone_from(value),
            "case_type" => case.case_type.clone_from(value),
            "owner_id" => case.owner_id.clone_from(value),
            "external_id" => case.external_id = Some(value.clone()),
            "date_opened" => {
                // Validated by the parser (CaseValueError); an empty value leaves it alone.
                if let Ok(t) = Timestamp::parse_phone(value) {
                    case.opened_on = Some(t);
                }
            }
            // R19: system fields cannot be overwritten; `<closed>false</closed>` never reopens.
            n if RESTRICTED_PROPERTIES.contains(&n) => {}
            _ => {
                case.properties.insert(name.clone(), value.clone());
            }
        }
    }
    if a.close {
        // R21: a second close overwrites closed_on/closed_by.
        case.closed = true;
        case.closed_on = Some(block.date);
        case.closed_by = Some(block.user.clone());
    }
    for ix in &a.index {
        // R28: empty value deletes; otherwise set or replace.
        if ix.case_id.trim().is_empty() {
            case.indices.remove(&ix.identifier);
        } else {
            case.indices.insert(
                ix.identifier.clone(),
                Index {
                    case_id: CaseId::new(ix.case_id.trim()),
                    case_type: ix.case_type.clone(),
                    relationship: ix.relationship,
                },
            );
        }
    }
    for at in &a.attachment {
        if at.src.is_none() && at.from.is_none() {
            case.attachments.remove(&at.identifier);
        } else {
            case.attachments.insert(
                at.identifier.clone(),
                Attachment {
                    src: at.src.clone(),
                    from: at.from.clone(),
                    name: at.name.clone(),
                },
            );
        }
    }
    // R24 bookkeeping.
    case.user_id.clone_from(&block.user);
    if case.modified_on.is_none_or(|m| block.date >= m) {
        case.modified_on = Some(block.date);
        case.modified_on_by = Some(block.user.clone());
    }
    if case.opened_on.is_none() {
        case.opened_on = Some(block.date);
    }
    if case.opened_by.is_none() {
        case.opened_by = Some(block.user.clone());
    }
    if case.owner_id.trim().is_empty() {
        case.owner_id.clone_from(&block.user);
    }
    // R13: once per form; a form's blocks for one case are applied consecutively.
    if case.xform_ids.last() != Some(form_id) {
        case.xform_ids.push(form_id.clone());
    }
    case
}
