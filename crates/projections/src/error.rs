//! Errors of the projection store.

use domain::Position;

/// What can go wrong while folding or querying projections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// sled failed (IO error or corruption). The projection can be rebuilt from the log by `replay`.
    #[error("projection storage: {0}")]
    Storage(#[from] sled::Error),
    /// A stored value did not decode. Rebuild the projections with `replay`.
    #[error("projection value {key} does not decode: {reason}")]
    Decode {
        /// Which key.
        key: String,
        /// Decoder message.
        reason: String,
    },
    /// An event was offered out of position order; projections fold in position order only (I3).
    #[error("event at {got} offered to a projection whose next position is {expected}")]
    OutOfOrder {
        /// Position the projection expected.
        expected: Position,
        /// Position it got.
        got: Position,
    },
    /// A rebuild needed a log event that is not there, or no log reader was set.
    #[error("rebuild of case {case} cannot read the log: {reason}")]
    Rebuild {
        /// The case being rebuilt.
        case: String,
        /// Why.
        reason: String,
    },
    /// A scratch file of a bulk rebuild could not be written or read back.
    #[error("replay scratch file {path}: {reason}")]
    Scratch {
        /// The file or directory.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Reading the log failed during catch-up or replay.
    #[error(transparent)]
    Log(#[from] eventlog::LogError),
}
