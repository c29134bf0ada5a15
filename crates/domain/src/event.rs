//! Events: the immutable facts the log stores, and their codes.
//!
//! Every variant of [`Event`] is one *event type at one version*: a change to a payload adds a new
//! variant (`FormAcceptedV2`) and keeps the old one readable forever (I6). [`Event::type_name`] and
//! [`Event::type_version`] give the pair that the log writes into each envelope's header.
//! Projections fold only these recorded facts, so a replay gives the same answer even after the
//! rules in `decide` change.
//!
//! The order of [`Event`]'s variants is part of the on-disk format: bincode stores the variant
//! index. New variants go at the end; none is ever removed or reordered
//! (`tests/data/fixtures/events-v1.bin` would stop decoding).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{ApiKeyId, AppId, BlockApplied, CaseId, FormId, GroupId, Position, Role, UserId};

/// Why a whole form was rejected (SEMANTICS §7, R50).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not well-formed, bad encoding, NUL, DTD/entities, or over a size/depth limit.
    InvalidXml,
    /// `meta/userID` is not a user of the project space.
    UnknownUser,
    /// A v1 or unknown case namespace (R8).
    UnsupportedCaseVersion,
    /// Empty, whitespace-only or over-long case id, or a deleted case.
    IllegalCaseId,
    /// Unparseable block `date_modified` (R76).
    PhoneDateValueError,
    /// A `<referral>` inside a case block.
    UsesReferrals,
    /// Over-long or malformed case values (R50, R51).
    CaseValueError,
    /// A create needing a default owner from a user in no case-sharing group (R38).
    NoCaseSharingGroup,
    /// A create needing a default owner from a user in several case-sharing groups (R38).
    MultipleCaseSharingGroups,
    /// Bad index attributes or targets (R26, R27, R29, R30).
    InvalidCaseIndex,
}

impl ErrorCode {
    /// All codes, in R52 precedence order (the first that applies wins).
    pub const PRECEDENCE: [ErrorCode; 10] = [
        ErrorCode::InvalidXml,
        ErrorCode::UnknownUser,
        ErrorCode::UnsupportedCaseVersion,
        ErrorCode::IllegalCaseId,
        ErrorCode::PhoneDateValueError,
        ErrorCode::UsesReferrals,
        ErrorCode::CaseValueError,
        ErrorCode::NoCaseSharingGroup,
        ErrorCode::MultipleCaseSharingGroups,
        ErrorCode::InvalidCaseIndex,
    ];

    /// Rank in R52 precedence (lower wins).
    pub fn rank(self) -> usize {
        Self::PRECEDENCE
            .iter()
            .position(|c| *c == self)
            .unwrap_or(usize::MAX)
    }

    /// Wire spelling, e.g. `NoCaseSharingGroup`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidXml => "InvalidXml",
            ErrorCode::UnknownUser => "UnknownUser",
            ErrorCode::UnsupportedCaseVersion => "UnsupportedCaseVersion",
            ErrorCode::IllegalCaseId => "IllegalCaseId",
            ErrorCode::PhoneDateValueError => "PhoneDateValueError",
            ErrorCode::UsesReferrals => "UsesReferrals",
            ErrorCode::CaseValueError => "CaseValueError",
            ErrorCode::NoCaseSharingGroup => "NoCaseSharingGroup",
            ErrorCode::MultipleCaseSharingGroups => "MultipleCaseSharingGroups",
            ErrorCode::InvalidCaseIndex => "InvalidCaseIndex",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed rejection: the code and a message that says what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The code.
    pub code: ErrorCode,
    /// Human-readable detail naming the case id / element.
    pub message: String,
}

/// Diagnostic codes of SEMANTICS §9 (R59–R66).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DiagnosticCode {
    /// R59.
    UserNotInCaseSharingGroup,
    /// R60.
    UserInMultipleCaseSharingGroups,
    /// R61.
    CaseSharingAppWithoutGroups,
    /// R62.
    CaseTypeMismatch,
    /// R63.
    ClosedCaseUpdated,
    /// R64.
    OwnerUnknown,
    /// R65.
    OutOfOrderEdit,
    /// R66.
    RejectedSubmission,
}

impl DiagnosticCode {
    /// Wire spelling, e.g. `closed_case_updated`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiagnosticCode::UserNotInCaseSharingGroup => "user_not_in_case_sharing_group",
            DiagnosticCode::UserInMultipleCaseSharingGroups => {
                "user_in_multiple_case_sharing_groups"
            }
            DiagnosticCode::CaseSharingAppWithoutGroups => "case_sharing_app_without_groups",
            DiagnosticCode::CaseTypeMismatch => "case_type_mismatch",
            DiagnosticCode::ClosedCaseUpdated => "closed_case_updated",
            DiagnosticCode::OwnerUnknown => "owner_unknown",
            DiagnosticCode::OutOfOrderEdit => "out_of_order_edit",
            DiagnosticCode::RejectedSubmission => "rejected_submission",
        }
    }
}

