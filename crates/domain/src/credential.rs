//! Credentials as facts: roles, API key records, and the check that only hashes are recorded.
//!
//! Hashing is IO-free but needs randomness (a salt), so it happens outside this crate; commands
//! carry the finished hash and `decide` only checks that it is an argon2id PHC string, so a
//! plaintext secret can never be recorded by mistake.

use serde::{Deserialize, Serialize};

use crate::{CommandError, UserId};

/// What an API key may do in its project space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Everything in its project space.
    Admin,
    /// Read everything and submit forms.
    Service,
    /// Read everything, write nothing.
    Auditor,
}

impl Role {
    /// The role's wire spelling: `admin`, `service` or `auditor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Auditor => "auditor",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API key as the directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// The user it authenticates as.
    pub user_id: UserId,
    /// What it may do.
    pub role: Role,
    /// argon2id PHC string of its secret.
    pub hash: String,
    /// Revoked keys stay listed but never authenticate again.
    pub revoked: bool,
}

/// Refuses anything but an argon2id PHC string (`$argon2id$v=…$m=…,t=…,p=…$salt$hash`), so
/// that a secret in clear can never be written to the log.
pub fn check_argon2id(hash: &str) -> Result<(), CommandError> {
    let parts: Vec<&str> = hash.split('$').collect();
    let well_formed = parts.len() == 6
        && parts.first() == Some(&"")
        && parts.get(1) == Some(&"argon2id")
        && parts.get(2).is_some_and(|v| v.starts_with("v="))
        && parts.get(3).is_some_and(|p| p.contains("m="))
        && parts.iter().skip(4).all(|b| {
            !b.is_empty()
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        });
    if well_formed {
        Ok(())
    } else {
        Err(CommandError::Invalid {
            field: "hash",
            reason: "must be an argon2id PHC string; secrets are never recorded in clear".into(),
        })
    }
}
