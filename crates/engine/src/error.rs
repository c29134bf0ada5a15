//! The engine's error type: one enum over the crates below it.

/// Why a command or query could not be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The command was refused (unknown id, already exists, bad argument); nothing was appended.
    #[error(transparent)]
    Command(#[from] domain::CommandError),
    /// The log failed. After a failed flush the log is poisoned: restart the process.
    #[error(transparent)]
    Log(#[from] eventlog::LogError),
    /// A projection failed; `replay` rebuilds them from the log.
    #[error(transparent)]
    Projection(#[from] projections::ProjectionError),
    /// A file of the store is damaged: sled's `conf` does not check, or sled could not recover
    /// its data file `db` (it panicked, or found corrupted data). The message names the file and
    /// what to do; nothing was written.
    #[error("{path} is damaged: {reason}")]
    DamagedFile {
        /// The damaged file.
        path: std::path::PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Another process holds the store's file lock (sled's exclusive lock on `DIR/db`): a
    /// server, or another command still running. Nothing was read or written; wait for it to
    /// finish, or go through the process that holds it.
    #[error("{} is held by another process (sled's lock on its data file)", .dir.display())]
    Locked {
        /// The store directory.
        dir: std::path::PathBuf,
    },
    /// sled failed to open or flush.
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    /// A time-travel point outside the log: beyond its head, or before its first event.
    #[error("{0}")]
    OutOfRange(String),
    /// A broken internal expectation; a bug report.
    #[error("internal error: {0}")]
    Internal(String),
}