impl fmt::Display for DiagnosticCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validation finding that never blocks processing (§9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// The code.
    pub code: DiagnosticCode,
    /// A user id, app id, case id or form instanceID.
    pub subject: String,
    /// Human-readable detail.
    pub detail: String,
}

/// A submission as received: identity and the verbatim bytes (I7: nothing a client sent is dropped).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormRecord {
    /// The form id the submission was filed under (R3, R55).
    pub form_id: FormId,
    /// The form's xmlns, empty when the XML could not be read.
    pub xmlns: String,
    /// The app it was submitted through (R6).
    pub app_id: Option<AppId>,
    /// `meta/userID`.
    pub user_id: Option<String>,
    /// SHA-256 of `raw`, to tell duplicates from edits (R53, R54).
    pub content_hash: [u8; 32],
    /// The bytes exactly as received: inline, or stored out of line by the log (then only their
    /// length is here, and `content_hash` names them).
    pub raw: RawBytes,
}

/// The verbatim bytes of a submission, as [`FormRecord::raw`] holds them.
///
/// An event is decided with its bytes [`RawBytes::Inline`]. The log may store them out of line
/// (content-addressed by [`FormRecord::content_hash`], see the `eventlog` crate): an event read
/// back from such a log holds [`RawBytes::Detached`], and the log's raw-submission read gives
/// the bytes. Both serialise as the same byte string field, so the event's encoding and type
/// version do not change; a detached value serialises as an empty one, which only the log,
/// which records the length and hash beside it, may do.
#[derive(Clone, PartialEq, Eq)]
pub enum RawBytes {
    /// The bytes themselves.
    Inline(Vec<u8>),
    /// Stored out of line; `len` bytes whose SHA-256 is the form's `content_hash`.
    Detached {
        /// Length of the bytes.
        len: u64,
    },
}

impl RawBytes {
    /// The bytes, when they are inline.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            RawBytes::Inline(bytes) => Some(bytes),
            RawBytes::Detached { .. } => None,
        }
    }

    /// Their length, inline or not.
    pub fn len(&self) -> u64 {
        match self {
            RawBytes::Inline(bytes) => bytes.len() as u64,
            RawBytes::Detached { len } => *len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes are stored out of line.
    pub fn is_detached(&self) -> bool {
        matches!(self, RawBytes::Detached { .. })
    }
}

impl From<Vec<u8>> for RawBytes {
    fn from(bytes: Vec<u8>) -> Self {
        RawBytes::Inline(bytes)
    }
}

impl fmt::Debug for RawBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawBytes::Inline(bytes) => write!(f, "Inline({} bytes)", bytes.len()),
            RawBytes::Detached { len } => write!(f, "Detached({len} bytes)"),
        }
    }
}

impl Serialize for RawBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes_compat::serialize(self.bytes().unwrap_or_default(), s)
    }
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_bytes_compat::deserialize(d).map(RawBytes::Inline)
    }
}

impl fmt::Debug for FormRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FormRecord")
            .field("form_id", &self.form_id)
            .field("xmlns", &self.xmlns)
            .field("app_id", &self.app_id)
            .field("user_id", &self.user_id)
            .field("raw", &self.raw)
            .finish()
    }
}

/// Serialises `Vec<u8>` as one byte string instead of a sequence of numbers.
mod serde_bytes_compat {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    struct BytesVisitor;

    impl<'de> de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }
}

/// `UserCreated` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCreatedV1 {
    /// Id.
    pub user_id: UserId,
    /// Login name.
    pub username: String,
}

/// `GroupCreated` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCreatedV1 {
    /// Id.
    pub group_id: GroupId,
    /// Display name.
    pub name: String,
    /// Case sharing on.
    pub case_sharing: bool,
}

/// `GroupCaseSharingSet` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCaseSharingSetV1 {
    /// Group.
    pub group_id: GroupId,
    /// New flag.
    pub case_sharing: bool,
}

/// `MemberAdded` / `MemberRemoved` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipV1 {
    /// Group.
    pub group_id: GroupId,
    /// User.
    pub user_id: UserId,
}

/// `AppCreated` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppCreatedV1 {
    /// Id.
    pub app_id: AppId,
    /// Display name.
    pub name: String,
    /// Case sharing on.
    pub case_sharing: bool,
    /// Declared case types (R43, R62).
    pub case_types: Vec<String>,
}

/// `AppCaseSharingSet` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppCaseSharingSetV1 {
    /// App.
    pub app_id: AppId,
    /// New flag.
    pub case_sharing: bool,
}

