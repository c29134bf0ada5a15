//! The restore crate's error type.

use eventlog::LogError;
use projections::ProjectionError;

/// Why a restore could not be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The user id is not a mobile worker of this project space. HQ answers 401; check the id
    /// (it is the user id, not the username).
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// `since` is not a token this store issued to this user: not `<position>-<random>`, a
    /// position ahead of the log, or bound to another user or project space. HQ answers 412 and the phone falls back to a full restore; callers should do
    /// the same (restore again without `since`).
    #[error("bad sync token: {0}")]
    BadToken(String),
    /// Reading the projections failed. They can be rebuilt from the log with `replay` (I2).
    #[error("restore: {0}")]
    Projection(#[from] ProjectionError),
    /// Reading the log failed while looking for what changed since the token.
    #[error("restore: {0}")]
    Log(#[from] LogError),
    /// Writing the payload failed. The payload is written to memory today, which does not fail;
    /// a writer that can (a socket) reports its error here, and the payload is incomplete.
    #[error("restore: writing the payload: {0}")]
    Write(#[from] std::io::Error),
}
