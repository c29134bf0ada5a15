//! bincode helpers for projection values.

use serde::{de::DeserializeOwned, Serialize};

use crate::ProjectionError;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain data structs into a Vec cannot fail; an empty value would be caught on read.
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, ProjectionError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| ProjectionError::Decode {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: e.to_string(),
        })
}
