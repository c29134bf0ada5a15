//! A parsed form submission: what `casexml` hands to [`crate::decide`].
//!
//! The parser does not decide anything that depends on project state: it reports the form's
//! identity, its meta block, its case blocks in document order and every *problem* it found, each
//! with the error code it would cause. `decide` then applies the precedence of R52, because some
//! checks that outrank parse problems (UnknownUser) need the project's directory.

use serde::{Deserialize, Serialize};

use crate::{CaseId, ErrorCode, FormId, Timestamp};

/// The case-block actions of R10, in the shape shared by parsed blocks and recorded events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actions {
    /// `<create>` (R14).
    pub create: Option<Create>,
    /// `<update>` children in document order, values trimmed (R17); last one wins (R20).
    pub update: Vec<(String, String)>,
    /// `<close/>` present (R21).
    pub close: bool,
    /// `<index>` children (R25–R28).
    pub index: Vec<IndexChange>,
    /// `<attachment>` children (R31).
    pub attachment: Vec<AttachmentChange>,
}

impl Actions {
    /// The key R12 sorts same-case blocks by: create 0, update 1, index 2, close 3, attachment 4;
    /// a no-op block counts as update.
    pub fn order_key(&self) -> u8 {
        if self.create.is_some() {
            0
        } else if !self.update.is_empty() {
            1
        } else if !self.index.is_empty() {
            2
        } else if self.close {
            3
        } else if !self.attachment.is_empty() {
            4
        } else {
            1
        }
    }

    /// True when the block carries only `<close/>` (R63 does not flag those).
    pub fn is_close_only(&self) -> bool {
        self.close
            && self.create.is_none()
            && self.update.is_empty()
            && self.index.is_empty()
            && self.attachment.is_empty()
    }
}

/// `<create>`: type, name and optional owner (R14); `external_id`/`date_opened` when sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    /// `case_type`.
    pub case_type: String,
    /// `case_name`.
    pub case_name: String,
    /// `owner_id`; `None` when absent, empty or whitespace (R38). In a recorded event this is the
    /// server-resolved owner.
    pub owner_id: Option<String>,
    /// `external_id`, a known create property (R14).
    pub external_id: Option<String>,
    /// `date_opened`, a known create property (R14), already parsed.
    pub date_opened: Option<Timestamp>,
}

/// Index relationship (R27).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relationship {
    /// A parent/child index (the default).
    Child,
    /// A host/extension index.
    Extension,
}

impl Relationship {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Relationship::Child => "child",
            Relationship::Extension => "extension",
        }
    }
}

/// One child of `<index>`: identifier, target and its type; an empty target deletes (R28).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexChange {
    /// The element name (`parent`, `host`, …).
    pub identifier: String,
    /// Referenced case id; empty means "delete this index".
    pub case_id: String,
    /// The referenced case's type (`case_type` attribute, required by R26).
    pub case_type: String,
    /// `relationship` attribute (R27).
    pub relationship: Relationship,
}

/// One child of `<attachment>`; `src` and `from` both absent means "remove" (R31).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentChange {
    /// The element name.
    pub identifier: String,
    /// `src` attribute.
    pub src: Option<String>,
    /// `from` attribute (`local`, `remote`, `inline`).
    pub from: Option<String>,
    /// `name` attribute.
    pub name: Option<String>,
}

/// A case block as parsed (R7–R10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseBlock {
    /// `case_id` attribute.
    pub case_id: CaseId,
    /// `date_modified`, parsed (R76); `None` when absent or unparseable (the latter is also a
    /// `PhoneDateValueError` problem).
    pub date_modified: Option<Timestamp>,
    /// `user_id` attribute; `None` when absent or empty (R9).
    pub user_id: Option<String>,
    /// The actions.
    pub actions: Actions,
}

/// Something wrong with the form that rejects it whole (R49), found while parsing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The error code.
    pub code: ErrorCode,
    /// What is wrong and where (case id, element).
    pub message: String,
}

/// A well-formed submission, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedForm {
    /// `meta/instanceID`, or `sha256:<hex of the bytes>` without one (R3).
    pub instance_id: FormId,
    /// The root element's namespace (the form's xmlns, R1).
    pub xmlns: String,
    /// `meta/userID`, the submitting user (R2).
    pub user_id: Option<String>,
    /// `meta/username`.
    pub username: Option<String>,
    /// `meta/timeEnd`, informational only (R78).
    pub time_end: Option<String>,
    /// True for a device log (R4): stored, no case processing.
    pub device_report: bool,
    /// Case blocks in document order (R7).
    pub blocks: Vec<CaseBlock>,
    /// Every problem found, in document order; `decide` picks by R52 precedence.
    pub problems: Vec<Problem>,
}
