//! Authentication and authorization: the [`Principal`] extractor every protected handler takes,
//! so no route can forget to authenticate.
//!
//! Schemes (API.md §1.2): `Basic b64(login:password)` for mobile workers, where HQ also takes an
//! API key as the password; `ApiKey login:key` (scheme case-insensitive, `apikey` as
//! commcare-export sends it) for services and auditors. The login is the username or the user
//! id. No credentials: 401 with a Basic challenge (phones ask unauthenticated first, then
//! retry). A credential is looked up only in the project space of the URL, so it never reaches
//! another one. Failed logins are throttled per client address and per login (`limit`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue};
use base64::Engine as _;
use domain::{Directory, DomainName, Role, UserId};
use engine::Engine;
use sha2::{Digest, Sha256};

use crate::state::{AppState, VERIFIED_MAX};
use crate::{secret, ServerError};

/// What an authenticated caller may do in its project space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// A phone's user (password login): submits only as itself, restores only itself.
    MobileWorker,
    /// An API key with role admin: everything in its project space.
    Admin,
    /// An API key with role service: reads, and submits as anyone.
    Service,
    /// An API key with role auditor: reads everything, writes nothing.
    Auditor,
}

impl Access {
    /// True when the caller may submit forms (as itself, for a mobile worker).
    pub fn may_submit(self) -> bool {
        !matches!(self, Access::Auditor)
    }

    /// True when the caller may act on behalf of, or read the data of, `user`.
    fn reaches(self, me: &UserId, user: &str) -> bool {
        match self {
            Access::MobileWorker => me.as_str() == user,
            Access::Admin | Access::Service | Access::Auditor => true,
        }
    }
}

impl From<Role> for Access {
    fn from(role: Role) -> Self {
        match role {
            Role::Admin => Access::Admin,
            Role::Service => Access::Service,
            // A role a later build adds gets the least.
            _ => Access::Auditor,
        }
    }
}

/// An authenticated caller of one project space, with that project space's engine.
#[derive(Clone)]
pub struct Principal {
    /// The project space of the URL, the only one the credentials were looked up in.
    pub domain: DomainName,
    /// Who.
    pub user_id: UserId,
    /// What they may do.
    pub access: Access,
    /// The project space's engine.
    pub engine: Arc<Engine>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("domain", &self.domain)
            .field("user_id", &self.user_id)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// Refuses callers that may not write (auditors).
    pub fn require_submit(&self) -> Result<(), ServerError> {
        if self.access.may_submit() {
            Ok(())
        } else {
            Err(ServerError::Forbidden(format!(
                "{} may read but not write in {}",
                self.user_id, self.domain
            )))
        }
    }

    /// Refuses a mobile worker acting as, or reading the data of, another user.
    pub fn require_user(&self, user: &str) -> Result<(), ServerError> {
        if self.access.reaches(&self.user_id, user) {
            Ok(())
        } else {
            Err(ServerError::Forbidden(format!(
                "{} may act only as itself, not as {user}",
                self.user_id
            )))
        }
    }
}

/// Credentials as presented.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Presented {
    /// `Basic`: a password, or an API key in the password's place.
    Basic { login: String, secret: String },
    /// `ApiKey login:key`.
    ApiKey { login: String, key: String },
}

impl Presented {
    fn login(&self) -> &str {
        match self {
            Presented::Basic { login, .. } | Presented::ApiKey { login, .. } => login,
        }
    }
}

/// Reads an `Authorization` header; `None` when it is no scheme this server knows or is
/// malformed.
pub(crate) fn parse_authorization(value: &HeaderValue) -> Option<Presented> {
    let text = value.to_str().ok()?.trim();
    let (scheme, rest) = text.split_once(char::is_whitespace)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (login, secret) = decoded.split_once(':')?;
        Some(Presented::Basic {
            login: login.to_owned(),
            secret: secret.to_owned(),
        })
    } else if scheme.eq_ignore_ascii_case("apikey") {
        // tastypie splits on the first colon.
        let (login, key) = rest.split_once(':')?;
        Some(Presented::ApiKey {
            login: login.to_owned(),
            key: key.to_owned(),
        })
    } else {
        None
    }
}

