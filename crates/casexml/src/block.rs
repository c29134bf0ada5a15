//! What a v2 case block means: attributes (R9), actions (R10, R11, R80), create (R14, R51), update
//! (R17–R20), close (R21), index (R25–R28), attachment (R31), referrals (R50).
//!
//! The walker in `walk.rs` owns the XML; it hands this module one finished piece at a time (the
//! block's attributes, a field's trimmed text, an attachment's attributes) and this module turns
//! it into `domain` types and [`Problem`]s. Problems never stop the parse: the form is still
//! returned and `domain::decide` picks the one that wins by R52 precedence.

use std::borrow::Cow;
use std::collections::HashMap;

use domain::{
    Actions, AttachmentChange, CaseBlock, CaseId, Create, ErrorCode, IndexChange, Problem,
    Relationship, Timestamp, MAX_VALUE_LEN,
};

/// At most this many problems are kept per error code. `decide` reports the first problem of
/// the winning code (R52), so dropping later ones of the same code loses nothing it uses, and a
/// crafted form with a million bad properties cannot make the problem list huge.
const MAX_PROBLEMS_PER_CODE: usize = 32;

/// The problems of one form, in document order, capped per code.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    list: Vec<Problem>,
    per_code: [usize; 16],
}

impl Problems {
    fn slot(code: ErrorCode) -> usize {
        code.rank().min(15)
    }

    /// Records a problem unless its code already has [`MAX_PROBLEMS_PER_CODE`].
    pub(crate) fn push(&mut self, code: ErrorCode, message: String) {
        let Some(count) = self.per_code.get_mut(Self::slot(code)) else {
            return;
        };
        if *count < MAX_PROBLEMS_PER_CODE {
            *count += 1;
            self.list.push(Problem { code, message });
        }
    }

    /// A position to [`Problems::truncate`] back to.
    pub(crate) fn mark(&self) -> usize {
        self.list.len()
    }

    /// Forgets the problems recorded since `mark`.
    pub(crate) fn truncate(&mut self, mark: usize) {
        for p in self.list.get(mark..).unwrap_or_default() {
            if let Some(count) = self.per_code.get_mut(Self::slot(p.code)) {
                *count = count.saturating_sub(1);
            }
        }
        self.list.truncate(mark);
    }

    pub(crate) fn into_vec(self) -> Vec<Problem> {
        self.list
    }
}

/// A direct child of a block that carries an action (R10). Others are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActionKind {
    Create,
    Update,
    Close,
    Index,
    Attachment,
}

impl ActionKind {
    pub(crate) fn from_local(local: &str) -> Option<Self> {
        match local {
            "create" => Some(Self::Create),
            "update" => Some(Self::Update),
            "close" => Some(Self::Close),
            "index" => Some(Self::Index),
            "attachment" => Some(Self::Attachment),
            _ => None,
        }
    }
}

/// The children of `<create>` that mean something (R14); others are ignored as HQ does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreateField {
    CaseType,
    CaseName,
    OwnerId,
    ExternalId,
    DateOpened,
}

impl CreateField {
    pub(crate) fn from_local(local: &str) -> Option<Self> {
        match local {
            "case_type" => Some(Self::CaseType),
            "case_name" => Some(Self::CaseName),
            "owner_id" => Some(Self::OwnerId),
            "external_id" => Some(Self::ExternalId),
            "date_opened" => Some(Self::DateOpened),
            _ => None,
        }
    }
}

/// A leaf element inside an action whose text the walker collects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    /// A child of `<create>`.
    Create(CreateField),
    /// A child of `<update>`: the property name (local name).
    Update(String),
    /// A child of `<index>`: identifier (local name) and its attributes.
    Index {
        identifier: String,
        case_type: Option<String>,
        relationship: Option<String>,
    },
}

/// The attributes a case block element may carry (R9), already unescaped.
#[derive(Debug, Default)]
pub(crate) struct BlockAttrs {
    pub(crate) case_id: Option<String>,
    pub(crate) date_modified: Option<String>,
    pub(crate) user_id: Option<String>,
}

/// `<create>` children as they arrive; turned into [`Create`] when the block ends.
#[derive(Debug, Default)]
struct CreateBuilder {
    case_type: Option<String>,
    case_name: Option<String>,
    owner_id: Option<String>,
    external_id: Option<String>,
    date_opened: Option<Timestamp>,
}

