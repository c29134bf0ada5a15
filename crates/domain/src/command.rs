//! Commands: what a caller asks for. Deciding one yields events or a [`CommandError`].

use crate::{ApiKeyId, AppId, AttachmentFile, FormId, GroupId, ParsedForm, Role, UserId};

/// A form submission as handed to `decide`: the verbatim bytes, the parse result and the app.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The bytes exactly as received.
    pub raw: Vec<u8>,
    /// SHA-256 of `raw`.
    pub content_hash: [u8; 32],
    /// The parsed form, or why the bytes are not a readable form (`InvalidXml`).
    pub parsed: Result<ParsedForm, String>,
    /// The app it was submitted through (R6).
    pub app: Option<AppId>,
    /// Files sent with the form (multipart), kept whatever the outcome.
    pub attachments: Vec<AttachmentFile>,
    /// The sync token the phone named as its base (`X-CommCareHQ-LastSyncToken`), recorded
    /// with the form whatever the outcome.
    pub last_sync_token: Option<String>,
}

/// Everything caseledger can be asked to do to a project space.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Command {
    /// Create a mobile worker.
    CreateUser {
        /// Id.
        id: UserId,
        /// Login name.
        username: String,
    },
    /// Create a group.
    CreateGroup {
        /// Id.
        id: GroupId,
        /// Name.
        name: String,
        /// Case sharing on.
        case_sharing: bool,
    },
    /// Turn a group's case sharing on or off.
    SetGroupCaseSharing {
        /// Group.
        group: GroupId,
        /// New flag.
        on: bool,
    },
    /// Add a user to a group.
    AddMember {
        /// Group.
        group: GroupId,
        /// User.
        user: UserId,
    },
    /// Remove a user from a group.
    RemoveMember {
        /// Group.
        group: GroupId,
        /// User.
        user: UserId,
    },
    /// Create an app.
    CreateApp {
        /// Id.
        id: AppId,
        /// Name.
        name: String,
        /// Case sharing on.
        case_sharing: bool,
        /// Case types its case lists show.
        case_types: Vec<String>,
    },
    /// Turn an app's case sharing on or off.
    SetAppCaseSharing {
        /// App.
        app: AppId,
        /// New flag.
        on: bool,
    },
    /// Submit a form.
    SubmitForm(Box<Submission>),
    /// Archive a form: its case effects are revoked by rebuild (R57).
    ArchiveForm {
        /// The form.
        form: FormId,
    },
    /// Unarchive a form: its case effects come back at its original position (R57).
    UnarchiveForm {
        /// The form.
        form: FormId,
    },
    /// Set (or replace) a user's password; the command carries its argon2id hash.
    SetPassword {
        /// The user.
        user: UserId,
        /// argon2id PHC string ([`crate::check_argon2id`]).
        hash: String,
    },
    /// Create an API key for a user; the command carries the hash of its secret.
    CreateApiKey {
        /// The key's public id, chosen by the caller.
        key_id: ApiKeyId,
        /// The user it authenticates as.
        user: UserId,
        /// What it may do.
        role: Role,
        /// argon2id PHC string of the secret.
        hash: String,
    },
    /// Revoke an API key; revoking a revoked key changes nothing.
    RevokeApiKey {
        /// The key.
        key_id: ApiKeyId,
    },
}

/// A command that cannot be carried out; nothing is appended.
///
/// These are caller mistakes (unknown ids, duplicates of admin objects, bad arguments), unlike a
/// rejected form, which is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The user id is not in the project space. Create the user first.
    #[error("unknown user {0}")]
    UnknownUser(UserId),
    /// The group id is not in the project space. Create the group first.
    #[error("unknown group {0}")]
    UnknownGroup(GroupId),
    /// No API key with that id was ever created in the project space (`apikey list` shows them).
    #[error("unknown API key {0}")]
    UnknownApiKey(ApiKeyId),
    /// The app id is not in the project space. Create the app first.
    #[error("unknown app {0}")]
    UnknownApp(AppId),
    /// No form with that id was ever accepted.
    #[error("unknown form {0}")]
    UnknownForm(FormId),
    /// The form is not in a state the command applies to (e.g. archiving a rejected form).
    #[error("form {form}: {reason}")]
    FormState {
        /// The form.
        form: FormId,
        /// Why.
        reason: &'static str,
    },
    /// An object with that id exists already; ids are never reused.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// `user`, `group`, `app` or `API key`.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// An argument is empty or too long.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which argument.
        field: &'static str,
        /// Why.
        reason: String,
    },
}
