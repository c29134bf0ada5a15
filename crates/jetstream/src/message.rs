//! What a stored message of a [`crate::JetStreamLog`] holds, taken apart and checked, and the
//! messages an import publishes.
//!
//! A message is one envelope, or (an imported format-4 entry) one envelope followed by the raw
//! submission it names by length and SHA-256, `Caseledger-Envelope-Len` saying where the
//! envelope ends. What must hold: the chain covers the envelope only, as on sled; no reader
//! returns raw bytes that are not the ones their envelope names.

use async_nats::HeaderMap;
use bytes::Bytes;
use domain::{Position, RecordedEvent};
use eventlog::raw::RawRef;
use eventlog::{
    chain_hash, decode_envelope, decode_header, EnvelopeHeader, Hash, LogError, VerbatimEntry,
};

use crate::wire::{self, Stored};

/// One message to publish: its headers and payload.
pub(crate) type Message = (HeaderMap, Bytes);

/// A stored message taken apart: the envelope (what the chain covers) and the raw submission a
/// format-4 envelope names, which the message carries after it.
pub(crate) struct Parts<'a> {
    pub(crate) envelope: &'a [u8],
    pub(crate) raw: Option<&'a [u8]>,
    pub(crate) header: EnvelopeHeader<'a>,
}

/// Splits the message at `position` (its sequence must be that): by its `Caseledger-Envelope-Len`
/// header when it has one, and checks the envelope's header (format, crc) and the raw bytes
/// against the length and SHA-256 the envelope names.
pub(crate) fn parts(message: &Stored, position: Position) -> Result<Parts<'_>, LogError> {
    if message.seq != position.0 {
        return Err(LogError::corrupt(
            position,
            format!("missing: the stream answered {}", message.seq),
        ));
    }
    let payload = &message.payload[..];
    let (envelope, raw) = match message.headers.get(wire::ENVELOPE_LEN) {
        None => (payload, None),
        Some(value) => {
            let at = value
                .as_str()
                .parse::<usize>()
                .ok()
                .filter(|&n| n <= payload.len())
                .ok_or_else(|| {
                    LogError::corrupt(
                        position,
                        format!(
                            "{} {:?} does not fit a message of {} bytes",
                            wire::ENVELOPE_LEN,
                            value.as_str(),
                            payload.len()
                        ),
                    )
                })?;
            let (envelope, raw) = payload.split_at(at);
            (envelope, Some(raw))
        }
    };
    let header = decode_header(envelope).map_err(|e| e.at(position))?;
    check_raw(position, header.raw, raw)?;
    Ok(Parts {
        envelope,
        raw,
        header,
    })
}

/// A raw submission against the one its envelope names (`named`, format 4): both there and the
/// same length and SHA-256, or neither.
pub(crate) fn check_raw(
    position: Position,
    named: Option<RawRef>,
    raw: Option<&[u8]>,
) -> Result<(), LogError> {
    match (named, raw) {
        (Some(named), Some(bytes)) if RawRef::of(bytes) != named => Err(LogError::corrupt(
            position,
            "the raw submission differs from the one its envelope names",
        )),
        (Some(_), None) => Err(LogError::corrupt(
            position,
            "the envelope names a raw submission stored out of line, and none came with it",
        )),
        (None, Some(_)) => Err(LogError::corrupt(
            position,
            "a raw submission came with an envelope that holds its own",
        )),
        _ => Ok(()),
    }
}

/// Checks a stored message at `position` against the chain so far (and its raw submission
/// against its envelope); returns its chain hash, which covers the envelope.
pub(crate) fn check_chained(
    message: &Stored,
    position: Position,
    prev: &Hash,
) -> Result<Hash, LogError> {
    let Parts {
        envelope, header, ..
    } = parts(message, position)?;
    match header.prev {
        Some(stored) if stored == prev => {}
        Some(_) => {
            return Err(LogError::corrupt(
                position,
                "its stored previous hash is not the chain hash before it",
            ))
        }
        None => {
            return Err(LogError::corrupt(
                position,
                "an unchained (legacy) envelope in a JetStream log",
            ))
        }
    }
    Ok(chain_hash(prev, position, envelope))
}

/// The event stored at `position`, a form with its raw submission inline
/// ([`domain::RawBytes::Inline`]) also when the message carries it after the envelope.
pub(crate) fn decode_stored(
    message: &Stored,
    position: Position,
) -> Result<RecordedEvent, LogError> {
    let Parts { envelope, raw, .. } = parts(message, position)?;
    let mut event = decode_envelope(envelope).map_err(|e| e.at(position))?;
    if let Some(raw) = raw {
        // `decode_envelope` checked that a format-4 envelope's event is a form.
        if let Some(form) = event.event.form_record_mut() {
            form.raw = domain::RawBytes::Inline(raw.to_vec());
        }
    }
    if event.position != position {
        return Err(LogError::corrupt(
            position,
            format!(
                "stored at sequence {position} but the envelope says {}",
                event.position
            ),
        ));
    }
    Ok(event)
}

/// The messages that store `entries` right after `head` (chain hash `hash`), each checked as
/// [`crate::JetStreamLog::append_verbatim`] says, with the last position and its chain hash.
pub(crate) fn verbatim_messages(
    mut head: Position,
    mut hash: Hash,
    entries: &[VerbatimEntry],
    max_payload: usize,
) -> Result<(Vec<Message>, Position, Hash), LogError> {
    let mut messages = Vec::with_capacity(entries.len());
    for entry in entries {
        let position = entry.position;
        let envelope = &entry.envelope[..];
        if position != head.next() {
            return Err(LogError::corrupt(
                position,
                format!(
                    "out of order: the stream's next position is {}",
                    head.next()
                ),
            ));
        }
        let header = decode_header(envelope).map_err(|e| e.at(position))?;
        match header.prev {
            Some(prev) if *prev == hash => {}
            Some(prev) => {
                return Err(LogError::corrupt(
                    position,
                    format!(
                        "hash chain broken: the entry stores previous hash {}, the entries before it hash to {}",
                        eventlog::chain::to_hex(prev),
                        eventlog::chain::to_hex(&hash)
                    ),
                ))
            }
            None => {
                return Err(LogError::corrupt(
                    position,
                    "an unchained (legacy) envelope: a JetStream log holds chained ones only",
                ))
            }
        }
        let event = decode_envelope(envelope).map_err(|e| e.at(position))?;
        if event.position != position {
            return Err(LogError::corrupt(
                position,
                format!("the envelope says position {}", event.position),
            ));
        }
        check_raw(position, header.raw, entry.raw.as_deref())?;
        let mut headers = HeaderMap::new();
        let payload = match &entry.raw {
            Some(raw) => {
                headers.insert(wire::ENVELOPE_LEN, envelope.len().to_string().as_str());
                let mut payload = Vec::with_capacity(envelope.len() + raw.len());
                payload.extend_from_slice(envelope);
                payload.extend_from_slice(raw);
                Bytes::from(payload)
            }
            None => Bytes::copy_from_slice(envelope),
        };
        if payload.len() > max_payload {
            return Err(LogError::Encode(format!(
                "the entry at {position} is {} bytes, over the server's max_payload of {max_payload}",
                payload.len()
            )));
        }
        hash = chain_hash(&hash, position, envelope);
        head = position;
        messages.push((headers, payload));
    }
    Ok((messages, head, hash))
}