/// Which list of [`Actions`] a held problem's value is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Update,
    Index,
}

/// A problem of one update or index value, held until the block ends: R80 validates only the
/// last value of a property or index identifier given more than once.
#[derive(Debug)]
struct HeldProblem {
    list: Held,
    /// Position of the value in `actions.update` or `actions.index`.
    at: usize,
    problem: Problem,
}

/// A v2 case block being read.
#[derive(Debug)]
pub(crate) struct BlockBuilder {
    case_id: String,
    /// `case_id` quoted and shortened for messages.
    label: String,
    date_modified: Option<Timestamp>,
    user_id: Option<String>,
    actions: Actions,
    create: Option<CreateBuilder>,
    referral_reported: bool,
    /// At most a few per value, so bounded by `Limits::max_block_elements`.
    held: Vec<HeldProblem>,
}

/// A value quoted for a message and shortened: a 1 MB property (or case id, repeated in every
/// message about its block) must not make the problem list huge.
pub(crate) fn preview(value: &str) -> String {
    const MAX: usize = 80;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", value.get(..cut).unwrap_or("")),
        None => format!("{value:?}"),
    }
}

/// An element name or path shortened for a message, for the same reason as [`preview`].
pub(crate) fn clip(name: &str) -> Cow<'_, str> {
    const MAX: usize = 160;
    match name.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}…", name.get(..cut).unwrap_or(""))),
        None => Cow::Borrowed(name),
    }
}

/// `None` for an absent, empty or whitespace-only value; otherwise the trimmed value.
fn non_blank(value: Option<String>) -> Option<String> {
    let value = value?;
    let trimmed = value.trim();
    match trimmed.len() {
        0 => None,
        n if n == value.len() => Some(value),
        _ => Some(trimmed.to_owned()),
    }
}

impl BlockBuilder {
    /// Starts a block from its attributes (R9). `qname` and `offset` locate the block element
    /// for messages about a case id that cannot itself name the block.
    pub(crate) fn start(
        attrs: BlockAttrs,
        qname: &str,
        offset: u64,
        problems: &mut Problems,
    ) -> Self {
        let raw_id = attrs.case_id.unwrap_or_default();
        let case_id = raw_id.trim().to_owned();
        // R9/R50: case_id must be non-empty, not whitespace-only, at most 255 characters.
        if case_id.is_empty() {
            let what = if raw_id.is_empty() {
                "is empty".to_owned()
            } else {
                format!("{} is whitespace-only", preview(&raw_id))
            };
            problems.push(
                ErrorCode::IllegalCaseId,
                format!("case block <{qname}> at byte {offset}: case_id {what}"),
            );
        } else if case_id.chars().count() > MAX_VALUE_LEN {
            problems.push(
                ErrorCode::IllegalCaseId,
                format!(
                    "case block <{qname}> at byte {offset}: case_id {} is {} characters long \
                     (max {MAX_VALUE_LEN})",
                    preview(&case_id),
                    case_id.chars().count()
                ),
            );
        }
        // R9/R76: an absent date_modified means "received time" (decided later). HQ validates
        // with `none_ok`, so an empty attribute counts as absent too.
        let date_modified = match non_blank(attrs.date_modified) {
            None => None,
            Some(text) => match Timestamp::parse_phone(&text) {
                Ok(t) => Some(t),
                Err(_) => {
                    problems.push(
                        ErrorCode::PhoneDateValueError,
                        format!(
                            "case {}: date_modified {} on <{qname}> is not an ISO 8601 \
                             datetime",
                            preview(&case_id),
                            preview(&text)
                        ),
                    );
                    None
                }
            },
        };
        BlockBuilder {
            label: preview(&case_id),
            case_id,
            date_modified,
            // R9: an empty user_id falls back to meta/userID later.
            user_id: non_blank(attrs.user_id),
            actions: Actions::default(),
            create: None,
            referral_reported: false,
            held: Vec::new(),
        }
    }

    /// A direct child of the block that is an action (R10). Several `<update>`/`<index>`/
    /// `<attachment>` elements add up; several `<create>` elements merge (last value wins).
    pub(crate) fn action(&mut self, kind: ActionKind) {
        match kind {
            ActionKind::Create => {
                self.create.get_or_insert_with(CreateBuilder::default);
            }
            // R21: `<close/>`, whatever its content.
            ActionKind::Close => self.actions.close = true,
            ActionKind::Update | ActionKind::Index | ActionKind::Attachment => {}
        }
    }

