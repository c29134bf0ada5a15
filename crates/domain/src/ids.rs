//! Identifier newtypes and the log [`Position`].
//!
//! Every id that crosses a crate boundary is a newtype so a user id can never be passed where a
//! group id is expected. Ids are opaque strings chosen by the project space (CommCare uses UUIDs
//! but accepts any non-empty text); only `Position` and `Timestamp` carry arithmetic.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Wraps an id.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A project space (CommCare "domain"); every event and query is scoped to one.
    DomainName
);
string_id!(
    /// A mobile worker.
    UserId
);
string_id!(
    /// A group of users; with case sharing on, its id can own cases.
    GroupId
);
string_id!(
    /// A CommCare application of the project space.
    AppId
);
string_id!(
    /// A case (`case_id` attribute of a case block).
    CaseId
);
string_id!(
    /// A form's identity: its `meta/instanceID` (R2), or `sha256:<hex>` when it has none (R3).
    FormId
);
string_id!(
    /// The id of the command that produced an event; also the log's idempotency key.
    CommandId
);
string_id!(
    /// An API key's public part: what names the key in `apikey list` and `apikey revoke` and
    /// finds its record when a client presents it. Not a secret.
    ApiKeyId
);

/// A gapless global position in one project space's log, starting at 1.
///
/// Position 0 means "before the first event": reading from 0 reads everything and a projection
/// whose checkpoint is 0 has seen nothing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event.
    pub const ZERO: Position = Position(0);

    /// The position right after this one.
    #[must_use]
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }

    /// Big-endian bytes, so that sled's byte order is position order.
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}