/// Checks presented credentials against the directory of one project space; argon2 runs here,
/// so call it off the async workers.
fn authenticate(
    state: &AppState,
    domain: &DomainName,
    directory: &Directory,
    presented: &Presented,
) -> Option<(UserId, Access)> {
    let login = presented.login();
    let Some((user_id, user)) = directory.user_by_login(login) else {
        let secret = match presented {
            Presented::Basic { secret, .. } => secret,
            Presented::ApiKey { key, .. } => key,
        };
        secret::verify_nothing(secret);
        return None;
    };
    let by_key = |key: &str| {
        let (key_id, secret) = secret::split_api_key(key)?;
        let record = directory.api_keys.get(&key_id)?;
        if record.revoked || &record.user_id != user_id {
            return None;
        }
        checked(state, domain, "apikey", login, secret, &record.hash)
            .then(|| (user_id.clone(), Access::from(record.role)))
    };
    match presented {
        Presented::ApiKey { key, .. } => by_key(key),
        Presented::Basic { secret, .. } => {
            // HQ's ApiKeyFallbackBackend: an API key is taken in the password's place.
            if secret::split_api_key(secret).is_some() {
                return by_key(secret);
            }
            let hash = user.password_hash.as_deref()?;
            checked(state, domain, "basic", login, secret, hash)
                .then(|| (user_id.clone(), Access::MobileWorker))
        }
    }
}

/// True when `secret` verifies against `hash`, from the cache when these very credentials
/// verified against this very hash before.
fn checked(
    state: &AppState,
    domain: &DomainName,
    scheme: &str,
    login: &str,
    secret: &str,
    hash: &str,
) -> bool {
    let key: [u8; 32] = Sha256::new()
        .chain_update(domain.as_str())
        .chain_update(b"\0")
        .chain_update(scheme)
        .chain_update(b"\0")
        .chain_update(login)
        .chain_update(b"\0")
        .chain_update(secret)
        .finalize()
        .into();
    let lock = || match state.inner.verified.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if lock().get(&key).is_some_and(|h| h == hash) {
        return true;
    }
    if !secret::verify(secret, hash) {
        return false;
    }
    let mut verified = lock();
    if verified.len() >= VERIFIED_MAX {
        verified.clear();
    }
    verified.insert(key, hash.to_owned());
    true
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ServerError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ServerError::Internal(format!("route without a project space: {e}")))?;
        let domain = params
            .get("domain")
            .map(|d| DomainName::new(d.as_str()))
            .ok_or_else(|| ServerError::Internal("route without a project space".into()))?;
        let address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
            .to_string();
        let limits = &state.inner;
        limits
            .by_address
            .check(&address)
            .map_err(ServerError::TooManyAttempts)?;
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            // Not a failure: phones ask without credentials first and answer the challenge.
            return Err(ServerError::Unauthenticated);
        };
        let Some(presented) = parse_authorization(value) else {
            limits.by_address.fail(&address);
            return Err(ServerError::Unauthenticated);
        };
        let login_key = format!("{domain}\0{}", presented.login());
        limits
            .by_login
            .check(&login_key)
            .map_err(ServerError::TooManyAttempts)?;
        let engine = state.engine(&domain).await?;
        let directory = engine.as_ref().map(|e| e.projections().directory());
        let task_state = state.clone();
        let task_domain = domain.clone();
        let found = tokio::task::spawn_blocking(move || match directory {
            Some(dir) => authenticate(&task_state, &task_domain, &dir, &presented),
            None => {
                // No such project space: cost what a wrong password costs, say the same.
                let secret = match &presented {
                    Presented::Basic { secret, .. } => secret,
                    Presented::ApiKey { key, .. } => key,
                };
                secret::verify_nothing(secret);
                None
            }
        })
        .await
        .map_err(|e| ServerError::Internal(format!("authentication task: {e}")))?;
        match (found, engine) {
            (Some((user_id, access)), Some(engine)) => {
                tracing::debug!(domain = %domain, user = %user_id, access = ?access, "authenticated");
                Ok(Principal {
                    domain,
                    user_id,
                    access,
                    engine,
                })
            }
            _ => {
                limits.by_address.fail(&address);
                limits.by_login.fail(&login_key);
                tracing::info!(domain = %domain, address = %address, "failed login");
                Err(ServerError::Unauthenticated)
            }
        }
    }
}