    /// A `<referral>` anywhere inside the block: HQ refuses referrals (R50 UsesReferrals).
    /// Reported once per block.
    pub(crate) fn referral(&mut self, path: &str, problems: &mut Problems) {
        if !self.referral_reported {
            self.referral_reported = true;
            let qname = clip(path.rsplit('/').next().unwrap_or_default());
            problems.push(
                ErrorCode::UsesReferrals,
                format!(
                    "case {}: <{qname}> (at {}) is a referral; referrals are not supported",
                    self.label,
                    clip(path)
                ),
            );
        }
    }

    /// A child of `<attachment>` (R31). Empty attribute values count as absent, so that a
    /// child with `src=""` and no `from` is a removal, as HQ's `is_delete` has it.
    pub(crate) fn attachment(
        &mut self,
        identifier: &str,
        src: Option<String>,
        from: Option<String>,
        name: Option<String>,
    ) {
        self.actions.attachment.push(AttachmentChange {
            identifier: identifier.to_owned(),
            src: non_blank(src),
            from: non_blank(from),
            name: non_blank(name),
        });
    }

    /// Checks a case value's length (R50: at most 255 characters).
    fn check_len(&self, qname: &str, value: &str, problems: &mut Problems) {
        let n = value.chars().count();
        if n > MAX_VALUE_LEN {
            problems.push(
                ErrorCode::CaseValueError,
                format!(
                    "case {}: <{qname}> is {n} characters long (max {MAX_VALUE_LEN})",
                    self.label
                ),
            );
        }
    }

    /// Parses a `date_opened` value (R76 grammar, CaseValueError when it fails). Empty means
    /// "not given".
    fn date_opened(&self, qname: &str, value: &str, problems: &mut Problems) -> Option<Timestamp> {
        if value.is_empty() {
            return None;
        }
        match Timestamp::parse_phone(value) {
            Ok(t) => Some(t),
            Err(_) => {
                problems.push(
                    ErrorCode::CaseValueError,
                    format!(
                        "case {}: <{qname}> {} is not an ISO 8601 date or datetime",
                        self.label,
                        preview(value)
                    ),
                );
                None
            }
        }
    }

