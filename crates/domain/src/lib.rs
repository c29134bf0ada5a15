//! The pure domain core of caseledger: CommCare case sharing as commands, events and folds.
//!
//! - [`Command`]s are decided by [`decide`] against a read-only [`State`] into [`Event`]s or a
//!   [`CommandError`]; a rejected *form* is not an error but a `FormRejected` event (I7).
//! - [`apply_block`] folds one recorded case block into a [`Case`] (R11–R31).
//! - [`Directory`] folds users, groups, memberships and apps (R34, R35), and credentials as of
//!   now: password hashes and API keys with their [`Role`].
//!
//! This crate does no IO (I1): no sled, no tokio, no files, no clock. Time comes in as data.
//!
//! ```ignore
//! let events = domain::decide(&state, &Command::CreateUser { .. }, received_at)?;
//! ```

mod case;
mod command;
mod credential;
mod decide;
mod directory;
mod event;
mod fold;
mod form;
mod ids;
mod time;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use case::{apply_block, Attachment, BlockApplied, Case, Index, RESTRICTED_PROPERTIES};
pub use command::{Command, CommandError, Submission};
pub use credential::{check_argon2id, ApiKey, Role};
pub use decide::{decide, FormStatus, State};
pub use directory::{App, Directory, Group, User};
pub use event::*;
pub use fold::{
    conflicts, fold_live, CaseChange, CaseTimeline, Conflict, ConflictSide, FormEntry, FormFact,
    FormStep, LiveVersion,
};
pub use form::{
    Actions, AttachmentChange, CaseBlock, Create, IndexChange, ParsedForm, Problem, Relationship,
};
pub use ids::{ApiKeyId, AppId, CaseId, CommandId, DomainName, FormId, GroupId, Position, UserId};
pub use time::{DateError, Timestamp};

use serde::{Deserialize, Serialize};

/// An event as stored: where it sits in the log, when the server received the command that caused
/// it, which command that was, and the event itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Gapless global position.
    pub position: Position,
    /// Server received time of the command.
    pub recorded_at: Timestamp,
    /// The command that produced it.
    pub command_id: CommandId,
    /// The fact.
    pub event: Event,
}

/// The maximum length of ids and case values (R50).
pub const MAX_VALUE_LEN: usize = 255;