/// `FormAccepted` v1: the form and the case blocks it applied, in application order (R12), with
/// the server-resolved owner, date and user of each block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormAcceptedV1 {
    /// The submission.
    pub form: FormRecord,
    /// Blocks in the order they were applied.
    pub blocks: Vec<BlockApplied>,
}

/// Distinct case ids of some blocks, in first-touch order.
pub fn case_ids_of(blocks: &[BlockApplied]) -> Vec<CaseId> {
    let mut out: Vec<CaseId> = Vec::new();
    for b in blocks {
        if !out.contains(&b.case_id) {
            out.push(b.case_id.clone());
        }
    }
    out
}

impl FormAcceptedV1 {
    /// Distinct case ids the form touched, in first-touch order.
    pub fn case_ids(&self) -> Vec<CaseId> {
        case_ids_of(&self.blocks)
    }
}

impl Event {
    /// The submission a form event carries (`FormAccepted`, `FormRejected`, `FormDuplicate`,
    /// `FormEdited`).
    pub fn form_record(&self) -> Option<&FormRecord> {
        match self {
            Event::FormAcceptedV1(f) => Some(&f.form),
            Event::FormRejectedV1(f) => Some(&f.form),
            Event::FormDuplicateV1(f) => Some(&f.form),
            Event::FormEditedV1(f) => Some(&f.form),
            _ => None,
        }
    }

    /// [`Event::form_record`], mutable (the log detaches and reattaches raw bytes).
    pub fn form_record_mut(&mut self) -> Option<&mut FormRecord> {
        match self {
            Event::FormAcceptedV1(f) => Some(&mut f.form),
            Event::FormRejectedV1(f) => Some(&mut f.form),
            Event::FormDuplicateV1(f) => Some(&mut f.form),
            Event::FormEditedV1(f) => Some(&mut f.form),
            _ => None,
        }
    }

    /// The form id and blocks of an event that carries a form version in force
    /// (`FormAccepted`, `FormEdited`).
    pub fn form_blocks(&self) -> Option<(&FormId, &[BlockApplied])> {
        match self {
            Event::FormAcceptedV1(f) => Some((&f.form.form_id, &f.blocks)),
            Event::FormEditedV1(f) => Some((&f.form.form_id, &f.blocks)),
            _ => None,
        }
    }
}

/// `FormRejected` v1: stored with its typed error (R49).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormRejectedV1 {
    /// The submission.
    pub form: FormRecord,
    /// Why.
    pub error: Rejection,
}

/// `FormDuplicate` v1: an identical resend of an accepted form (R53); no case effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormDuplicateV1 {
    /// The resent submission (kept too).
    pub form: FormRecord,
    /// Where the original was accepted.
    pub original: Position,
}

/// `FormEdited` v1: a new version of an accepted form (same instanceID and xmlns, other bytes,
/// R54). It takes the old version's place in received order; affected cases are rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormEditedV1 {
    /// The new version (both versions stay in the log).
    pub form: FormRecord,
    /// Position of the version it replaces.
    pub replaces: Position,
    /// The new version's blocks, resolved as for `FormAccepted`.
    pub blocks: Vec<BlockApplied>,
}

/// `FormArchived` / `FormUnarchived` v1 (R57).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormArchiveV1 {
    /// The form.
    pub form_id: FormId,
}

/// A file sent with a submission (multipart part other than the form), kept verbatim.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentFile {
    /// The part's file name, which a case block's `<attachment src=…>` refers to (R31).
    pub name: String,
    /// The bytes exactly as received.
    #[serde(with = "serde_bytes_compat")]
    pub bytes: Vec<u8>,
}

impl fmt::Debug for AttachmentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AttachmentFile({:?}, {} bytes)",
            self.name,
            self.bytes.len()
        )
    }
}

/// `FormAttachments` v1: the files sent with a submission, whatever its outcome (I7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormAttachmentsV1 {
    /// The form id the submission was filed under.
    pub form_id: FormId,
    /// The files.
    pub files: Vec<AttachmentFile>,
}

/// `UserPasswordSet` v1: a mobile worker's password, as an argon2id PHC string. The password
/// itself is never recorded; the hash is in the log and in exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPasswordSetV1 {
    /// The user.
    pub user_id: UserId,
    /// `$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`.
    pub hash: String,
}

/// `ApiKeyCreated` v1: an API key of a user with a role; only its hash is recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyCreatedV1 {
    /// The key's public id.
    pub key_id: ApiKeyId,
    /// The user the key authenticates as.
    pub user_id: UserId,
    /// What the key may do.
    pub role: Role,
    /// argon2id PHC string of the key's secret.
    pub hash: String,
}

/// `ApiKeyRevoked` v1: the key stops authenticating from this position on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRevokedV1 {
    /// The key.
    pub key_id: ApiKeyId,
}

