//! The one error type of the log, [`LogError`], with what each variant means for the caller.
//!
//! Positions in variants are always the log position of the offending event.
//! When bytes are decoded outside the log (by [`crate::decode_envelope`]) the position is not
//! known and is reported as [`Position::ZERO`].

use domain::Position;

/// Everything that can go wrong when appending to, reading or flushing the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// An append said [`crate::Expected::Head`] and the log's head had moved on.
    ///
    /// Handling: nothing was written. Re-read the state up to `actual`, decide again, retry.
    #[error("expected the log head at {expected}, but it is at {actual}")]
    WrongExpectedPosition {
        /// The head the caller decided against.
        expected: Position,
        /// The head the log has (written, not necessarily durable).
        actual: Position,
    },

    /// A stored event failed its crc32 check, did not decode, sits under the wrong key, or is
    /// missing from the middle or tail of the log.
    ///
    /// Handling: stop and restore from a backup; the log is the source of truth (I2) and a
    /// corrupt log must not be folded into projections. `reason` names what was checked.
    #[error("event at position {position} is corrupt: {reason}")]
    Corrupt {
        /// The position of the damaged or missing event ([`Position::ZERO`] when unknown).
        position: Position,
        /// What failed.
        reason: String,
    },

    /// A stored envelope has a format version this build cannot read (written by a newer build).
    ///
    /// Handling: upgrade the binary; the data is not damaged.
    #[error(
        "event at position {position} has envelope format {version}; this build reads formats 1 to 4"
    )]
    UnsupportedEnvelope {
        /// The event's position ([`Position::ZERO`] when unknown).
        position: Position,
        /// The format byte found.
        version: u8,
    },

    /// An earlier write or flush failed, so the log no longer knows what is on disk and refuses
    /// all further writes, flushes and live reads (fjall's approach to a failed fsync).
    ///
    /// Handling: restart the process; reopening recovers the durable prefix.
    #[error("the log is poisoned by an earlier failed write or flush; reopen it")]
    Poisoned,

    /// [`crate::SledLog::wait_durable`] was asked for a position that has not been written.
    ///
    /// Handling: a bug in the caller; only wait for positions that `write` returned.
    #[error("asked to wait for position {requested}, but only {written} is written")]
    NotWritten {
        /// The position waited for.
        requested: Position,
        /// The written head at the time.
        written: Position,
    },

    /// The tokio runtime shut down while a flush or read ran on its blocking pool.
    ///
    /// Handling: none; the process is stopping. A flush interrupted this way poisons the log.
    #[error("the runtime shut down during a blocking log operation")]
    Shutdown,

    /// sled reported an error (IO, or a sled bug it detected).
    ///
    /// Handling: if it came from a write or flush, the log is now poisoned; otherwise retrying a
    /// read may help once the IO problem is gone.
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),

    /// A networked store (JetStream, `crates/jetstream`) did not answer in time, lost its
    /// connection, had no quorum, or answered with an error this crate has no variant for.
    ///
    /// Handling: an append answered with this may or may not be in the log. Retry it with the
    /// same idempotency key: the answer is then [`crate::AppendOutcome::AlreadyAppended`] if the
    /// first attempt landed. Reads can simply be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),

    /// An event could not be encoded (bincode failure, a type name over 255 bytes, or the position
    /// space is exhausted).
    ///
    /// Handling: a bug; nothing was written.
    #[error("cannot encode event: {0}")]
    Encode(String),
}

impl LogError {
    /// Fills in the position of a decode error that was raised without one (e.g. by
    /// [`crate::decode_envelope`], which does not know where the bytes were stored).
    pub fn at(self, at: Position) -> LogError {
        match self {
            LogError::Corrupt { position, reason } if position == Position::ZERO => {
                LogError::Corrupt {
                    position: at,
                    reason,
                }
            }
            LogError::UnsupportedEnvelope { position, version } if position == Position::ZERO => {
                LogError::UnsupportedEnvelope {
                    position: at,
                    version,
                }
            }
            other => other,
        }
    }

    /// [`LogError::Corrupt`] at `position` for `reason`.
    pub fn corrupt(position: Position, reason: impl Into<String>) -> LogError {
        LogError::Corrupt {
            position,
            reason: reason.into(),
        }
    }
}
