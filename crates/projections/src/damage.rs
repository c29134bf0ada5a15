//! What can be found wrong with stored projections, and which errors mean "damaged".
//!
//! Projections are derived from the log (I2), so the answer to every entry here is the same:
//! rebuild them into a fresh generation. None of it may keep a store from opening.

use crate::ProjectionError;

/// A reason found in the store to rebuild the projections.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Damage {
    /// The record of the active generation (or of the layout or rules version) does not read.
    Meta {
        /// What failed.
        reason: String,
    },
    /// The active generation's directory or checkpoint does not read or decode.
    Generation {
        /// The generation.
        id: u64,
        /// What failed.
        reason: String,
    },
    /// A generation tree left by an earlier replay could not be reclaimed; it is not active,
    /// so nothing reads it.
    Leftover {
        /// The tree's name.
        tree: String,
        /// What failed.
        reason: String,
    },
    /// The projections were written with another layout ([`crate::LAYOUT_VERSION`]), which this
    /// code cannot read. (Projections folded by other rules read, so they are not damage: see
    /// [`crate::RULES_VERSION`].)
    Layout {
        /// The layout version recorded in the store.
        stored: u64,
        /// The layout version of this code.
        current: u64,
    },
    /// A query read a value that does not decode, or that sled could not read.
    Value {
        /// The error the query met.
        reason: String,
    },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Meta { reason } => {
                write!(
                    f,
                    "the record of the active projection generation: {reason}"
                )
            }
            Damage::Generation { id, reason } => {
                write!(f, "projection generation {id}: {reason}")
            }
            Damage::Leftover { tree, reason } => {
                write!(f, "leftover projection tree {tree} (not in use): {reason}")
            }
            Damage::Layout { stored, current } => write!(
                f,
                "projections of layout version {stored}, this build reads layout version {current}"
            ),
            Damage::Value { reason } => write!(f, "a projection value: {reason}"),
        }
    }
}

impl Damage {
    /// True when the active projections cannot be trusted and must be rebuilt: everything but a
    /// leftover tree, which nothing reads (the next replay numbers its generation past it).
    pub fn needs_rebuild(&self) -> bool {
        !matches!(self, Damage::Leftover { .. })
    }
}

impl ProjectionError {
    /// True when the error means the stored projections are damaged (a value that does not
    /// decode, or sled reporting corruption or failing to read), so that rebuilding them from
    /// the log is the remedy; false for IO errors and errors of the log, of the caller, or of
    /// scratch files.
    pub fn is_damage(&self) -> bool {
        match self {
            ProjectionError::Decode { .. } => true,
            // An IO error is the disk's, not the data's: a rebuild would meet it too.
            ProjectionError::Storage(e) => matches!(e, sled::Error::Corruption { .. }),
            _ => false,
        }
    }
}