/// `FormLastSyncToken` v1: the sync token a phone named as its base when it submitted the form
/// (`X-CommCareHQ-LastSyncToken`), recorded right after the form's event, whatever its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormLastSyncTokenV1 {
    /// The form id the submission was filed under.
    pub form_id: FormId,
    /// The token as the phone sent it.
    pub token: String,
}

/// `DiagnosticRaised` v1 (§9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticRaisedV1 {
    /// The finding.
    pub diagnostic: Diagnostic,
}

/// Every event type, each at a fixed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// A mobile worker was created.
    UserCreatedV1(UserCreatedV1),
    /// A group was created.
    GroupCreatedV1(GroupCreatedV1),
    /// A group's case sharing flag changed.
    GroupCaseSharingSetV1(GroupCaseSharingSetV1),
    /// A user joined a group.
    MemberAddedV1(MembershipV1),
    /// A user left a group.
    MemberRemovedV1(MembershipV1),
    /// An app was created.
    AppCreatedV1(AppCreatedV1),
    /// An app's case sharing flag changed.
    AppCaseSharingSetV1(AppCaseSharingSetV1),
    /// A form was accepted and applied to cases.
    FormAcceptedV1(FormAcceptedV1),
    /// A form was rejected and stored.
    FormRejectedV1(FormRejectedV1),
    /// A form was an identical resend.
    FormDuplicateV1(FormDuplicateV1),
    /// A diagnostic was raised.
    DiagnosticRaisedV1(DiagnosticRaisedV1),
    /// An accepted form was replaced by a new version.
    FormEditedV1(FormEditedV1),
    /// A form stopped counting.
    FormArchivedV1(FormArchiveV1),
    /// An archived form counts again.
    FormUnarchivedV1(FormArchiveV1),
    /// Files sent with a submission.
    FormAttachmentsV1(FormAttachmentsV1),
    /// A user's password was set (its hash).
    UserPasswordSetV1(UserPasswordSetV1),
    /// An API key was created (its hash).
    ApiKeyCreatedV1(ApiKeyCreatedV1),
    /// An API key was revoked.
    ApiKeyRevokedV1(ApiKeyRevokedV1),
    /// The sync token a submission named as its base.
    FormLastSyncTokenV1(FormLastSyncTokenV1),
}

impl Event {
    /// The event type's stable name (without version), as written in envelope headers.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::UserCreatedV1(_) => "UserCreated",
            Event::GroupCreatedV1(_) => "GroupCreated",
            Event::GroupCaseSharingSetV1(_) => "GroupCaseSharingSet",
            Event::MemberAddedV1(_) => "MemberAdded",
            Event::MemberRemovedV1(_) => "MemberRemoved",
            Event::AppCreatedV1(_) => "AppCreated",
            Event::AppCaseSharingSetV1(_) => "AppCaseSharingSet",
            Event::FormAcceptedV1(_) => "FormAccepted",
            Event::FormRejectedV1(_) => "FormRejected",
            Event::FormDuplicateV1(_) => "FormDuplicate",
            Event::DiagnosticRaisedV1(_) => "DiagnosticRaised",
            Event::FormEditedV1(_) => "FormEdited",
            Event::FormArchivedV1(_) => "FormArchived",
            Event::FormUnarchivedV1(_) => "FormUnarchived",
            Event::FormAttachmentsV1(_) => "FormAttachments",
            Event::UserPasswordSetV1(_) => "UserPasswordSet",
            Event::ApiKeyCreatedV1(_) => "ApiKeyCreated",
            Event::ApiKeyRevokedV1(_) => "ApiKeyRevoked",
            Event::FormLastSyncTokenV1(_) => "FormLastSyncToken",
        }
    }

    /// The event type's version.
    pub fn type_version(&self) -> u16 {
        match self {
            Event::UserCreatedV1(_)
            | Event::GroupCreatedV1(_)
            | Event::GroupCaseSharingSetV1(_)
            | Event::MemberAddedV1(_)
            | Event::MemberRemovedV1(_)
            | Event::AppCreatedV1(_)
            | Event::AppCaseSharingSetV1(_)
            | Event::FormAcceptedV1(_)
            | Event::FormRejectedV1(_)
            | Event::FormDuplicateV1(_)
            | Event::DiagnosticRaisedV1(_)
            | Event::FormEditedV1(_)
            | Event::FormArchivedV1(_)
            | Event::FormUnarchivedV1(_)
            | Event::FormAttachmentsV1(_)
            | Event::UserPasswordSetV1(_)
            | Event::ApiKeyCreatedV1(_)
            | Event::ApiKeyRevokedV1(_)
            | Event::FormLastSyncTokenV1(_) => 1,
        }
    }
}