    /// A leaf inside an action has ended. `text` is its character data (trimmed here);
    /// `has_children` says it also contained elements.
    pub(crate) fn finish_field(
        &mut self,
        field: Field,
        has_children: bool,
        text: &str,
        qname: &str,
        problems: &mut Problems,
    ) {
        let value = text.trim();
        match field {
            Field::Create(which) => {
                if has_children {
                    self.element_children(qname, problems);
                }
                if matches!(
                    which,
                    CreateField::CaseType
                        | CreateField::CaseName
                        | CreateField::OwnerId
                        | CreateField::ExternalId
                ) {
                    self.check_len(qname, value, problems);
                }
                let date = match which {
                    CreateField::DateOpened => self.date_opened(qname, value, problems),
                    _ => None,
                };
                let Some(create) = self.create.as_mut() else {
                    return;
                };
                let value = value.to_owned();
                match which {
                    CreateField::CaseType => create.case_type = Some(value),
                    CreateField::CaseName => create.case_name = Some(value),
                    // R14/R38: empty or whitespace owner_id means "no owner given".
                    CreateField::OwnerId => create.owner_id = non_blank(Some(value)),
                    CreateField::ExternalId => create.external_id = non_blank(Some(value)),
                    CreateField::DateOpened => create.date_opened = date,
                }
            }
            Field::Update(name) => {
                let mut found = Problems::default();
                if has_children {
                    // caseledger rule (R50): a property is text; nested elements are refused
                    // rather than flattened.
                    self.element_children(qname, &mut found);
                }
                // R18: the reserved names keep their place in the list (apply_block maps them)
                // but their values are checked like create's.
                match name.as_str() {
                    "case_name" | "case_type" | "owner_id" | "external_id" => {
                        self.check_len(qname, value, &mut found);
                    }
                    "date_opened" => {
                        self.date_opened(qname, value, &mut found);
                    }
                    _ => {}
                }
                // R17/R20/R80: trimmed text, document order, duplicates kept (last wins later).
                self.hold(Held::Update, self.actions.update.len(), found);
                self.actions.update.push((name, value.to_owned()));
            }
            Field::Index {
                identifier,
                case_type,
                relationship,
            } => {
                let mut found = Problems::default();
                let at = self.actions.index.len();
                self.finish_index(
                    identifier,
                    case_type,
                    relationship,
                    has_children,
                    value,
                    qname,
                    &mut found,
                );
                self.hold(Held::Index, at, found);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_index(
        &mut self,
        identifier: String,
        case_type: Option<String>,
        relationship: Option<String>,
        has_children: bool,
        value: &str,
        qname: &str,
        problems: &mut Problems,
    ) {
        let id = &self.label;
        if has_children {
            problems.push(
                ErrorCode::InvalidCaseIndex,
                format!(
                    "case {id}: index <{qname}> contains elements; its value must be a case id"
                ),
            );
        }
        // R26: case_type is required. HQ checks for it before looking at the value
        // (`CaseIndexAction.from_v2`), so a deletion (R28: empty value) needs it too.
        if case_type.is_none() {
            problems.push(
                ErrorCode::InvalidCaseIndex,
                format!("case {id}: index <{qname}> has no case_type attribute"),
            );
        }
        // R27: absent or empty relationship is child; only child/extension are known.
        let relationship = match relationship.as_deref().map(str::trim) {
            None | Some("") | Some("child") => Relationship::Child,
            Some("extension") => Relationship::Extension,
            Some(other) => {
                problems.push(
                    ErrorCode::InvalidCaseIndex,
                    format!(
                        "case {id}: index <{qname}> has relationship {}; expected \"child\" or \
                         \"extension\"",
                        preview(other)
                    ),
                );
                Relationship::Child
            }
        };
        self.actions.index.push(IndexChange {
            identifier,
            case_id: value.to_owned(),
            case_type: case_type.map(|t| t.trim().to_owned()).unwrap_or_default(),
            relationship,
        });
    }

    /// Keeps the problems of the value at `at` until the block ends (R80).
    fn hold(&mut self, list: Held, at: usize, found: Problems) {
        self.held
            .extend(
                found
                    .into_vec()
                    .into_iter()
                    .map(|problem| HeldProblem { list, at, problem }),
            );
    }

    fn element_children(&self, qname: &str, problems: &mut Problems) {
        problems.push(
            ErrorCode::CaseValueError,
            format!(
                "case {}: <{qname}> contains elements; a case value must be text",
                self.label
            ),
        );
    }

    /// The block element has ended: R51 checks on `<create>`, then the finished block.
    pub(crate) fn finish(self, problems: &mut Problems) -> CaseBlock {
        let BlockBuilder {
            case_id,
            label,
            date_modified,
            user_id,
            mut actions,
            create,
            held,
            ..
        } = self;
        // R80: of a property or index identifier given more than once, only the last value is
        // validated; the problems of the values it replaced are dropped.
        {
            let last_update: HashMap<&str, usize> = (actions.update.iter().enumerate())
                .map(|(i, (name, _))| (name.as_str(), i))
                .collect();
            let last_index: HashMap<&str, usize> = (actions.index.iter().enumerate())
                .map(|(i, ix)| (ix.identifier.as_str(), i))
                .collect();
            for h in held {
                let is_last = match h.list {
                    Held::Update => actions
                        .update
                        .get(h.at)
                        .and_then(|(name, _)| last_update.get(name.as_str())),
                    Held::Index => actions
                        .index
                        .get(h.at)
                        .and_then(|ix| last_index.get(ix.identifier.as_str())),
                } == Some(&h.at);
                if is_last {
                    problems.push(h.problem.code, h.problem.message);
                }
            }
        }
        if let Some(c) = create {
            // R51: caseledger requires both elements (the phone does too; HQ tolerates).
            let missing: Vec<&str> = [
                ("case_type", c.case_type.is_none()),
                ("case_name", c.case_name.is_none()),
            ]
            .iter()
            .filter(|(_, m)| *m)
            .map(|(n, _)| *n)
            .collect();
            if !missing.is_empty() {
                problems.push(
                    ErrorCode::CaseValueError,
                    format!("case {label}: <create> has no <{}>", missing.join("> or <")),
                );
            }
            actions.create = Some(Create {
                case_type: c.case_type.unwrap_or_default(),
                case_name: c.case_name.unwrap_or_default(),
                owner_id: c.owner_id,
                external_id: c.external_id,
                date_opened: c.date_opened,
            });
        }
        CaseBlock {
            case_id: CaseId(case_id),
            date_modified,
            user_id,
            actions,
        }
    }
}
