//! Secrets in and out: argon2id hashes of passwords and API keys, and new API keys.
//!
//! Only hashes leave this module for the log (`domain::check_argon2id` refuses anything else).
//! An API key is `<key id>.<secret>`: the id (16 hex digits) finds the key's record, the secret
//! (64 hex digits, 256 random bits) is checked against its hash. The id is not a secret.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use domain::ApiKeyId;

/// Hashing failed (the parameters or the salt were refused); nothing was recorded.
#[derive(Debug, thiserror::Error)]
#[error("hashing a secret: {0}")]
pub struct HashError(String);

/// The argon2id PHC string of `secret`, with a fresh random salt and argon2's default cost.
pub fn hash(secret: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// True when `secret` hashes to `phc`; false for any other secret or a malformed `phc`.
pub fn verify(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|parsed| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Spends the time of one verification against a fixed hash, so that an unknown login costs
/// what a known one with a wrong secret does.
pub(crate) fn verify_nothing(secret: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash("caseledger: no such login").unwrap_or_default());
    let _ = verify(secret, dummy);
}

/// A new API key: its id, the full key to show once (`<id>.<secret>`), and the hash to record.
pub struct NewApiKey {
    /// Public id.
    pub key_id: ApiKeyId,
    /// What the client presents; shown once, never stored.
    pub key: String,
    /// argon2id PHC string of the secret part.
    pub hash: String,
}

/// Generates an API key from the operating system's random source.
pub fn new_api_key() -> Result<NewApiKey, HashError> {
    let id = random_hex(8);
    let secret = random_hex(32);
    Ok(NewApiKey {
        key_id: ApiKeyId::new(id.clone()),
        key: format!("{id}.{secret}"),
        hash: hash(&secret)?,
    })
}

/// Splits a presented key into its id and secret; `None` when it does not have the shape of
/// a key this module made.
pub fn split_api_key(key: &str) -> Option<(ApiKeyId, &str)> {
    let (id, secret) = key.split_once('.')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then(|| (ApiKeyId::new(id), secret))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
